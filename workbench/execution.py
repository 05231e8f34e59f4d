"""Turning the Jupyter messages of one execute request into an ExecutionResult."""
from __future__ import annotations

import base64
import binascii
import json
import logging
import queue
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from jupyter_client.blocking.client import BlockingKernelClient

from .errors import WorkbenchError
from .results import ExecutionError, ExecutionResult, Output

log = logging.getLogger(__name__)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HEALTH_INTERVAL = 0.2  # how often, without messages, the container is checked for death
IDLE_GRACE = 1.0  # how long to wait for the iopub idle once the reply is in and our outputs stopped coming
                  # (iopub may drop messages)
DRAIN_SLICE = 0.05  # seconds of message handling between two looks at the clock, the deadline and the container
_NAME_LIMIT = 200  # characters kept of an exception's name
MAX_OUTPUTS = 1_000  # rich outputs kept per execution; later ones are counted in result.truncated["results"]
_METADATA_LIMIT = 10_000  # characters of JSON an output's metadata may take


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass
class Callbacks:
    on_stdout: Callable[[str], Any] | None = None
    on_stderr: Callable[[str], Any] | None = None
    on_result: Callable[[Output], Any] | None = None
    on_error: Callable[[ExecutionError], Any] | None = None


Spill = Callable[[str], Any]  # name -> a binary writer in the workspace (files.Writer), or None for no spill


