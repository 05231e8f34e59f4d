"""Where the sandbox side (kernels/) and the image recipe (images/) are found: the source tree, or the wheel."""
from __future__ import annotations

from pathlib import Path


def assets_root() -> Path:
    """The folder holding `images/` and `kernels/`."""
    here = Path(__file__).resolve().parent
    for root in (here.parent, here / "_assets"):
        if (root / "images" / "kernel" / "Dockerfile").is_file() and (root / "kernels" / "python").is_dir():
            return root
    raise FileNotFoundError("workbench's images/ and kernels/ folders are missing from this installation")
