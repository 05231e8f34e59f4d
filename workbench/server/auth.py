"""API keys of `workbench serve`: random tokens shown once at creation; only their sha256 is stored."""
from __future__ import annotations

import hashlib
import re
import secrets

from ..errors import WorkbenchError
from ..store import ApiKeyRecord, Store

PREFIX = "wbk_"
_NAME = re.compile(r"[A-Za-z0-9_.@:-]{1,64}")
_KEY = re.compile(r"wbk_[A-Za-z0-9_-]{20,100}")


def hash_key(key: str) -> str:
    """The stored form of a key. Keys carry 256 random bits, so a plain sha256 cannot be reversed by guessing."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(store: Store, name: str) -> tuple[ApiKeyRecord, str]:
    """A new API key named `name`: its record and the key itself, which is not stored and cannot be shown again."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise WorkbenchError("a key's name must be 1 to 64 characters of letters, digits and _ . @ : -")
    key = PREFIX + secrets.token_urlsafe(32)
    record = store.add_api_key(secrets.token_hex(6), name, hash_key(key))
    return record, key


def authenticate(store: Store, key: str) -> ApiKeyRecord | None:
    """The active key record of `key`, or None (unknown, malformed or revoked)."""
    if not _KEY.fullmatch(key):
        return None
    return store.api_key_by_hash(hash_key(key))


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
