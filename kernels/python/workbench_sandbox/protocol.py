"""The tool bridge's wire protocol, sandbox side: the twin of the host's `workbench/tools/protocol.py` (a host
test checks that they agree). Frames are a 4-byte big-endian length and that many bytes of UTF-8 JSON, over
the Unix socket SANDBOX_PATH."""

VERSION = 2
SANDBOX_PATH = "/run/workbench/bridge"
HEADER = 4
MAX_REQUEST = 8 << 20
MAX_ID = 64
ERROR_KINDS = (
    "not_found", "not_allowed", "invalid_arguments", "tool_error", "rate_limited", "timeout", "not_serialisable",
    "workspace_full", "workspace_error", "session_closed", "busy", "bad_request", "internal", "no_answer",
)
