"""A session's executions as a Jupyter notebook (nbformat v4).

Each execution's log entry keeps its code and its outputs in notebook form, bounded (`LOG_OUTPUTS` bytes per
execution; past that an output is replaced by a note naming its size), so that a notebook can be exported from
any process, also after the session was paused or its kernel replaced.
"""
from __future__ import annotations

from typing import Any

import nbformat
import orjson
from nbformat.validator import ValidationError

from .kernelspec import PYTHON, KernelSpec
from .results import ExecutionResult
from .store import LogEntry

LOG_OUTPUTS = 64 * 1024  # bytes of outputs (as JSON) kept in an execution's log entry
_NOT_RUN = {"not_started", "failed"}


def logged_outputs(result: ExecutionResult, budget: int = LOG_OUTPUTS) -> list[dict[str, Any]]:
    """A result's outputs as nbformat v4 output dicts, in the order a notebook shows them: stdout, stderr, rich
    outputs, the error. Each that does not fit in what is left of `budget` becomes a short note."""
    outputs: list[dict[str, Any]] = []
    if result.stdout:
        outputs.append({"output_type": "stream", "name": "stdout", "text": result.stdout})
    if result.stderr:
        outputs.append({"output_type": "stream", "name": "stderr", "text": result.stderr})
    for output in result.results:
        item: dict[str, Any] = {"output_type": output.type, "data": output.data, "metadata": output.metadata}
        if output.type == "execute_result":
            item["execution_count"] = result.execution_count
        outputs.append(item)
    if result.error is not None:
        outputs.append({"output_type": "error", "ename": result.error.ename, "evalue": result.error.evalue,
                        "traceback": result.error.traceback})
    kept = []
    for item in outputs:
        size = len(orjson.dumps(item, default=str))
        if size > budget:
            item = {"output_type": "stream", "name": "stderr",
                    "text": f"[a {item['output_type']} output of {size:,} bytes was too large to keep in the "
                            "session's log]\n"}
            size = len(orjson.dumps(item))
        budget -= size
        kept.append(item)
    return kept


def notebook_of(entries: list[LogEntry], session_id: str, spec: KernelSpec = PYTHON) -> str:
    """The notebook (as JSON text, validated) of a session's log entries: one code cell per execution that ran."""
    notebook = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"name": spec.name, "display_name": spec.display_name, "language": spec.language},
        "language_info": {"name": spec.language},
        "workbench": {"session_id": session_id},
    })
    for entry in entries:
        if entry.kind != "execution" or entry.status in _NOT_RUN:
            continue
        code = entry.detail.get("code")
        if not isinstance(code, str):
            continue
        count = entry.detail.get("execution_count")
        cell = nbformat.v4.new_code_cell(source=code, execution_count=count if isinstance(count, int) else None)
        cell.outputs = _valid_outputs(entry.detail.get("outputs"))
        notebook.cells.append(cell)
    nbformat.validate(notebook)
    text: str = nbformat.writes(notebook)
    return text


def _valid_outputs(outputs: Any) -> list[Any]:
    """The logged outputs that are valid nbformat outputs (a bundle the schema refuses is replaced by a note)."""
    if not isinstance(outputs, list):
        return []
    valid = []
    for item in outputs:
        try:
            output = nbformat.from_dict(item)
            nbformat.validate(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[output])]))
        except (ValidationError, TypeError, ValueError, AttributeError):
            output = nbformat.v4.new_output("stream", name="stderr", text="[an output that is not valid in a "
                                            "notebook was left out]\n")
        valid.append(output)
    return valid
