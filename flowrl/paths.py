"""Where shipped data lives: ``assets/`` at the repository root (editable installs)."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def assets_dir() -> Path:
    """The ``assets/`` folder: ``$FLOWRL_ASSETS`` if set, else ``<repo>/assets``."""
    env = os.environ.get("FLOWRL_ASSETS")
    path = Path(env) if env else REPO_ROOT / "assets"
    if not path.is_dir():
        raise FileNotFoundError(
            f"flowrl assets folder not found at {path}. Install flowrl from a checkout with "
            "`pip install -e .`, or set FLOWRL_ASSETS to the folder holding the shipped assets."
        )
    return path
