"""The app each replica of the tests' cluster serves: a Workbench on the cluster's shared store."""
from __future__ import annotations

import os
from pathlib import Path

from workbench import Workbench
from workbench.store import SQLiteStore


def make() -> Workbench:
    return Workbench(store=SQLiteStore(Path(os.environ["WORKBENCH_TEST_STORE"])), pool_size=0, idle_timeout=None)
