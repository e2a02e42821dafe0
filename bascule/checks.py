"""Operator input checks: names, free text and reasons, refused before any SQL or audit."""

from __future__ import annotations

import re

from bascule.errors import UsageError

_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")  # fullmatch: `$` would let a trailing \n by
_UNSHOWABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f"  # C0 (line breaks, tab, escape) and C1 (NEL) controls, DEL
    "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"  # bidirectional marks and overrides
    "\u2028\u2029]"  # line and paragraph separators
)


def check_name(dataset: str) -> str:
    """A dataset name as the configuration allows them, or UsageError (before any SQL)."""
    if not _NAME.fullmatch(dataset):
        raise UsageError(
            "a dataset name is lower-case letters, digits, '-' and '_', starting with a letter"
        )
    return dataset


def check_text(what: str, text: str) -> str:
    """Free text for the audit: printable text on one line, bounded. Line breaks (``\n``,
    U+2028, NEL), other controls and bidirectional overrides are refused: shown in ``history``
    and ``status`` they would draw lines, or reorder a line, that the audit does not hold."""
    if _UNSHOWABLE.search(text):
        raise UsageError(
            f"{what}: line breaks, tabs, control characters and bidirectional formatting "
            "characters are not allowed (one line of printable text)"
        )
    if len(text) > 2000:
        raise UsageError(f"{what}: at most 2000 characters")
    return text


MAX_SEQ = 2**63 - 1
"""The largest journal entry number (a Postgres ``bigint``)."""


def check_seq(value: object) -> int:
    """A journal entry's number, from a path segment, a JSON body or an argument: ASCII digits
    only (``str.isdigit`` also says yes to ``²``, and ``int()`` reads ``٣`` as 3), between 1 and
    :data:`MAX_SEQ`, or UsageError (a number past a ``bigint`` would fail in Postgres)."""
    if isinstance(value, str):
        number = int(value) if value.isascii() and value.isdigit() and len(value) <= 19 else None
        if number is None and value.isascii() and value.isdigit():
            number = MAX_SEQ + 1  # all digits, only too long: say so
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        number = None
    if number is None or number < 1:
        raise UsageError(f"the journal entry must be a whole number from 1 to {MAX_SEQ}")
    if number > MAX_SEQ:
        raise UsageError(f"the journal entry must be a whole number, at most {MAX_SEQ}")
    return number


def showable(text: str) -> str:
    """``text`` with what :func:`check_text` refuses written as escapes (``\\n``,
    ``\\u202e``), for audit rows written before it refused them."""
    return _UNSHOWABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def require_reason(reason: str | None) -> str:
    if reason is None or not reason.strip():
        raise UsageError("a reason is required (--reason TEXT): it goes into the audit trail")
    return check_text("reason", reason.strip())


def check_actor(actor: str) -> str:
    if not actor.strip():
        raise UsageError("who makes the change must be named (--by)")
    return check_text("by", actor)
