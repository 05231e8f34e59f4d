"""Routing a tool's response: small ones inline, large ones into the session's workspace with a short envelope.

A large response is written on the host straight into `.responses/` of the workspace: a list of records as
JSON Lines (one record per line) plus an Arrow IPC file made from it by pyarrow's JSON reader; anything else
as JSON (plain text as .txt). In the kernel, `responses[id]` and `tables[id]` load them lazily.
"""
from __future__ import annotations

import base64
import dataclasses
import secrets
from collections.abc import Iterator
from decimal import Decimal
from pathlib import PurePath
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.json as pajson
from pydantic import BaseModel

from .files import Files
from .results import OffloadEnvelope

RESPONSES = ".responses"
ENVELOPE_MAX = 2048  # bytes of the serialised envelope
_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
_BATCH = 2000  # records joined per write
_BLOCK = 4 << 20  # pyarrow JSON reader's block size: fewer, larger blocks parse faster on few cores


class NotSerialisable(TypeError):
    """The response holds a value with no predictable JSON form."""


class Routed(BaseModel):
    """A routed response: `data` when inline, `offload` when written to the workspace (or both when synced)."""

    data: Any = None
    offload: OffloadEnvelope | None = None


def dumps(value: Any) -> bytes:
    """JSON of a tool's response, with predictable conversions (see `_default`)."""
    try:
        return orjson.dumps(value, default=_default, option=_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise NotSerialisable(
            f"the response cannot be turned into JSON: {exc} (tools may return JSON values, pydantic models, "
            "dataclasses, datetimes, Decimal, bytes, sets, numpy values and pandas DataFrames)") from None


def _default(value: Any) -> Any:
    """bytes -> base64 text; Decimal -> its exact text; sets -> lists; pydantic models and dataclasses -> their
    fields; paths -> text; pandas DataFrames -> lists of records; numpy and datetimes are handled by orjson."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "to_dict") and hasattr(value, "columns"):
        return value.to_dict(orient="records")
    if hasattr(value, "item") and callable(value.item):  # numpy scalars orjson does not know
        return value.item()
    raise TypeError(f"type {type(value).__name__} is not JSON serialisable")


def _is_record(value: Any) -> bool:
    return isinstance(value, (dict, BaseModel)) or (dataclasses.is_dataclass(value) and not isinstance(value, type))


def _records_in(value: Any) -> tuple[str, list[Any]] | None:
    """The list of records in a response: the response itself, or its largest list of records two levels down."""
    if isinstance(value, list):
        return ("", value) if value and all(_is_record(item) for item in value) else None
    if not isinstance(value, dict):
        return None
    best: tuple[str, list[Any]] | None = None
    for key, item in value.items():
        found = _records_in(item) if isinstance(item, list) else None
        if found is None and isinstance(item, dict):
            for inner_key, inner in item.items():
                if isinstance(inner, list) and inner and all(_is_record(x) for x in inner):
                    if best is None or len(inner) > len(best[1]):
                        best = (f"{key}.{inner_key}", inner)
        elif found is not None and (best is None or len(found[1]) > len(best[1])):
            best = (str(key), found[1])
    return best


def route(value: Any, *, files: Files, threshold: int, always_offload: bool = False) -> Routed:
    """Inline when the serialised response is at most `threshold` bytes (and not `always_offload`), else offload."""
    if isinstance(value, str):
        if len(value) <= threshold and not always_offload:
            return Routed(data=value)
        return Routed(data=value if len(value) <= threshold else None, offload=_offload_text(value, files))
    found = _records_in(value)
    if found is not None and found[0] == "":
        parts = [dumps(record) for record in value]
        size = sum(map(len, parts)) + len(parts) + 1
        inline = size <= threshold
        data = orjson.loads(b"[" + b",".join(parts) + b"]") if inline else None
        if inline and not always_offload:
            return Routed(data=data)
        return Routed(data=data, offload=_offload_records(parts, files))
    body = dumps(value)
    inline = len(body) <= threshold
    data = orjson.loads(body) if inline else None
    if inline and not always_offload:
        return Routed(data=data)
    return Routed(data=data, offload=_offload_json(body, value, found, files))


def _new_id() -> str:
    return f"resp_{secrets.token_hex(4)}"


def _offload_text(text: str, files: Files) -> OffloadEnvelope:
    rid = _new_id()
    path = f"{RESPONSES}/{rid}.txt"
    info = files.write(path, text.encode())
    return _fit(OffloadEnvelope(
        id=rid, path=path, format="text", bytes=info.size, preview=text[:300],
        hint=f'In the workbench: responses["{rid}"] is the full text ({len(text):,} characters).'))


def _offload_records(parts: list[bytes], files: Files) -> OffloadEnvelope:
    rid = _new_id()
    path = f"{RESPONSES}/{rid}.jsonl"
    info = files.write(path, _lines(parts))
    envelope = OffloadEnvelope(id=rid, path=path, format="jsonl", bytes=info.size, records_at="",
                               preview=parts[0].decode(errors="replace")[:400])
    count = len(parts)
    del parts[:]  # on disk now: free the serialised records before the table takes their room
    _add_table(envelope, files, path, count)
    return _fit(envelope)


def _offload_json(body: bytes, value: Any, found: tuple[str, list[Any]] | None, files: Files) -> OffloadEnvelope:
    rid = _new_id()
    path = f"{RESPONSES}/{rid}.json"
    info = files.write(path, body)
    envelope = OffloadEnvelope(id=rid, path=path, format="json", bytes=info.size, preview=body[:400].decode(
        errors="replace"))
    del body
    if isinstance(value, dict):
        envelope.columns = {str(k): _json_type(v) for k, v in value.items()}
    if found is not None:
        records_at, records = found
        envelope.records_at = records_at
        scratch = f"{RESPONSES}/{rid}.records.jsonl"
        files.write(scratch, _lines([dumps(record) for record in records]))
        try:
            _add_table(envelope, files, scratch, len(records))
        finally:
            files.remove(scratch)
    else:
        envelope.hint = f'In the workbench: responses["{rid}"] is the full response.'
    return _fit(envelope)


def _lines(parts: list[bytes]) -> Iterator[bytes]:
    for start in range(0, len(parts), _BATCH):
        yield b"\n".join(parts[start:start + _BATCH]) + b"\n"


def _add_table(envelope: OffloadEnvelope, files: Files, jsonl_path: str, count: int) -> None:
    """Read the records' JSON Lines with pyarrow and write them as an Arrow IPC file beside the response."""
    rid = envelope.id
    try:
        with files.open(jsonl_path) as handle:
            table = pajson.read_json(handle, read_options=pajson.ReadOptions(block_size=_BLOCK))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        envelope.table_error = f"no table: {exc}"
        envelope.hint = (f'In the workbench: responses["{rid}"] is the full response ({count:,} records; they '
                         "could not be made into one table).")
        return
    table_path = f"{RESPONSES}/{rid}.arrow"
    with files.writer(table_path) as out:
        with ipc.new_file(pa.PythonFile(out, mode="w"), table.schema) as writer:
            writer.write_table(table)
    envelope.table_path, envelope.records = table_path, table.num_rows
    envelope.columns = {field.name: str(field.type) for field in table.schema}
    where = f" (the records at {envelope.records_at!r} in the response)" if envelope.records_at else ""
    envelope.hint = (f'In the workbench: tables["{rid}"] is a DataFrame of {table.num_rows:,} rows{where}; '
                     f'responses["{rid}"] is the full response.')


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, (list, tuple)):
        return f"array[{len(value)}]"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float, Decimal)):
        return "number"
    return "null" if value is None else type(value).__name__


def _fit(envelope: OffloadEnvelope) -> OffloadEnvelope:
    """Cut the preview, then long type names, then columns, until the envelope fits in ENVELOPE_MAX bytes."""
    envelope.columns = {name[:60]: (kind if len(kind) <= 120 else kind[:117] + "...")
                        for name, kind in envelope.columns.items()}
    while len(envelope.model_dump_json()) > ENVELOPE_MAX:
        if len(envelope.preview) > 120:
            envelope.preview = envelope.preview[: len(envelope.preview) // 2] + "..."
        elif any(len(kind) > 40 for kind in envelope.columns.values()):
            envelope.columns = {n: k if len(k) <= 40 else k[:37] + "..." for n, k in envelope.columns.items()}
        elif envelope.columns:
            last = next(reversed(envelope.columns))
            del envelope.columns[last]
            envelope.columns_omitted += 1
        elif envelope.table_error and len(envelope.table_error) > 200:
            envelope.table_error = envelope.table_error[:200] + "..."
        else:
            envelope.preview = ""
            break
    return envelope
