"""Per-session MCP tokens: an HMAC of the session id under the server's secret.

A token reaches one session only; it needs no storage, and it dies with its session because every
request also checks that the session is still open.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_FILE = "server.secret"
_PREFIX = "wbs_"


def load_secret(home: Path) -> bytes:
    """The server's secret under `home`, made (mode 0600) on first use."""
    path = home / SECRET_FILE
    home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_bytes()
        if len(secret) < 32:
            raise ValueError(f"{path} holds fewer than 32 bytes: remove it to make a new secret") from None
        return secret
    secret = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return secret


def session_token(secret: bytes, session_id: str) -> str:
    """The bearer token that reaches `session_id`'s MCP endpoint and nothing else."""
    digest = hmac.new(secret, b"mcp-session:" + session_id.encode(), hashlib.sha256).digest()
    return _PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def check_session_token(secret: bytes, session_id: str, token: str) -> bool:
    """True when `token` is `session_id`'s token (compared in constant time)."""
    return hmac.compare_digest(session_token(secret, session_id).encode(), token.encode("utf-8", "replace"))
