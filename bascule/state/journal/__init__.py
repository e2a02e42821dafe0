"""The dual-write journal in Postgres: record locks, intents, outcomes, and what may be replayed.

One module per concern: :mod:`~bascule.state.journal.entries` (the states, from the stage table),
:mod:`~bascule.state.journal.core` (pools, sealed bodies, transitions),
:mod:`~bascule.state.journal.writes` (a write's session: fence, record locks, intent, outcome),
:mod:`~bascule.state.journal.replay` (replay order, orphans), :mod:`~bascule.state.journal.guard`
(the shadow reads' race guard) and :mod:`~bascule.state.journal.queries` (what SREs ask). How a
write travels through them: docs/architecture.md.
"""

from __future__ import annotations

from bascule.state.journal.replay import ReplaySelection
from bascule.state.journal.writes import WriteLocks


class Journal(WriteLocks, ReplaySelection):
    """One replica's journal: its writes' sessions and locks, the replayer's and resolver's
    selection, and entry outcomes (:class:`~bascule.state.journal.core.JournalCore`)."""
