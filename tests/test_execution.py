"""Executing code: state kept between cells, outputs in every form, timeouts, death and restart."""
from __future__ import annotations

import base64
import time

from workbench import Session


def test_variables_functions_and_imports_persist(session: Session) -> None:
    assert session.execute("import math\ndef area(r):\n    return math.pi * r ** 2\nradius = 2").ok
    result = session.execute("round(area(radius), 3)")
    assert result.text == "12.566"
    assert result.error is None


def test_streams_results_and_execution_count(session: Session) -> None:
    first = session.execute("import sys\nprint('out'); print('err', file=sys.stderr)\n'value'")
    assert first.stdout == "out\n"
    assert first.stderr == "err\n"
    assert first.text == "'value'"
    assert [o.type for o in first.results] == ["execute_result"]
    second = session.execute("None")
    assert second.execution_count == first.execution_count + 1
    assert second.text is None and second.results == []


def test_display_data_keeps_png_as_base64(session: Session) -> None:
    result = session.execute(
        "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')\nplt.show()"
    )
    assert result.error is None, result.error
    pngs = [o for o in result.results if o.type == "display_data" and "image/png" in o.data]
    assert len(pngs) == 1
    assert base64.b64decode(pngs[0].data["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "text/plain" in pngs[0].data


def test_error_has_plain_traceback(session: Session) -> None:
    result = session.execute("def f():\n    raise ValueError('bad value')\nf()")
    assert result.error is not None and not result.ok
    assert result.error.ename == "ValueError"
    assert result.error.evalue == "bad value"
    assert any("raise ValueError" in line for line in result.error.traceback)
    assert not any("\x1b[" in line for line in result.error.traceback)
    assert "ValueError: bad value" in str(result)


def test_syntax_error_is_a_result(session: Session) -> None:
    result = session.execute("def broken(:\n    pass")
    assert result.error is not None and result.error.ename == "SyntaxError"
    assert session.execute("1 + 1").text == "2"


def test_callbacks_stream_while_the_cell_runs(session: Session) -> None:
    seen: list[tuple[float, str]] = []
    start = time.monotonic()
    result = session.execute(
        "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')\n7",
        on_stdout=lambda text: seen.append((time.monotonic() - start, text)),
        on_result=lambda output: seen.append((time.monotonic() - start, output.text)),
    )
    assert [text for _, text in seen] == ["first\n", "second\n", "7"]
    assert seen[0][0] < result.duration - 1.0  # the first line arrived long before the cell ended


def test_huge_output_is_cut_and_the_kernel_keeps_serving(fresh: Session) -> None:
    result = fresh.execute("print('x' * 100_000_000)\nprint('tail-marker')")
    assert result.error is None
    assert result.truncated["stdout"] > 98_000_000
    assert len(result.stdout) < 1_100_000
    assert result.stdout.startswith("xxx") and result.stdout.endswith("tail-marker\n")
    assert "characters cut" in result.stdout
    # the whole stream went to a workspace file, which the kernel can read
    spilled = result.spilled["stdout"]
    assert spilled.startswith(".outputs/") and f"/workspace/{spilled}" in result.stdout
    assert fresh.files.list(spilled)[0].size == 100_000_000 + 1 + len("tail-marker\n")
    assert fresh.execute(f"open({spilled!r}).read()[-12:]").text == repr("tail-marker\n")
    assert fresh.execute("2 + 2").text == "4"


def test_a_huge_result_is_cut_and_spilled_whole(fresh: Session) -> None:
    result = fresh.execute("'y' * 3_000_000 + 'END'")
    assert result.truncated["results[0].text/plain"] > 2_000_000
    assert result.text.startswith("'yyy") and result.text.endswith("END'") and len(result.text) < 1_100_000
    path = result.spilled["results[0].text/plain"]
    assert fresh.files.read(path) == ("'" + "y" * 3_000_000 + "END'").encode()


def test_timeout_interrupts_and_keeps_state(session: Session) -> None:
    session.execute("kept = 'still here'")
    result = session.execute("import time\nwhile True:\n    time.sleep(0.05)", timeout=1.5)
    assert result.timed_out
    assert result.error is not None and result.error.ename == "KeyboardInterrupt"
    assert not result.state_lost and result.kernel_died is None
    assert 1.5 <= result.duration < 5
    assert session.execute("kept").text == "'still here'"


def test_cell_ignoring_the_interrupt_gets_a_new_kernel(fresh: Session) -> None:
    fresh.execute("value = 1")
    (fresh.workspace / "kept.txt").write_text("file survives")
    result = fresh.execute(
        "import time\nwhile True:\n    try:\n        time.sleep(0.1)\n    except KeyboardInterrupt:\n        pass",
        timeout=1,
    )
    assert result.timed_out and result.state_lost
    assert "did not respond to the interrupt" in (result.kernel_died or "")
    assert fresh.execute("open('kept.txt').read()").text == "'file survives'"
    assert fresh.execute("value").error.ename == "NameError"


def test_kernel_death_is_detected_at_once_and_the_kernel_restarted(fresh: Session) -> None:
    fresh.execute("value = 42\nopen('before-death.txt', 'w').write('kept')")
    started = time.monotonic()
    result = fresh.execute("import os\nos._exit(3)", timeout=120)
    assert time.monotonic() - started < 10  # detected at once, not after the timeout
    assert result.kernel_died == "exited with code 3"
    assert result.state_lost
    assert "variables were lost" in str(result)
    assert fresh.execute("open('before-death.txt').read()").text == "'kept'"
    assert fresh.execute("value").error.ename == "NameError"
    assert fresh.execute("40 + 2").text == "42"