class Capped:
    """Text kept up to a limit: its head and tail, with the number of characters cut between them. Once past
    the limit, the whole text is also written, as it comes, to a spill file (when given one)."""

    def __init__(self, limit: int, spill: Callable[[], Any] | None = None) -> None:
        self.limit = limit
        self.total = 0
        self._spill_open = spill
        self.spill: Any = None
        self.half = max(limit // 2, 1)
        self.head: list[str] = []
        self.head_len = 0
        self.tail: deque[str] = deque()
        self.tail_len = 0
        self.cut = 0

    def add(self, text: str) -> None:
        self.total += len(text)
        if self.spill is not None:
            self._spill_write(text)
        elif self._spill_open is not None and self.total > self.limit:
            opener: Callable[[], Any] = self._spill_open
            self._spill_open = None
            try:
                self.spill = opener()
            except (WorkbenchError, OSError):  # e.g. the sandbox put a file or symlink at .outputs: no spill
                self.spill = None
            if self.spill is not None:
                self._spill_write("".join(self.head) + "".join(self.tail) + text)  # nothing was cut yet
        if self.head_len < self.half:
            take = text[: self.half - self.head_len]
            self.head.append(take)
            self.head_len += len(take)
            text = text[len(take):]
        if not text:
            return
        self.tail.append(text)
        self.tail_len += len(text)
        while self.tail_len - len(self.tail[0]) >= self.half:
            self.cut += len(self.tail[0])
            self.tail_len -= len(self.tail.popleft())
        if self.tail_len > self.half:  # trim the oldest tail chunk so the tail stays within its half
            extra = self.tail_len - self.half
            self.tail[0] = self.tail[0][extra:]
            self.tail_len -= extra
            self.cut += extra

    def _spill_write(self, text: str) -> None:
        try:
            self.spill.write(text.encode(errors="replace"))
        except (WorkbenchError, OSError):  # the workspace is full or gone: keep the preview, drop the spill
            self.spill.abort()
            self.spill = None

    def finish(self) -> str | None:
        """Close the spill file; its workspace path, if the whole text is there."""
        if self.spill is None:
            return None
        try:
            self.spill.close()
        except (WorkbenchError, OSError):  # the workspace filled up or changed under it: no spill file
            return None
        path: str = self.spill.path
        return path

    def value(self, spilled: str | None = None) -> str:
        head = "".join(self.head)
        if not self.cut:
            return head + "".join(self.tail)
        where = f"; all of it is in /workspace/{spilled}" if spilled else ""
        return f"{head}\n[... {self.cut} characters cut{where} ...]\n{''.join(self.tail)}"


class Malformed(Exception):
    """A kernel message that does not have the shape the Jupyter protocol gives it: dropped, counted."""


@dataclass
class Outcome:
    """What the message loop saw, before the kernel layer adds restarts."""

    result: ExecutionResult
    reply_seen: bool = False
    idle_seen: bool = False
    started: bool = False  # the kernel said it runs our cell (any message for our request: busy, execute_input, ...)
    started_late: bool = False  # not seen to start by the deadline: the kernel was interrupted anyway
    dead: str | None = None  # the container's exit reason, when it died
    unresponsive: bool = False  # timed out and did not answer the interrupt either
    streams: dict[str, Capped] = field(default_factory=dict)
    output_limit: int = 1_000_000
    budget: int = 1_000_000  # characters of rich output values still kept in the result for this execution
    spill: Spill | None = None
    displays: dict[str, int] = field(default_factory=dict)  # display_id -> index in result.results
    kept: dict[int, int] = field(default_factory=dict)  # index in result.results -> characters it takes of the budget
    drop_reasons: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.result.dropped_messages += 1
        reason = reason[:120]
        if reason not in self.drop_reasons and len(self.drop_reasons) >= _DROP_REASONS:
            reason = "other reasons"  # a flood of distinct forgeries costs one entry, not one each
        self.drop_reasons[reason] = self.drop_reasons.get(reason, 0) + 1


def _spill_opener(spill: Spill, name: str) -> Callable[[], Any]:
    return lambda: spill(name)


def run_cell(
    client: BlockingKernelClient,
    code: str,
    *,
    timeout: float | None,
    output_limit: int,
    interrupt: Callable[[], None],
    exit_reason: Callable[[], str | None],
    callbacks: Callbacks,
    spill: Spill | None = None,
    interrupt_grace: float = 5.0,
    silent: bool = False,
) -> Outcome:
    """Send one execute request and follow it to its end, a timeout, or the kernel's death.

    Every message is checked before use: one that cannot be read (bad signature, a replay, garbage frames) or
    has the wrong shape is dropped and counted in `result.dropped_messages`, never raised. Streams keep a head
    and tail of `output_limit` characters; rich outputs share a budget of `output_limit` characters per
    execution, past which each value goes whole to a workspace file (with `spill`) and a short reference stays.
    The deadline is looked at while messages pour in. The caller holds the session's lock (one execution at a
    time, across processes), so whatever the kernel runs is this session's: our cell, or an orphan of a caller
    that died (or ours with its start messages lost in an iopub flood). Past the deadline the kernel is
    interrupted whatever it runs; if our cell starts during the grace, it is interrupted as well (with a grace of
    its own); when nothing answers, `unresponsive` tells the kernel layer to restart the kernel, which also drops
    our request if it never started, so nothing runs later unwatched.
    """
    started = time.monotonic()
    result = ExecutionResult()
    outcome = Outcome(result=result, streams={
        name: Capped(output_limit, _spill_opener(spill, f"{name}.txt") if spill else None)
        for name in ("stdout", "stderr")}, output_limit=output_limit, budget=output_limit, spill=spill)
    msg_id = client.execute(code, silent=silent, store_history=not silent, allow_stdin=False, stop_on_error=False)
    iopub, shell = client.iopub_channel, client.shell_channel
    poller = zmq.Poller()
    poller.register(iopub.socket, zmq.POLLIN)
    poller.register(shell.socket, zmq.POLLIN)
    deadline = started + timeout if timeout is not None else None
    reply_at: float | None = None
    idle_at: float | None = None
    last_health = started
    interrupted_ours = False  # an interrupt was sent while our cell was known to run
    last_output = started  # when the last iopub message of our request came
    while not (outcome.idle_seen and outcome.reply_seen):
        now = time.monotonic()
        if reply_at is not None and now - max(reply_at, last_output) > IDLE_GRACE:
            break  # the idle was lost: our outputs stopped (a large one may still be on its way after the reply)
        if idle_at is not None and now - idle_at > IDLE_GRACE:  # the reply was lost (the shell channel broke)
            break
        if deadline is not None and now >= deadline:
            if result.timed_out:  # the grace passed and nothing answered
                outcome.unresponsive = True
                break
            result.timed_out = True
            # Under the session lock the kernel runs nothing but this session's cells: ours, or an orphan of a
            # caller that died (or ours, its busy dropped by a flood). Interrupt whichever it is.
            outcome.started_late = not outcome.started
            interrupted_ours = outcome.started
            interrupt()
            deadline = now + interrupt_grace
        elif result.timed_out and outcome.started and not interrupted_ours and not outcome.reply_seen:
            interrupt()  # our cell started during the grace (the orphan before it gave way): it is past its time too
            interrupted_ours = True
            deadline = now + interrupt_grace
        wait = HEALTH_INTERVAL if deadline is None else max(min(HEALTH_INTERVAL, deadline - now), 0.0)
        events = dict(poller.poll(int(wait * 1000)))
        if not events or now - last_health >= 1.0:
            last_health = time.monotonic()
            if (reason := exit_reason()) is not None:
                outcome.dead = reason
                break
        slice_end = time.monotonic() + DRAIN_SLICE
        if shell.socket in events:
            while time.monotonic() < slice_end and (msg := receive(shell, outcome.drop)) is not None:
                if msg is DROPPED or _parent_id(msg) != msg_id:
                    continue
                try:
                    if _reply(msg, outcome):
                        reply_at = time.monotonic()
                except Malformed as exc:
                    outcome.drop(f"execute_reply: {exc}")
        if iopub.socket in events:
            while time.monotonic() < slice_end and (msg := receive(iopub, outcome.drop)) is not None:
                if msg is DROPPED or _parent_id(msg) != msg_id:
                    continue
                last_output = time.monotonic()
                try:
                    if _handle(msg, outcome, callbacks) and not outcome.idle_seen:
                        outcome.idle_seen, idle_at = True, time.monotonic()
                except Malformed as exc:
                    outcome.drop(f"{msg['msg_type']}: {exc}")
    for name, capped in outcome.streams.items():
        spilled = capped.finish()
        setattr(result, name, capped.value(spilled))
        if capped.cut:
            result.truncated[name] = capped.cut
        if spilled:
            result.spilled[name] = spilled
    result.duration = time.monotonic() - started
    if result.dropped_messages:
        log.warning("dropped %d malformed kernel messages: %s", result.dropped_messages,
                    "; ".join(f"{reason} ({n})" for reason, n in list(outcome.drop_reasons.items())[:10]))
    return outcome


DROPPED: dict[str, Any] = {}  # what `receive` returns for a message it dropped


def receive(channel: Any, drop: Callable[[str], Any]) -> dict[str, Any] | None:
    """The next message of a channel, checked to be a well-formed Jupyter message; `DROPPED` (after calling
    `drop` with the reason) for one that is not; None when there is none waiting."""
    try:
        msg = channel.get_msg(timeout=0)
    except queue.Empty:
        return None
    except zmq.ZMQError:
        raise
    except Exception as exc:
        drop(f"unreadable: {type(exc).__name__}: {str(exc)[:100]}")
        return DROPPED
    if not (isinstance(msg, dict) and isinstance(msg.get("msg_type"), str) and isinstance(msg.get("header"), dict)
            and isinstance(msg.get("parent_header"), dict) and isinstance(msg.get("content"), dict)
            and isinstance(msg.get("metadata"), dict)):
        drop("not a message: header, parent_header, metadata and content must be objects")
        return DROPPED
    return msg


def _parent_id(msg: dict[str, Any]) -> Any:
    return msg["parent_header"].get("msg_id")


def _reply(msg: dict[str, Any], outcome: Outcome) -> bool:
    """Apply our execute_reply from the shell channel; True when it is the first."""
    if msg["msg_type"] != "execute_reply":
        return False
    if outcome.reply_seen:
        raise Malformed("a second reply")
    content, result = msg["content"], outcome.result
    status = content.get("status")
    if not isinstance(status, str):
        raise Malformed("status is not a string")
    count = _count(content)
    error = _error(content, outcome) if status == "error" and result.error is None and "ename" in content else None
    outcome.reply_seen = outcome.started = True
    if count is not None:
        result.execution_count = count
    if error is not None:
        result.error = error
    return True


def _count(content: dict[str, Any]) -> int | None:
    count = content.get("execution_count")
    if count is not None and (type(count) is not int or not 0 <= count < 2**63):
        raise Malformed("execution_count is not a count")
    return count


def _handle(msg: dict[str, Any], outcome: Outcome, cb: Callbacks) -> bool:
    """Apply one iopub message of our request; True when it is the kernel's idle status. Raises Malformed
    before changing anything when the message has the wrong shape."""
    kind, content, result = msg["msg_type"], msg["content"], outcome.result
    if kind == "status":
        state = content.get("execution_state")
        if not isinstance(state, str):
            raise Malformed("execution_state is not a string")
        outcome.started = True  # any message for our request says it was taken up (busy may have been dropped)
        return state == "idle"
    outcome.started = True
    if kind == "stream":
        name, text = content.get("name", "stdout"), content.get("text", "")
        if not isinstance(name, str) or not isinstance(text, str):
            raise Malformed("stream name and text must be strings")
        text = clean(text)
        outcome.streams["stderr" if name == "stderr" else "stdout"].add(text)
        callback = cb.on_stderr if name == "stderr" else cb.on_stdout
        if callback:
            callback(text)
    elif kind in ("execute_result", "display_data"):
        data, metadata, display_id = _bundle(content)
        count = _count(content) if kind == "execute_result" else None
        if count is not None:
            result.execution_count = count
        if len(result.results) >= MAX_OUTPUTS:
            result.truncated["results"] = result.truncated.get("results", 0) + 1
            return False
        output = Output(type=kind, data=data, metadata=metadata)
        _cap_output(output, len(result.results), outcome)
        if display_id is not None:
            outcome.displays[display_id] = len(result.results)
        result.results.append(output)
        if kind == "execute_result":
            result.text = output.text
        if cb.on_result:
            cb.on_result(output)
    elif kind == "update_display_data":  # e.g. a progress line updated in place: keep its latest state
        data, metadata, display_id = _bundle(content)
        index = outcome.displays.get(display_id) if display_id is not None else None
        if index is not None:
            output = Output(type="display_data", data=data, metadata=metadata)
            outcome.budget += outcome.kept.pop(index, 0)  # the update replaces the output: its share is free again
            _cap_output(output, index, outcome)
            result.results[index] = output
    elif kind == "error":
        result.error = _error(content, outcome)
        if cb.on_error:
            cb.on_error(result.error)
    elif kind == "execute_input":
        count = _count(content)
        if count is not None:
            result.execution_count = count
    return False


def clean(text: str) -> str:
    """Text with any lone surrogate (the kernel can send one as a JSON escape) replaced, so that results always
    encode as UTF-8 and JSON."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _utf8_json(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
        return True
    except (UnicodeEncodeError, ValueError, TypeError, RecursionError):
        return False


def _is_json_mime(mime: str) -> bool:
    return mime == "application/json" or mime.endswith("+json")


def _bundle(content: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """The data, metadata and display id of a display message, checked: MIME type keys, string values (any JSON
    value for a JSON MIME type)."""
    data, metadata, transient = content.get("data", {}), content.get("metadata", {}), content.get("transient", {})
    if not isinstance(data, dict) or not isinstance(metadata, dict) or not isinstance(transient or {}, dict):
        raise Malformed("data, metadata and transient must be objects")
    if len(data) > _MIME_TYPES:
        raise Malformed(f"more than {_MIME_TYPES} MIME types in one output")
    checked: dict[str, Any] = {}
    for mime, value in data.items():
        if not isinstance(mime, str) or len(mime) > _MIME_LENGTH or not (isinstance(value, str) or
                                                                         _is_json_mime(mime)):
            raise Malformed("data must map MIME types to strings")
        if isinstance(value, str):
            checked[clean(mime)] = clean(value)
        elif _utf8_json(value) and clean(mime) == mime:
            checked[mime] = value
        else:
            raise Malformed("a JSON output that is not UTF-8")
    if metadata and not _utf8_json(metadata):
        metadata = {}
    display_id = (transient or {}).get("display_id")
    if display_id is not None and (not isinstance(display_id, str) or len(display_id) > _MIME_LENGTH):
        raise Malformed("display_id is not a short string")
    return checked, metadata, display_id


_DROP_REASONS = 16  # distinct reasons kept for dropped messages
_MIME_TYPES = 64  # in one output
_MIME_LENGTH = 255  # characters of a MIME type

_EXTENSIONS = {"text/plain": "txt", "text/html": "html", "text/markdown": "md", "text/latex": "tex",
               "image/svg+xml": "svg", "application/javascript": "js"}
_BINARY = {"image/png": "png", "image/jpeg": "jpg", "image/gif": "gif", "image/webp": "webp", "application/pdf": "pdf"}
_PREVIEW = 1_000  # characters of a text value kept in the result once the budget is spent


def _cap_output(output: Output, index: int, outcome: Outcome) -> None:
    """Keep the values of a rich output within the execution's budget. A text value longer than the output
    limit keeps its head and tail; a value past the budget that remains keeps a short preview (text) or just a
    reference (binary, JSON). The whole value goes to a workspace file, binary data decoded (a real .png)."""
    before = outcome.budget
    try:
        _cap_values(output, index, outcome)
    finally:
        outcome.kept[index] = before - outcome.budget


def _cap_values(output: Output, index: int, outcome: Outcome) -> None:
    if output.metadata:
        size = len(_json(output.metadata))
        if size > min(_METADATA_LIMIT, outcome.budget):
            output.metadata = {}
            outcome.result.truncated[f"results[{index}].metadata"] = size
        else:
            outcome.budget -= size
    for mime, value in list(output.data.items()):
        outcome.budget = max(outcome.budget - len(mime), 0)  # the MIME type takes room too
        text = value if isinstance(value, str) else _json(value)
        size = len(text)
        textual = mime in _EXTENSIONS or (mime.startswith("text/") and not _is_json_mime(mime))
        if size <= min(outcome.budget, outcome.output_limit) or (textual and size <= _PREVIEW):
            outcome.budget = max(outcome.budget - size, 0)  # a short text is kept whole (MAX_OUTPUTS bound them)
            continue
        key = f"results[{index}].{mime}"
        where = _spill_value(outcome, index, mime, text)
        if where is not None:
            outcome.result.spilled[key] = where
        if textual:
            keep = max(min(outcome.output_limit, outcome.budget), min(_PREVIEW, outcome.output_limit))
            capped = Capped(keep)
            capped.add(text)
            output.data[mime] = capped.value(where)
            outcome.budget = max(outcome.budget - min(size, keep), 0)
            outcome.result.truncated[key] = capped.cut
        else:
            place = f"in /workspace/{where}" if where else "not kept (no room in the workspace)"
            output.data[mime] = f"[{mime}: {size} characters over the output limit; {place}]"
            outcome.result.truncated[key] = size


def _json(value: Any) -> str:
    try:
        return json.dumps(value, default=str)
    except (ValueError, TypeError, RecursionError) as exc:
        raise Malformed(f"not JSON: {type(exc).__name__}") from None


def _spill_value(outcome: Outcome, index: int, mime: str, text: str) -> str | None:
    if outcome.spill is None:
        return None
    data: bytes | None = None
    extension = _EXTENSIONS.get(mime) or ("json" if _is_json_mime(mime) else "txt")
    if mime in _BINARY:
        try:
            data, extension = base64.b64decode(text, validate=False), _BINARY[mime]
        except (binascii.Error, ValueError):  # not base64 after all: keep it as the text it is
            data = None
    try:
        with outcome.spill(f"result{index}.{extension}") as writer:
            writer.write(data if data is not None else text.encode(errors="replace"))
        return str(writer.path)
    except (WorkbenchError, OSError):  # the workspace is full or gone: keep the preview only
        return None


def _error(content: dict[str, Any], outcome: Outcome) -> ExecutionError:
    """The error of an error message or reply, each part checked and kept within the output limit."""
    ename, evalue, traceback = content.get("ename", "Error"), content.get("evalue", ""), content.get("traceback", [])
    if not isinstance(ename, str) or not isinstance(evalue, str) or not isinstance(traceback, list) or not all(
            isinstance(line, str) for line in traceback):
        raise Malformed("ename, evalue and traceback lines must be strings")
    limit = outcome.output_limit
    capped = Capped(limit)
    capped.add(evalue)
    lines: list[str] = []
    total = 0
    for line in traceback:
        line = strip_ansi(line[: limit + 1000])
        if total + len(line) > limit:
            lines.append(f"[... {len(traceback) - len(lines)} more traceback lines cut: over the output limit ...]")
            break
        lines.append(line)
        total += len(line)
    return ExecutionError(ename=clean(ename[:_NAME_LIMIT]), evalue=clean(strip_ansi(capped.value())),
                          traceback=[clean(line) for line in lines])
