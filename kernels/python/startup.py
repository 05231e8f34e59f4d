"""Run by ipykernel in the user namespace before the first cell (IPKernelApp.exec_files)."""
from workbench_sandbox import _prepare_environment, responses, tables  # noqa: F401  (preloaded globals)

_prepare_environment()
del _prepare_environment
