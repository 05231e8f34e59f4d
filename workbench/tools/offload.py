"""Routing a tool's response: small ones inline, large ones into the session's workspace with a short envelope.

A large response is written on the host straight into `.responses/` of the workspace as JSON (plain text as
.txt); when it is, or holds, a list of records, an Arrow IPC file made by pyarrow's JSON reader goes beside
it. In the kernel, `responses[id]` and `tables[id]` load them lazily.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import secrets
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from decimal import Decimal
from pathlib import PurePath
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.json as pajson
from pydantic import BaseModel

from ..files import Files
from ..results import OffloadEnvelope

RESPONSES = ".responses"
ENVELOPE_MAX = 2048  # bytes of the serialised envelope
_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
_BATCH = 256 << 10  # bytes of records serialised by one orjson call
_CHUNK = 16 << 20  # bytes of records handed to pyarrow at once, parsed while the next are serialised
_BLOCK = 4 << 20  # pyarrow JSON reader's block size: fewer, larger blocks parse faster on few cores
_POOL = pa.system_memory_pool()  # malloc gives freed parse buffers back; mimalloc, the default, kept ~60 MiB more


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


def _all_records(items: list[Any]) -> bool:
    if not items:
        return False
    if set(map(type, items)) == {dict}:  # the common case, at C speed
        return True
    return all(map(_is_record, items))


def _is_record(value: Any) -> bool:
    return isinstance(value, (dict, BaseModel)) or (dataclasses.is_dataclass(value) and not isinstance(value, type))


def _records_in(value: Any) -> tuple[str, list[Any]] | None:
    """The list of records in a response: the response itself, or its largest list of records two levels down."""
    if isinstance(value, list):
        return ("", value) if _all_records(value) else None
    if not isinstance(value, dict):
        return None
    best: tuple[str, list[Any]] | None = None
    for key, item in value.items():
        found = _records_in(item) if isinstance(item, list) else None
        if found is None and isinstance(item, dict):
            for inner_key, inner in item.items():
                if isinstance(inner, list) and _all_records(inner) and (best is None or len(inner) > len(best[1])):
                    best = (f"{key}.{inner_key}", inner)
        elif found is not None and (best is None or len(found[1]) > len(best[1])):
            best = (str(key), found[1])
    return best


def route(value: Any, *, files: Files, threshold: int, sync_to_workbench: bool = False) -> Routed:
    """Inline when the serialised response is at most `threshold` bytes (and not `sync_to_workbench`), else offload."""
    if isinstance(value, str):
        if len(value) <= threshold and not sync_to_workbench:
            return Routed(data=value)
        return Routed(data=value if len(value) <= threshold else None, offload=_offload_text(value, files))
    found = _records_in(value)
    if found is not None and found[0] == "":
        batches = _batches(value)
        head: list[bytes] = []
        size = 0
        for batch in batches:  # serialise only until the response is known to be too large to be inline
            head.append(batch)
            size += len(batch)
            if size > threshold:
                return Routed(offload=_offload_records(value, head, batches, files))
        data = orjson.loads(_array(head))
        if not sync_to_workbench:
            return Routed(data=data)
        return Routed(data=data, offload=_offload_records(value, head, iter([]), files))
    body = dumps(value)
    inline = len(body) <= threshold
    data = orjson.loads(body) if inline else None
    if inline and not sync_to_workbench:
        return Routed(data=data)
    return Routed(data=data, offload=_offload_json(body, value, found, files))


def _batches(records: list[Any]) -> Iterator[bytes]:
    """The records serialised as JSON arrays of about _BATCH bytes each (one orjson call per batch is ten
    times faster than one per record)."""
    start, count, size = 0, 16, 0
    while start < len(records):
        batch = dumps(records[start:start + count])
        start += count
        size += len(batch)
        yield batch
        count = max(1, min(10_000, int(_BATCH / max(size / start, 1))))


def _array(batches: list[bytes]) -> bytes:
    return b"[" + b",".join(batch[1:-1] for batch in batches) + b"]"


def _new_id() -> str:
    return f"resp_{secrets.token_hex(4)}"


def _offload_text(text: str, files: Files) -> OffloadEnvelope:
    rid = _new_id()
    path = f"{RESPONSES}/{rid}.txt"
    info = files.write(path, text.encode())
    return _fit(OffloadEnvelope(
        id=rid, path=path, format="text", bytes=info.size, preview=text[:300],
        hint=f'In the workbench: responses["{rid}"] is the full text ({len(text):,} characters).'))


def _offload_records(records: list[Any], head: list[bytes], rest: Iterator[bytes], files: Files) -> OffloadEnvelope:
    rid = _new_id()
    path = f"{RESPONSES}/{rid}.json"
    envelope = OffloadEnvelope(id=rid, path=path, format="json", bytes=0, records_at="",
                               preview=dumps(records[0]).decode(errors="replace")[:400])
    envelope.bytes, table, error = _write_records(head, rest, files, path)
    _describe_table(envelope, files, table, error, len(records))
    return _fit(envelope)


def _write_records(head: list[bytes], rest: Iterator[bytes], files: Files,
                   path: str | None) -> tuple[int, pa.Table | None, str | None]:
    """Write the records' batches as one JSON array (when given a path) while pyarrow parses them, chunk by
    chunk, on the other cores (it releases the GIL) as the next batches are serialised. Returns the bytes
    written, and the table or why there is none."""
    parsing: list[Future[pa.Table]] = []
    with ThreadPoolExecutor(1, thread_name_prefix="workbench-arrow") as parser, contextlib.ExitStack() as stack:
        out = stack.enter_context(files.writer(path)) if path else None
        first = True
        for chunk in _chunks(itertools.chain(head, rest)):
            if len(parsing) >= 1:
                wait([parsing[-1]])  # one chunk parses while the next is serialised: memory stays bounded
            parsing.append(parser.submit(_parse, chunk))
            if out is not None:
                for batch in chunk:
                    out.write(b"[" if first else b",")
                    out.write(memoryview(batch)[1:-1])
                    first = False
            del chunk
        if out is not None:
            out.write(b"[]" if first else b"]")
        written = out.written if out is not None else 0
        try:
            tables = [future.result() for future in parsing]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            return written, None, f"no table: {exc}"
    try:
        return written, pa.concat_tables(tables, promote_options="permissive"), None
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        return written, None, f"no table: the records' types disagree between parts of the response: {exc}"


def _chunks(batches: Iterator[bytes]) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    size = 0
    for batch in batches:
        chunk.append(batch)
        size += len(batch)
        if size >= _CHUNK:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _parse(chunk: list[bytes]) -> pa.Table:
    """pyarrow's JSON reader wants one object per line: each batch becomes {"r": [records...]}, then flattened."""
    lines = b"\n".join(b'{"r":' + batch + b"}" for batch in chunk)
    block = max(_BLOCK, 2 * max(map(len, chunk)) + 64)  # a line must fit in one block
    table = pajson.read_json(pa.BufferReader(lines), read_options=pajson.ReadOptions(block_size=block),
                            memory_pool=_POOL)
    records = pc.list_flatten(table.column("r"), memory_pool=_POOL)
    return pa.Table.from_batches([pa.RecordBatch.from_struct_array(c) for c in records.chunks if len(c)])


