"""The README's examples run as written, against the real engine; and its Python examples a second time against a
real `workbench serve`, with `Workbench` changed to `RemoteWorkbench` and nothing else."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scripted_model import scripted_model
from served import Server

from workbench import Workbench

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README.read_text(), flags=re.S)
EXAMPLES = [(lang, code) for lang, code in BLOCKS if "workbench" in code and "pip install" not in code]
# every Python example of the API runs again against a server; not the one that starts `workbench mcp` over stdio,
# which serves a session of a local home to a desktop client (there is no server in that picture)
LOCAL = [code for lang, code in EXAMPLES if lang == "python" and re.search(r"\b(Async)?Workbench\(", code)
         and '"mcp", "--session"' not in code]


def run_example(lang: str, code: str, env: dict[str, str], cwd: Path) -> None:
    command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    if lang == "bash":  # the `workbench` script of this interpreter's environment
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    with scripted_model() as model:  # the agent loops' OpenAI() and Anthropic() talk to a scripted model
        proc = subprocess.run(command, cwd=cwd, env={**env, **model}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    if "OpenAI()" in code or "Anthropic()" in code:
        assert proc.stdout.strip().endswith("Paris brings the most revenue (2 files in .responses)"), proc.stdout


@pytest.mark.parametrize(("lang", "code"), EXAMPLES, ids=[f"{lang}-{i}" for i, (lang, _) in enumerate(EXAMPLES)])
def test_readme_example_runs(lang: str, code: str, wb: Workbench, home: Path, tmp_path: Path, served: Server,
                             api_key: str) -> None:
    env = {**os.environ, "WORKBENCH_HOME": str(home), "WORKBENCH_URL": served.url, "WORKBENCH_API_KEY": api_key}
    run_example(lang, code, env, tmp_path)


@pytest.mark.parametrize("code", LOCAL, ids=[f"remote-{i}" for i in range(len(LOCAL))])
def test_readme_example_runs_against_a_server(code: str, served: Server, api_key: str, tmp_path: Path) -> None:
    """The one change: `Workbench` -> `RemoteWorkbench` (and `AsyncWorkbench` -> `AsyncRemoteWorkbench`). The
    server is `workbench serve --app readme_app:make`, whose Workbench registers the README's own tool functions
    (tools run where the server runs; the remote `@wb.tool` checks that the server has them)."""
    remote = re.sub(r"\b(Async)?Workbench\b", lambda m: f"{m.group(1) or ''}RemoteWorkbench", code)
    assert remote != code
    env = {**os.environ, "WORKBENCH_URL": served.url, "WORKBENCH_API_KEY": api_key,
           "WORKBENCH_HOME": str(tmp_path / "no-home-here")}  # nothing local: all of it goes through the server
    run_example("python", remote, env, tmp_path)
