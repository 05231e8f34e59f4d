"""Helpers preloaded in every workbench kernel. Runs inside the sandbox only; never imported by the host."""
from __future__ import annotations

import os
import shutil

from .responses import responses, tables
from .tools import Offloaded, ToolError, list_tools, run_tool, run_tools, tool_schema

__all__ = ["Offloaded", "ToolError", "list_tools", "responses", "run_tool", "run_tools", "tables", "tool_schema"]

_MPL_CACHE = "/opt/workbench/mplcache"


def _prepare_environment() -> None:
    # The root filesystem is read-only: seed matplotlib's font cache (built into the image) into the
    # writable config dir so the first plot does not rebuild it.
    target = os.environ.get("MPLCONFIGDIR")
    if target and os.path.isdir(_MPL_CACHE) and not os.path.exists(target):
        shutil.copytree(_MPL_CACHE, target)
