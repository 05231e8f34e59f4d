"""`workbench demo`: a short session that shows what a kernel keeps between cells."""
from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.panel import Panel

from .client import Workbench
from .session import Session

CELLS = [
    ("a variable, kept across cells", "answer = 41"),
    ("", "answer + 1"),
    ("a file written in the workspace and read back",
     "from pathlib import Path\nPath('notes.txt').write_text('kept in the workspace\\n')\n"
     "print(Path('notes.txt').read_text(), end='')"),
    ("a pandas table",
     "import pandas as pd\n"
     "df = pd.DataFrame({'city': ['Lyon', 'Oslo', 'Quito'], 'temp_c': [14.5, 3.2, 19.8]})\n"
     "df.sort_values('temp_c')"),
    ("an error comes back as data", "1 / 0"),
]


def open_demo_session(progress: Callable[[str], None]) -> Session:
    """Build the image when needed and open the demo's session."""
    wb = Workbench(pool_size=0)
    wb.build_image(progress=progress)
    started = time.monotonic()
    session = wb.create(user_id="demo-user")
    progress(f"session {session.session_id} ready in {time.monotonic() - started:.2f}s")
    return session


def run_demo(session: Session) -> None:
    """Run the demo's cells, print what each gave, close the session."""
    out = Console()
    try:
        for title, code in CELLS:
            if title:
                out.rule(title)
            result = session.execute(code)
            out.print(Panel(code, title="code", title_align="left", border_style="dim"))
            out.print(str(result) or "(no output)", markup=False)
            out.print(f"[dim]{result.duration * 1000:.1f} ms[/dim]")
    finally:
        session.close(delete_workspace=True)
        out.print("session closed, its container and workspace removed", soft_wrap=True)
