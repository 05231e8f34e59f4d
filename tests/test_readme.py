"""The README's examples run as written, against the real engine."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scripted_model import scripted_model

from workbench import Workbench

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README.read_text(), flags=re.S)
EXAMPLES = [(lang, code) for lang, code in BLOCKS if "workbench" in code and "pip install" not in code]


@pytest.mark.parametrize(("lang", "code"), EXAMPLES, ids=[f"{lang}-{i}" for i, (lang, _) in enumerate(EXAMPLES)])
def test_readme_example_runs(lang: str, code: str, wb: Workbench, home: Path, tmp_path: Path) -> None:
    env = {**os.environ, "WORKBENCH_HOME": str(home)}
    command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    if lang == "bash":  # the `workbench` script of this interpreter's environment
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    with scripted_model() as model:  # the agent loops' OpenAI() and Anthropic() talk to a scripted model
        proc = subprocess.run(command, cwd=tmp_path, env={**env, **model}, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    if "OpenAI()" in code or "Anthropic()" in code:
        assert proc.stdout.strip().endswith("Paris brings the most revenue (2 files in .responses)"), proc.stdout
