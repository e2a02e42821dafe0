"""Cutover: stages, the stage store, fleet propagation, the admin API and the SRE commands."""
