"""`workbench demo`: a short session that shows what workbench is for — a kernel that keeps its state, a tool's
large response kept out of the model's context and queried in the sandbox, tools called in bulk from a cell, and
the meta tools as a model calls them."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.panel import Panel

from .client import Workbench
from .session import Session

CITIES = ["Lyon", "Oslo", "Quito", "Perth", "Dakar", "Lima", "Hanoi", "Turin"]


def demo_workbench() -> Workbench:
    """A workbench with two made-up tools; real ones would call a service with credentials kept on the host."""
    wb = Workbench(pool_size=0)

    @wb.tool(slug="WEATHER_HISTORY", toolkit="weather")
    def history(city: str, days: int = 3650) -> list[dict[str, Any]]:
        """Daily temperatures of a city over the past `days` days."""
        return [{"day": d, "city": city, "temp_c": round(12 + 10 * ((d * 37) % 100) / 100 - 5, 1)}
                for d in range(days)]

    @wb.tool(slug="WEATHER_NOW", toolkit="weather")
    def now(city: str) -> dict[str, Any]:
        """The current temperature of a city."""
        return {"city": city, "temp_c": round((sum(map(ord, city)) % 35) - 5.0, 1)}

    return wb


def open_demo_session(progress: Callable[[str], None]) -> Session:
    """Build the image when needed and open the demo's session."""
    wb = demo_workbench()
    wb.build_image(progress=progress)
    started = time.monotonic()
    session = wb.create(user_id="demo-user", toolkits=["weather"], metadata={"x-correlation-id": "demo"})
    progress(f"session {session.session_id} ready in {time.monotonic() - started:.2f}s")
    return session


def run_demo(session: Session) -> None:
    """Run the demo's steps, print what each gave, close the session."""
    out = Console()

    def cell(title: str, code: str) -> None:
        if title:
            out.rule(title)
        result = session.execute(code)
        out.print(Panel(code, title="cell", title_align="left", border_style="dim"))
        out.print(str(result) or "(no output)", markup=False)
        out.print(f"[dim]{result.duration * 1000:.1f} ms[/dim]")

    def model_call(title: str, name: str, arguments: dict[str, Any]) -> str:
        out.rule(title)
        out.print(Panel(f"{name}({json.dumps(arguments)})", title="a model calls", title_align="left",
                        border_style="dim"), markup=False)
        started = time.monotonic()
        answer = session.handle_tool_call(name, arguments)
        out.print(answer, markup=False)
        out.print(f"[dim]{(time.monotonic() - started) * 1000:.1f} ms, {len(answer):,} characters for the model"
                  "[/dim]")
        return answer

    try:
        cell("a variable, kept across cells", "answer = 41")
        cell("", "answer + 1")
        out.rule("a tool's large response stays out of the model's context")
        big = session.execute_tool("WEATHER_HISTORY", {"city": "Lyon"})
        assert big.offload is not None
        out.print(f"{big.offload.bytes:,} bytes of JSON went to /workspace/{big.offload.path}; the model reads "
                  f"{len(str(big)):,} characters:", markup=False)
        out.print(str(big), markup=False)
        cell("", f"df = tables[{big.offload.id!r}]\ndf.temp_c.describe().round(1).to_dict()")
        cell("tools in bulk from a cell (through the host: no network, no credential in the sandbox)",
             f"now = run_tools([('WEATHER_NOW', {{'city': c}}) for c in {CITIES!r}], as_table=True, progress=False)\n"
             "now.sort_values('temp_c').tail(3)[['city', 'temp_c']]")
        answer = model_call("meta tools, as a model calls them", "WORKBENCH_MULTI_EXECUTE_TOOL", {"tools": [
            {"tool_slug": "WEATHER_HISTORY", "arguments": {"city": "Oslo"}},
            {"tool_slug": "WEATHER_NOW", "arguments": {"city": "Oslo"}}]})
        rid = json.loads(answer)["results"][0]["offload"]["id"]
        model_call("", "WORKBENCH_REMOTE_WORKBENCH",
                   {"code_to_execute": f"t = tables[{rid!r}]\nprint(len(t), 'days')\nt.temp_c.max()"})
        model_call("", "WORKBENCH_REMOTE_BASH_TOOL", {"command": "ls -1 .responses | head -4"})
        cell("an error comes back as data", "1 / 0")
    finally:
        session.close(delete_workspace=True)
        out.print("session closed, its container and workspace removed", soft_wrap=True)
