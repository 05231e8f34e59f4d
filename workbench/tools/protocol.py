"""The tool bridge's wire protocol, written once; `kernels/python/workbench_sandbox/protocol.py` is its sandbox
twin (a test checks that the two agree).

The sandbox connects to a Unix stream socket, `/run/workbench/bridge` inside (the session's runtime dir on the
host), and sends frames: a 4-byte big-endian length, then that many bytes of UTF-8 JSON. A request is
`{"v": 2, "id", "op": "call" | "list" | "schema", "slug", "arguments", "timeout", "sync_to_workbench"}`; every
reply carries the request's id (or null when the frame could not be read) and either `ok: true` with `data` /
`offload`, or
`ok: false` with an error `kind` and a message. Everything in a request is untrusted: it is bounded here,
before any of it is used, and no reply ever echoes it back.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, get_args

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
)

VERSION = 2  # 2: the flag that writes every response to the workspace is `sync_to_workbench`, as in the API
SOCKET = "bridge"  # its name in the runtime dir
SANDBOX_PATH = "/run/workbench/bridge"
HEADER = 4  # bytes of the big-endian frame length
MAX_REQUEST = 8 << 20  # bytes of one request frame; a larger frame gets an error and the connection is closed
MAX_INLINE = 4 << 20  # bytes of JSON a reply carries inline; larger responses stay in the workspace
MAX_ID = 64  # characters of a request id
MAX_CONTAINERS = 100_000  # lists and objects in one request: building millions of them holds the host's GIL for
# seconds (counted before parsing, by their opening brackets, strings included: a bound, not an exact count)
SLUG = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # tool slugs and toolkits, matched whole

Op = Literal["call", "list", "schema"]
ErrorKind = Literal[
    "not_found",  # no such tool, or not available to this session
    "not_allowed",  # the tool exists but the session's allowlist does not name it
    "invalid_arguments",  # the arguments do not match the tool's schema
    "tool_error",  # the tool raised
    "rate_limited",  # the tool said so; the only kind run_tools retries
    "timeout",  # the tool did not answer within its time limit
    "not_serialisable",  # the tool's response has no JSON form
    "workspace_full",  # the response did not fit in the workspace
    "workspace_error",  # the response could not be written to the workspace (e.g. a file where a folder goes)
    "session_closed",  # the session was closed
    "busy",  # the bridge refused the connection: too many open at once
    "bad_request",  # the frame was not a valid request
    "internal",  # a bug on the host; logged there
    "no_answer",  # (sandbox side) the host did not answer in time, or the connection closed
]
ERROR_KINDS: tuple[str, ...] = get_args(ErrorKind)


class Request(BaseModel):
    """One request from the sandbox, validated strictly (no coercion)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    v: Literal[2]
    id: StrictInt | Annotated[str, Field(max_length=MAX_ID)]
    op: Op
    slug: Annotated[str, Field(pattern=f"^{SLUG.pattern}$")] | None = None
    arguments: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    sync_to_workbench: StrictBool = False


class BadRequest(Exception):
    """A frame that is not a valid request; `request_id` is its id when that much could be read."""

    def __init__(self, message: str, request_id: int | str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


def parse_request(payload: bytes) -> Request:
    """The request in a frame's payload, or BadRequest with a message that quotes none of the input."""
    if len(payload) > MAX_REQUEST:
        raise BadRequest(f"request of {len(payload):,} bytes is over the bridge's limit of {MAX_REQUEST:,}")
    if len(payload) > MAX_CONTAINERS and payload.count(b"[") + payload.count(b"{") > MAX_CONTAINERS:
        raise BadRequest(f"request holds more than {MAX_CONTAINERS:,} lists and objects: write large inputs to "
                         "a file in the workspace and pass its path")
    try:
        raw = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BadRequest("request is not JSON (or nests too deep)") from None
    if not isinstance(raw, dict):
        raise BadRequest("request must be a JSON object")
    rid = raw.get("id")
    if not ((isinstance(rid, int) and not isinstance(rid, bool)) or (isinstance(rid, str) and len(rid) <= MAX_ID)):
        rid = None
    try:
        request = Request.model_validate(raw)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))[:40] or 'request'}: {e['msg'][:120]}"
                          for e in exc.errors(include_url=False, include_input=False, include_context=False)[:5])
        raise BadRequest(f"invalid request ({where})", rid) from None
    if request.op in ("call", "schema") and request.slug is None:
        raise BadRequest(f"op {request.op!r} needs a tool slug", rid)
    return request


def encode(message: dict[str, Any]) -> bytes:
    """One frame: the length header and the JSON body."""
    body = orjson.dumps(message, default=str)
    return len(body).to_bytes(HEADER, "big") + body


def error_reply(request_id: int | str | None, kind: ErrorKind, message: str, **extra: Any) -> dict[str, Any]:
    """An error reply; the message is cut to 2,000 characters so that no reply can grow with its input."""
    return {"id": request_id, "ok": False, "kind": kind, "error": message[:2000], **extra}


def bounded_timeout(asked: float | None, limit: float) -> float:
    """The time a call may take: what the sandbox asked for, within (0, the host's tool timeout]."""
    if asked is None or not math.isfinite(asked) or asked <= 0:
        return limit
    return min(asked, limit)
