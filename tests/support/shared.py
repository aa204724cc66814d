"""Finding ../shared (the project's reference data). A user's clone has none: callers skip."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path | None:
    candidates = [os.environ.get("ZUMIK_SHARED_DIR"), REPO_ROOT.parent / "shared"]
    for candidate in candidates:
        if candidate and Path(candidate, "data").is_dir():
            return Path(candidate)
    return None


def openai_spec_path() -> Path | None:
    root = shared_dir()
    path = root / "data" / "openai" / "openapi.yaml" if root else None
    return path if path and path.is_file() else None
