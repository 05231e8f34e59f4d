"""The `workbench` command line."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
from rich.console import Console

from .errors import WorkbenchError

console = Console(stderr=True, highlight=False)


@contextmanager
def progress_printer() -> Iterator[Callable[[str], None]]:
    """A progress callback: steps are printed, details (indented lines) update a spinner."""
    started = time.monotonic()
    with console.status("working") as status:
        def show(line: str) -> None:
            if line.startswith("  "):
                status.update(f"[dim]{line.strip()[:100]}[/dim]")
            else:
                console.print(f"[dim]{time.monotonic() - started:6.1f}s[/dim] {line}")
        yield show


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except WorkbenchError as exc:
            console.print(f"[red]error:[/red] {exc}")
            sys.exit(1)


@click.group(cls=_Group)
def main() -> None:
    """workbench: sandboxed Jupyter kernels in Docker for AI agents."""


@main.group()
def image() -> None:
    """The kernel image."""


@image.command("build")
@click.option("--force", is_flag=True, help="Rebuild even when the image is up to date.")
def image_build(force: bool) -> None:
    """Build the kernel image (and the Debian base image when it is missing)."""
    from .client import Workbench

    wb = Workbench()
    with progress_printer() as progress:
        wb.build_image(progress=progress, force=force)


@image.command("status")
def image_status() -> None:
    """Whether the kernel image is missing, stale or current."""
    from .config import DEFAULT_IMAGE
    from .docker_client import connect
    from .image import image_status as status

    click.echo(f"{DEFAULT_IMAGE}: {status(connect(), DEFAULT_IMAGE)}")


@main.command()
def demo() -> None:
    """Build the image when needed, open a session, run a few cells and print what they gave."""
    from .demo import open_demo_session, run_demo

    with progress_printer() as progress:
        session = open_demo_session(progress)
    run_demo(session)


if __name__ == "__main__":
    main()
