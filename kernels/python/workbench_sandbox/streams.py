"""Large stream output sent in parts the host accepts: the host drops any iopub message over 32 MiB."""
from __future__ import annotations

import sys
from typing import Any

# characters per stream message: at most 24 MiB of JSON (a control character is escaped in 6 bytes), under 32 MiB
CHUNK = 4 * 1024 * 1024


def split_large_streams() -> None:
    """Make ipykernel's stdout and stderr send a text longer than CHUNK as several stream messages."""
    for stream in (sys.stdout, sys.stderr):
        thread = getattr(stream, "pub_thread", None)
        if hasattr(stream, "register_hook") and hasattr(thread, "schedule"):
            # hooks are per thread: register it in the IO thread, which sends the stream's messages
            thread.schedule(lambda stream=stream: stream.register_hook(_Splitter(stream)))


class _Splitter:
    """An OutStream hook: sends all parts of a long text but the last, and gives the last back to be sent (so the
    stream's other buffers are flushed as usual)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __call__(self, msg: dict[str, Any]) -> dict[str, Any]:
        content = msg.get("content") or {}
        text = content.get("text")
        if not isinstance(text, str) or len(text) <= CHUNK:
            return msg
        stream = self.stream
        last = (len(text) - 1) // CHUNK * CHUNK
        for start in range(0, last, CHUNK):
            part = stream.session.msg("stream", {**content, "text": text[start:start + CHUNK]},
                                      parent=msg.get("parent_header"))
            stream.session.send(stream.pub_thread, part, ident=stream.topic)
        content["text"] = text[last:]
        return msg