def _offload_json(body: bytes, value: Any, found: tuple[str, list[Any]] | None, files: Files) -> OffloadEnvelope:
    rid = _new_id()
    path = f"{RESPONSES}/{rid}.json"
    info = files.write(path, body)
    envelope = OffloadEnvelope(id=rid, path=path, format="json", bytes=info.size,
                               preview=body[:400].decode(errors="replace"))
    if isinstance(value, dict):
        envelope.columns = {str(k): _json_type(v) for k, v in value.items()}
    if found is None:
        envelope.hint = f'In the workbench: responses["{rid}"] is the full response.'
        return _fit(envelope)
    envelope.records_at = found[0]
    _, table, error = _write_records([], _batches(found[1]), files, None)
    _describe_table(envelope, files, table, error, len(found[1]))
    return _fit(envelope)


def _describe_table(envelope: OffloadEnvelope, files: Files, table: pa.Table | None, error: str | None,
                    count: int) -> None:
    """Write the table as an Arrow IPC file beside the response and describe it, or say why there is none."""
    rid = envelope.id
    if table is None:
        envelope.table_error = error
        envelope.hint = (f'In the workbench: responses["{rid}"] is the full response ({count:,} records; they '
                         "could not be made into one table).")
        return
    table_path = f"{RESPONSES}/{rid}.arrow"
    with files.writer(table_path) as out, ipc.new_file(pa.PythonFile(out, mode="w"), table.schema) as writer:
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
    # no more columns than could ever fit (each takes at least 6 bytes): the loop below stays short
    kept = itertools.islice(envelope.columns.items(), ENVELOPE_MAX // 6)
    envelope.columns_omitted += max(0, len(envelope.columns) - ENVELOPE_MAX // 6)
    envelope.columns = {name[:60]: (kind if len(kind) <= 120 else kind[:117] + "...") for name, kind in kept}
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
