"""The app each replica of the tests' cluster serves: a Workbench on the store WORKBENCH_STORE names (the
cluster's Postgres) or, without it, on the SQLite file WORKBENCH_TEST_STORE (one host's processes may share it)."""
from __future__ import annotations

import os
from pathlib import Path

from workbench import Workbench
from workbench.store import SQLiteStore, Store


def make() -> Workbench:
    path = os.environ.get("WORKBENCH_TEST_STORE")
    store: Store | None = SQLiteStore(Path(path)) if path else None
    return Workbench(store=store, pool_size=0, idle_timeout=None)
