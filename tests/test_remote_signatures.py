"""The remote clients take exactly the parameters of the API they stand for, with the same defaults."""
from __future__ import annotations

import inspect

import pytest
from test_async_signatures import _public, _shape

from workbench import AsyncFiles, AsyncSession, AsyncWorkbench, Files, Session, Workbench
from workbench.aio import AsyncCommands
from workbench.commands import Commands
from workbench.remote import (
    AsyncRemoteCommands,
    AsyncRemoteFiles,
    AsyncRemoteSession,
    AsyncRemoteWorkbench,
    RemoteCommands,
    RemoteFiles,
    RemoteSession,
    RemoteWorkbench,
)

PAIRS = [(Workbench, RemoteWorkbench), (Session, RemoteSession), (Files, RemoteFiles), (Commands, RemoteCommands),
         (AsyncWorkbench, AsyncRemoteWorkbench), (AsyncSession, AsyncRemoteSession), (AsyncFiles, AsyncRemoteFiles),
         (AsyncCommands, AsyncRemoteCommands)]


@pytest.mark.parametrize(("local", "remote"), PAIRS, ids=[r.__name__ for _, r in PAIRS])
def test_every_remote_method_matches_the_local_one(local: type, remote: type) -> None:
    methods = _public(remote)
    assert methods, remote
    for name, method in methods.items():
        assert hasattr(local, name), f"{remote.__name__}.{name} has no local twin"
        theirs = [_shape(p) for p in inspect.signature(getattr(local, name)).parameters.values()]
        ours = [_shape(p) for p in inspect.signature(method).parameters.values()]
        assert ours == theirs, f"{remote.__name__}.{name}"
        assert inspect.iscoroutinefunction(method) == inspect.iscoroutinefunction(getattr(local, name)), name


LOCAL_ONLY = {  # what only makes sense beside the engine: its images, its gc, its Docker client, host paths
    "RemoteWorkbench": {"build_image", "gc"}, "AsyncRemoteWorkbench": {"build_image", "gc"},
    "RemoteSession": {"disconnect", "handle_bridge_request", "pause_if_idle"},
    "RemoteFiles": {"writer"},  # write() takes a file object or an iterator of chunks, streamed
}


@pytest.mark.parametrize(("local", "remote"), PAIRS, ids=[r.__name__ for _, r in PAIRS])
def test_every_local_method_has_a_remote_twin(local: type, remote: type) -> None:
    missing = set(_public(local)) - set(_public(remote)) - LOCAL_ONLY.get(remote.__name__, set())
    assert not missing, f"{remote.__name__} lacks {sorted(missing)}"
