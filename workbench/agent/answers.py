"""Bounding what a model reads: past the limit, the head and tail of the text stay and the whole of it goes to
the workspace, whose path the answer names."""
from __future__ import annotations

from collections.abc import Callable

DEFAULT_LIMIT = 8_000  # characters of an answer a model reads
MIN_LIMIT = 500


def bound(text: str, limit: int, save: Callable[[str], str | None]) -> str:
    """`text` itself when it fits in `limit` characters; else its head and tail with a note of what was cut and
    where all of it is (`save` writes the text to the workspace and returns its path, or None when it could
    not)."""
    if len(text) <= limit:
        return text
    path = save(text)
    where = f"; all of it is in /workspace/{path}" if path else " (it could not be written to the workspace)"
    note = f"\n\n[... {{cut:,}} characters cut{where} ...]\n\n"
    room = max(limit - len(note.format(cut=len(text))), 0)
    head = room * 2 // 3
    tail = room - head
    cut = len(text) - head - tail
    return text[:head] + note.format(cut=cut) + (text[len(text) - tail:] if tail else "")
