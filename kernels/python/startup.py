"""Run by ipykernel in the user namespace before the first cell (IPKernelApp.exec_files)."""
from workbench_sandbox import (  # noqa: F401  (preloaded globals: see help(run_tools))
    Offloaded,
    ToolError,
    _prepare_environment,
    list_tools,
    responses,
    run_tool,
    run_tools,
    tables,
    tool_schema,
)
from workbench_sandbox.streams import split_large_streams

_prepare_environment()
del _prepare_environment

split_large_streams()  # a print past 32 MiB still reaches the host, in parts
del split_large_streams

from workbench_sandbox.state import mark_baseline  # noqa: E402

mark_baseline()  # what is defined up to here is not the user's: session.pause() does not save it
del mark_baseline
