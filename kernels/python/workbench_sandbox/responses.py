"""`responses` and `tables`: tool responses the host wrote into /workspace/.responses, loaded on first use."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

RESPONSES_DIR = "/workspace/.responses"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class _Loaded(Mapping):
    """A read-only mapping of response id -> loaded value, cached until the file changes."""

    _suffixes: tuple[str, ...] = ()
    _what = ""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, Any]] = {}

    def _path(self, rid: str) -> str | None:
        if isinstance(rid, str) and _ID.match(rid):
            for suffix in self._suffixes:
                path = os.path.join(RESPONSES_DIR, rid + suffix)
                if os.path.isfile(path):
                    return path
        return None

    def __getitem__(self, rid: str) -> Any:
        path = self._path(rid)
        if path is None:
            known = ", ".join(sorted(self)) or "none yet"
            raise KeyError(f"no {self._what} {rid!r} in {RESPONSES_DIR} (known: {known})")
        mtime = os.stat(path).st_mtime
        cached = self._cache.get(rid)
        if cached is None or cached[0] != mtime:
            cached = (mtime, self._load(path))
            self._cache[rid] = cached
        return cached[1]

    def __contains__(self, rid: object) -> bool:
        return isinstance(rid, str) and self._path(rid) is not None

    def _load(self, path: str) -> Any:
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        try:
            names = os.listdir(RESPONSES_DIR)
        except FileNotFoundError:
            return iter([])
        ids = {name[: -len(s)] for name in names for s in self._suffixes
               if name.endswith(s) and not name.startswith(".")}
        return iter(sorted(ids))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"<{self._what}s: {', '.join(self) or 'none yet'}>"


class Responses(_Loaded):
    """responses[id]: the full response of an offloaded tool call, parsed (a list, a dict, or text)."""

    _suffixes = (".json", ".txt")
    _what = "response"

    def _load(self, path: str) -> Any:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                return f.read()
        with open(path, "rb") as f:
            return json.load(f)


class Tables(_Loaded):
    """tables[id]: the records of an offloaded response as a pandas DataFrame backed by the memory-mapped Arrow
    file (Arrow dtypes, nested values as struct/list columns); tables.arrow(id) gives the pyarrow Table."""

    _suffixes = (".arrow",)
    _what = "table"

    def arrow(self, rid: str) -> Any:
        path = self._path(rid)
        if path is None:
            raise KeyError(f"no table {rid!r} in {RESPONSES_DIR}")
        import pyarrow as pa
        from pyarrow import ipc

        return ipc.open_file(pa.memory_map(path)).read_all()

    def _load(self, path: str) -> Any:
        import pandas as pd
        import pyarrow as pa
        from pyarrow import ipc

        table = ipc.open_file(pa.memory_map(path)).read_all()
        return table.to_pandas(types_mapper=pd.ArrowDtype)


responses = Responses()
tables = Tables()
