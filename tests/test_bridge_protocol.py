"""The bridge protocol is written once on each side of the sandbox line: the two copies must agree."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from workbench.tools import protocol as host
from workbench.tools.protocol import BadRequest, parse_request

SANDBOX = Path(__file__).resolve().parents[1] / "kernels" / "python" / "workbench_sandbox" / "protocol.py"


def test_the_sandbox_side_agrees_with_the_host_side() -> None:
    spec = importlib.util.spec_from_file_location("sandbox_protocol", SANDBOX)
    assert spec is not None and spec.loader is not None
    sandbox = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sandbox)
    for name in ("VERSION", "SANDBOX_PATH", "HEADER", "MAX_REQUEST", "MAX_ID", "ERROR_KINDS"):
        assert getattr(sandbox, name) == getattr(host, name), name


@pytest.mark.parametrize("payload, message", [
    (b"\xff", "not JSON"),
    (b"[]", "JSON object"),
    (b'{"v": 2, "id": 1, "op": "call"}', "needs a tool slug"),
    (b'{"v": 1, "id": 1, "op": "list"}', "v:"),
    (b'{"v": 2, "id": 1, "op": "call", "slug": "A", "extra": 1}', "extra"),
    (b'{"v": 2, "id": 1, "op": "call", "slug": "A", "sync_to_workbench": "yes"}', "sync_to_workbench"),
    (b'{"v": 2, "id": 1, "op": "call", "slug": "A", "arguments": []}', "arguments"),
    (b'{"v": 2, "id": 1, "op": "call", "slug": "A", "timeout": -1}', "timeout"),
    (b'{"v": 2, "id": 123456789012345678901234567890, "op": "list"}', "id"),
])
def test_bad_requests_are_refused_without_echoing_them(payload: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as caught:
        parse_request(payload)
    assert len(str(caught.value)) < 400


def test_nothing_in_an_error_repeats_the_input() -> None:
    slug = "S" * (7 << 20)
    with pytest.raises(BadRequest) as caught:
        parse_request(json.dumps({"v": 2, "id": "x" * 100, "op": "call", "slug": slug}).encode())
    assert len(str(caught.value)) < 400 and caught.value.request_id is None  # an id too long is not echoed
    assert len(host.encode(host.error_reply(None, "bad_request", "y" * 10_000))) < 2200


def test_timeouts_are_bounded_by_the_hosts() -> None:
    assert host.bounded_timeout(None, 60) == 60
    assert host.bounded_timeout(3e6, 60) == 60
    assert host.bounded_timeout(0.5, 60) == 0.5
    assert host.bounded_timeout(float("nan"), 60) == 60
    assert host.bounded_timeout(float("inf"), 60) == 60


def test_a_request_of_millions_of_containers_is_refused_before_parsing() -> None:
    payload = b'{"v": 2, "id": 1, "op": "call", "slug": "A", "arguments": {"x": [' + b"[]," * 2_000_000 + b"[]]}}"
    with pytest.raises(BadRequest, match="lists and objects"):
        parse_request(payload)
    parse_request(b'{"v": 2, "id": 1, "op": "call", "slug": "A", "arguments": {"x": [' + b"{}," * 50_000 + b"{}]}}")
