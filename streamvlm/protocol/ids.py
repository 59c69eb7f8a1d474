"""Ids that stay unique across server restarts: ``sess_``, ``resp_``, ``item_`` and the like.

An id is its prefix, the creation time in milliseconds (base 36, so ids sort by time) and 48 random
bits: two processes, or one process before and after a restart, never hand out the same id, and the
event log can tell sessions apart without a counter kept on disk. Pure: no I/O besides the clock and
the operating system's random source.
"""

from __future__ import annotations

import secrets
import time

__all__ = ["new_id"]

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _DIGITS[r] + out
        if n == 0:
            return out


def new_id(prefix: str) -> str:
    """A fresh id ``{prefix}_{time}{random}``, e.g. ``sess_lk3f9q2a7c1d0e9f8a``; ``prefix`` names what it is."""
    return f"{prefix}_{_base36(time.time_ns() // 1_000_000)}{secrets.token_hex(6)}"
