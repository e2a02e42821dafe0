"""The deployment files of deploy/, validated offline (issue 18, item 6)."""
