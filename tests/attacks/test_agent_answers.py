"""A model's answer written whole into the workspace goes nowhere else, whatever the sandbox planted there."""
from __future__ import annotations

from pathlib import Path

from workbench import Session


def test_a_planted_symlink_does_not_carry_an_answer_out_of_the_workspace(fresh: Session, tmp_path: Path) -> None:
    outside = tmp_path / "host-folder"
    outside.mkdir()
    fresh.execute(f"import os, shutil\nshutil.rmtree('.outputs', ignore_errors=True)\nos.symlink({str(outside)!r}, "
                  "'.outputs')")
    answer = fresh.handle_tool_call("WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "print('z' * 50_000)"})
    assert len(answer) <= 8_000
    assert "could not be written to the workspace" in answer
    assert list(outside.iterdir()) == []
    fresh.execute("os.remove('.outputs'); os.makedirs('.outputs/answers'); os.symlink('/etc/passwd', "
                  "'.outputs/answers/x')")
    answer = fresh.handle_tool_call("WORKBENCH_REMOTE_WORKBENCH", {"code_to_execute": "print('y' * 50_000)"})
    assert "all of it is in /workspace/.outputs/answers/" in answer  # a new file beside the planted link
    assert Path("/etc/passwd").read_text().startswith("root:")
