"""What an execution returns: the outputs of one cell, in a form an agent can read."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from .tools.protocol import ErrorKind


class Output(BaseModel):
    """One rich output of a cell: an execute_result or a display_data MIME bundle."""

    type: Literal["execute_result", "display_data"]
    data: dict[str, Any] = Field(description="MIME type -> value; text/plain always, image/png as base64")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def text(self) -> str | None:
        return self.data.get("text/plain")

    def describe(self) -> str:
        """Its text, with the kinds of its other data (an image, HTML) named."""
        kinds = ", ".join(k for k in self.data if k != "text/plain")
        return f"[display: {kinds}] {self.text or ''}".rstrip() if kinds else (self.text or "")


class ExecutionError(BaseModel):
    """An exception raised by the cell."""

    ename: str
    evalue: str
    traceback: list[str] = Field(default_factory=list, description="lines without ANSI colour codes")

    def __str__(self) -> str:
        return "\n".join(self.traceback) if self.traceback else f"{self.ename}: {self.evalue}"


class ExecutionResult(BaseModel):
    """The outcome of one `execute` call."""

    text: str | None = Field(default=None, description="text/plain of the execute_result, if any")
    stdout: str = ""
    stderr: str = ""
    results: list[Output] = Field(default_factory=list)
    error: ExecutionError | None = None
    execution_count: int | None = None
    duration: float = 0.0
    timed_out: bool = False
    not_started: bool = Field(default=False, description="the cell never ran: another caller held the session for "
                              "all of the timeout (the cell was not sent, nothing was interrupted), or the kernel was "
                              "restarted (or died) before it took the cell up, which dropped it")
    started_late: bool = Field(default=False, description="the cell was not seen to start by its deadline: the "
                               "kernel was running an earlier cell of this session (its caller gone), or the cell's "
                               "start messages were lost; the kernel was interrupted then, and the cell too if it "
                               "started afterwards")
    kernel_died: str | None = Field(default=None, description="why the kernel died during this execution")
    state_lost: bool = Field(default=False, description="the kernel was restarted: variables are gone, files kept")
    state_lost_reason: str | None = Field(default=None, description="why, when the variables could have been kept: "
                                          "a paused session's snapshot was missing, corrupt or could not be saved")
    state_restored: bool = Field(default=False, description="a paused session woke up: a new kernel holds the "
                                 "variables it had (see state_skipped)")
    state_skipped: dict[str, str] = Field(default_factory=dict, description="name -> why that variable was not "
                                          "saved when the session paused (a generator, an open file, a socket)")
    truncated: dict[str, int] = Field(default_factory=dict, description="stream -> characters cut from its middle")
    spilled: dict[str, str] = Field(default_factory=dict, description="stream or output cut here -> the workspace "
                                    "file holding all of it")
    dropped_messages: int = Field(default=0, description="kernel messages dropped as malformed or forged (bad "
                                  "signature, a replay, garbage frames, wrong shapes)")

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out and self.kernel_died is None

    def __str__(self) -> str:
        """A plain-text account of the execution, for a model to read: labelled stdout, stderr, displays, the
        value, the error with its traceback, and notes on the kernel ('' when the cell gave nothing)."""
        parts = []
        if self.stdout:
            parts.append("stdout:\n" + self.stdout.rstrip("\n"))
        if self.stderr:
            parts.append("stderr:\n" + self.stderr.rstrip("\n"))
        displays = [output.describe() for output in self.results if output.type == "display_data"]
        if displays:
            parts.append("displayed:\n" + "\n".join(displays))
        if self.text is not None:
            parts.append("result:\n" + self.text)
        if self.error is not None:
            parts.append("error:\n" + str(self.error))
        parts += [f"[{note}]" for note in self.notes()]
        return "\n".join(parts)

    def notes(self) -> list[str]:
        """What happened to the kernel during the execution, in words: a timeout, its death, a restart."""
        notes = []
        if self.not_started and not self.kernel_died:
            notes.append(f"timed out after {self.duration:.1f}s waiting for another caller's cell on this session: "
                         "this cell was not sent, and the other cell was not interrupted")
        elif self.not_started:
            notes.append(f"{'timed out after ' if self.timed_out else 'after '}{self.duration:.1f}s this cell had not "
                         "started (the kernel was running an earlier cell of this session); the kernel was restarted "
                         "and this cell was dropped: it never ran")
        elif self.started_late:
            notes.append(f"timed out after {self.duration:.1f}s before the cell was seen to start: the kernel was "
                         "interrupted (it was running an earlier cell of this session whose caller is gone, or this "
                         "cell with its start unseen), and this cell too once it started")
        elif self.timed_out:
            notes.append(f"timed out after {self.duration:.1f}s; the kernel was interrupted")
        if self.kernel_died:
            notes.append(f"kernel died: {self.kernel_died}")
        if self.state_lost:
            notes.append("the kernel was restarted: variables were lost, files in the workspace were kept"
                         + (f" ({self.state_lost_reason})" if self.state_lost_reason else ""))
        if self.state_restored:
            notes.append("the session was paused and resumed: its variables were restored"
                         + (f", except {', '.join(sorted(self.state_skipped))} (not saved)" if self.state_skipped
                            else ""))
        if self.dropped_messages:
            notes.append(f"{self.dropped_messages} malformed kernel messages were dropped")
        return notes


class CommandResult(BaseModel):
    """The outcome of one shell command (`session.commands.run`)."""

    exit_code: int | None = Field(default=None, description="the command's exit code; None when it was killed at "
                                  "its timeout (or its container stopped under it)")
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    timed_out: bool = Field(default=False, description="the command ran past its timeout: it and every process it "
                            "started were killed")
    error: str | None = Field(default=None, description="why there is no exit code, when not a timeout (e.g. the "
                              "session's container stopped during the command)")
    truncated: dict[str, int] = Field(default_factory=dict, description="stream -> characters cut from its middle")
    spilled: dict[str, str] = Field(default_factory=dict, description="stream cut here -> the workspace file "
                                    "holding all of it")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def __str__(self) -> str:
        """A plain-text account of the command, for a model to read: how it ended, then its labelled stdout and
        stderr."""
        if self.timed_out:
            parts = [f"timed out after {self.duration:.1f}s: the command and its children were killed"]
        elif self.exit_code is None:
            parts = [f"no exit code: {self.error or 'the command ended without one'}"]
        else:
            parts = [f"exit code: {self.exit_code}"]
        if self.stdout:
            parts.append("stdout:\n" + self.stdout.rstrip("\n"))
        if self.stderr:
            parts.append("stderr:\n" + self.stderr.rstrip("\n"))
        return "\n".join(parts)


class OffloadEnvelope(BaseModel):
    """What the agent sees of a response that went to the workspace instead of its context."""

    id: str
    path: str = Field(description="the response in the workspace, relative to /workspace")
    format: Literal["json", "text"]
    bytes: int
    table_path: str | None = Field(default=None, description="the records as an Arrow IPC file")
    records: int | None = Field(default=None, description="how many records the table has")
    records_at: str | None = Field(default=None, description="where the records are in the response ('' = top)")
    columns: dict[str, str] = Field(default_factory=dict, description="column -> Arrow type (or key -> JSON type)")
    columns_omitted: int = 0
    preview: str = ""
    table_error: str | None = Field(default=None, description="why no table was made, when records were found")
    hint: str = ""


class ToolResult(BaseModel):
    """The outcome of one tool call: `data` inline, or `offload` when the response went to the workspace."""

    slug: str
    data: Any = Field(default=None, description="the response, JSON-native, when it is small enough to be inline")
    offload: OffloadEnvelope | None = Field(default=None, description="set when the response went to the workspace")
    error: str | None = None
    error_kind: ErrorKind | None = Field(default=None, description="what kind of failure: one of "
                                         "workbench.tools.protocol.ERROR_KINDS")
    retry_after: float | None = Field(default=None, description="for rate_limited: seconds the tool asked to wait")
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def __str__(self) -> str:
        """What a model should read: the error, the envelope, or the inline response, as JSON."""
        if self.error is not None:
            return f"[{self.slug} failed: {self.error_kind}] {self.error}"
        if self.offload is not None:
            return self.offload.model_dump_json()
        return json.dumps(self.data, ensure_ascii=False, default=str)
