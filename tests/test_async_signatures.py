"""The async twins take exactly the parameters of the sync API, with the same defaults (no untyped **kwargs)."""
from __future__ import annotations

import inspect

import pytest

from workbench import AsyncFiles, AsyncSession, AsyncWorkbench, Files, Session, Workbench
from workbench.aio import AsyncCommands
from workbench.commands import Commands

PAIRS = [(Workbench, AsyncWorkbench), (Session, AsyncSession), (Files, AsyncFiles), (Commands, AsyncCommands)]
ONLY_ASYNC = {"max_threads"}  # AsyncWorkbench's own thread pool


def _public(cls: type) -> dict[str, object]:
    return {name: member for name, member in inspect.getmembers(cls)
            if not name.startswith("_") and callable(member) and not isinstance(member, type)}


@pytest.mark.parametrize(("sync", "twin"), PAIRS, ids=[t.__name__ for _, t in PAIRS])
def test_every_twin_method_matches_its_sync_signature(sync: type, twin: type) -> None:
    methods = _public(twin) | ({"__init__": twin.__init__} if twin is AsyncWorkbench else {})
    assert methods, twin
    for name, method in methods.items():
        assert hasattr(sync, name), f"{twin.__name__}.{name} has no sync twin"
        theirs = inspect.signature(getattr(sync, name)).parameters
        ours = {k: v for k, v in inspect.signature(method).parameters.items() if k not in ONLY_ASYNC}
        assert not any(p.kind is p.VAR_KEYWORD for p in ours.values()), f"{twin.__name__}.{name} takes **kwargs"
        assert [_shape(p) for p in ours.values()] == [_shape(p) for p in theirs.values()], f"{twin.__name__}.{name}"


def _shape(p: inspect.Parameter) -> tuple[str, object, object]:
    return p.name, p.kind, "<a function>" if callable(p.default) else p.default  # (a lambda default each side)
