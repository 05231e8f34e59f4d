"""Turning the Jupyter messages of one execute request into an ExecutionResult."""
from __future__ import annotations

import queue
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from jupyter_client import BlockingKernelClient

from .errors import WorkbenchError
from .results import ExecutionError, ExecutionResult, Output

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HEALTH_INTERVAL = 0.2  # how often, without messages, the container is checked for death
IDLE_GRACE = 1.0  # how long to wait for the iopub idle once the reply is in (iopub may drop messages)


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass
class Callbacks:
    on_stdout: Callable[[str], Any] | None = None
    on_stderr: Callable[[str], Any] | None = None
    on_result: Callable[[Output], Any] | None = None
    on_error: Callable[[ExecutionError], Any] | None = None


Spill = Callable[[str], Any]  # name -> a binary writer in the workspace (files.Writer), or None for no spill


class _Capped:
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
            self._spill_open, opener = None, self._spill_open
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
            self.spill.write(text.encode())
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
        return self.spill.path

    def value(self, spilled: str | None = None) -> str:
        head = "".join(self.head)
        if not self.cut:
            return head + "".join(self.tail)
        where = f"; all of it is in /workspace/{spilled}" if spilled else ""
        return f"{head}\n[... {self.cut} characters cut{where} ...]\n{''.join(self.tail)}"


@dataclass
class Outcome:
    """What the message loop saw, before the kernel layer adds restarts."""

    result: ExecutionResult
    reply_seen: bool = False
    dead: str | None = None  # the container's exit reason, when it died
    unresponsive: bool = False  # timed out and did not answer the interrupt either
    streams: dict[str, _Capped] = field(default_factory=dict)
    output_limit: int = 1_000_000
    spill: Spill | None = None
    displays: dict[str, int] = field(default_factory=dict)  # display_id -> index in result.results


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
) -> Outcome:
    """Send one execute request and follow it to its end, a timeout, or the kernel's death.

    Streams and text results beyond `output_limit` characters keep a head and tail; with `spill`, the whole
    of them is written to workspace files named in `result.spilled`.
    """
    started = time.monotonic()
    result = ExecutionResult()
    outcome = Outcome(result=result, streams={
        name: _Capped(output_limit, (lambda n=name: spill(f"{n}.txt")) if spill else None)
        for name in ("stdout", "stderr")}, output_limit=output_limit, spill=spill)
    msg_id = client.execute(code, allow_stdin=False, stop_on_error=False)
    iopub, shell = client.iopub_channel, client.shell_channel
    poller = zmq.Poller()
    poller.register(iopub.socket, zmq.POLLIN)
    poller.register(shell.socket, zmq.POLLIN)
    deadline = started + timeout if timeout is not None else None
    idle_seen = False
    reply_at: float | None = None
    last_health = started
    while not (idle_seen and outcome.reply_seen):
        now = time.monotonic()
        if reply_at is not None and now - reply_at > IDLE_GRACE:
            break
        if deadline is not None and now >= deadline:
            if result.timed_out:
                outcome.unresponsive = True
                break
            result.timed_out = True
            interrupt()
            deadline = now + interrupt_grace
        wait = HEALTH_INTERVAL if deadline is None else max(min(HEALTH_INTERVAL, deadline - now), 0.0)
        events = dict(poller.poll(wait * 1000))
        if not events or now - last_health >= 1.0:
            last_health = time.monotonic()
            if (reason := exit_reason()) is not None:
                outcome.dead = reason
                break
        if shell.socket in events:
            msg = shell.get_msg(timeout=0)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_reply":
                outcome.reply_seen = True
                reply_at = time.monotonic()
                content = msg["content"]
                result.execution_count = content.get("execution_count", result.execution_count)
                if content.get("status") == "error" and result.error is None and "ename" in content:
                    result.error = _error(content)
        if iopub.socket in events:
            while True:
                try:
                    msg = iopub.get_msg(timeout=0)
                except queue.Empty:
                    break
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if _handle(msg, outcome, callbacks):
                    idle_seen = True
    for name, capped in outcome.streams.items():
        spilled = capped.finish()
        setattr(result, name, capped.value(spilled))
        if capped.cut:
            result.truncated[name] = capped.cut
        if spilled:
            result.spilled[name] = spilled
    result.duration = time.monotonic() - started
    return outcome


def _handle(msg: dict[str, Any], outcome: Outcome, cb: Callbacks) -> bool:
    """Apply one iopub message; True when it is the kernel's idle status."""
    kind, content, result = msg["msg_type"], msg["content"], outcome.result
    if kind == "status":
        return content.get("execution_state") == "idle"
    if kind == "stream":
        name = content.get("name", "stdout")
        outcome.streams.setdefault(name, outcome.streams["stdout"]).add(content.get("text", ""))
        callback = cb.on_stderr if name == "stderr" else cb.on_stdout
        if callback:
            callback(content.get("text", ""))
    elif kind in ("execute_result", "display_data"):
        output = Output(type=kind, data=content.get("data", {}), metadata=content.get("metadata", {}))
        _cap_output(output, len(result.results), outcome)
        if display_id := (content.get("transient") or {}).get("display_id"):
            outcome.displays[display_id] = len(result.results)
        result.results.append(output)
        if kind == "execute_result":
            result.text = output.text
            result.execution_count = content.get("execution_count", result.execution_count)
        if cb.on_result:
            cb.on_result(output)
    elif kind == "update_display_data":  # e.g. a progress line updated in place: keep its latest state
        index = outcome.displays.get((content.get("transient") or {}).get("display_id"))
        if index is not None:
            output = Output(type="display_data", data=content.get("data", {}), metadata=content.get("metadata", {}))
            _cap_output(output, index, outcome)
            result.results[index] = output
    elif kind == "error":
        result.error = _error(content)
        if cb.on_error:
            cb.on_error(result.error)
    elif kind == "execute_input":
        result.execution_count = content.get("execution_count", result.execution_count)
    return False


_EXTENSIONS = {"text/plain": "txt", "text/html": "html", "text/markdown": "md", "text/latex": "tex"}


def _cap_output(output: Output, index: int, outcome: Outcome) -> None:
    """Cut text values of a rich output beyond the limit to their head and tail, spilling the whole of them."""
    for mime, value in output.data.items():
        if mime not in _EXTENSIONS or not isinstance(value, str) or len(value) <= outcome.output_limit:
            continue
        capped = _Capped(outcome.output_limit)
        capped.add(value)
        key = f"results[{index}].{mime}"
        where = None
        if outcome.spill is not None:
            try:
                with outcome.spill(f"result{index}.{_EXTENSIONS[mime]}") as writer:
                    writer.write(value.encode())
                where = writer.path
                outcome.result.spilled[key] = where
            except (WorkbenchError, OSError):  # the workspace is full or gone: keep the preview only
                where = None
        output.data[mime] = capped.value(where)
        outcome.result.truncated[key] = capped.cut


def _error(content: dict[str, Any]) -> ExecutionError:
    return ExecutionError(
        ename=content.get("ename", "Error"),
        evalue=strip_ansi(content.get("evalue", "")),
        traceback=[strip_ansi(line) for line in content.get("traceback", [])],
    )
