"""Boundaries are enforced by import-linter's contracts (``[tool.importlinter]`` in pyproject.toml),
not by a list kept here:

- layers: cli > bench > app (wiring) > api (HTTP) > pipeline > features > store > core, with
  every module of ``zumik_serve`` placed in one (``exhaustive``: a new package fails until placed);
- only store modules import redis; only ``api/`` imports FastAPI/Starlette; only wiring and the
  engine replica import Ray, vLLM or torch; ``profiles`` and ``kvstore`` never import zumik_serve.

The checks below run the real tool on the tree, then on a copy with a planted leak, so a contract
that stopped catching anything would fail here too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "250"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for name in ("zumik_serve", "kvstore", "profiles"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_tree_keeps_every_contract() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "source", "contract"),
    [
        ("zumik_serve/pipeline/leak.py", "import redis\n", "Only store modules talk to Redis"),
        ("zumik_serve/state/leak.py", "from fastapi import Request\n", "web framework"),
        ("zumik_serve/routing/leak.py", "import ray\n", "Ray, vLLM and torch"),
        ("zumik_serve/reuse/leak.py", "from zumik_serve.pipeline import pipeline\n", "Layers"),
        ("zumik_serve/newfeature/__init__.py", "from zumik_serve import errors\n", "Layers"),
        ("kvstore/leak.py", "import zumik_serve.errors\n", "stand on their own"),
    ],
)
def test_a_planted_leak_breaks_its_contract(tree_copy: Path, module: str, source: str, contract: str) -> None:
    path = tree_copy / module
    path.parent.mkdir(exist_ok=True)
    path.write_text(source)
    try:
        result = _lint(tree_copy)
    finally:
        path.unlink()
        if path.parent.name == "newfeature":
            shutil.rmtree(path.parent)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), result.stdout
