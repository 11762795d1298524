"""Checkpoint loading without an unrestricted unpickle (being written; see issue 8)."""
from __future__ import annotations


def guard_checkpoint_loads() -> None:
    """Make every Composer checkpoint load in this process refuse pickled code."""
