"""Where Zumik keeps its files on a machine: ``ZUMIK_HOME`` (default ``~/.zumik``).

$ZUMIK_HOME/
  models/tiny/          the built-in model builtin:tiny (built on first use)
  models/tiny-b/        the second built-in model builtin:tiny-b (built on first use)
  models/tiny-wide/     builtin:tiny-wide, heavier prefill for benches (built on first use)
  adapters/tiny-lora/   builtin:tiny-lora, a LoRA adapter of builtin:tiny (built on first use)
  redis/                the embedded redis-server's data directory (AOF files)
  run/                  files describing what is running now (redis.json)
  secrets/              the embedded default's generated secrets, 0600 (see secret_files.py)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ZumikHome:
    root: Path

    @classmethod
    def from_env(cls) -> ZumikHome:
        return cls(Path(os.environ.get("ZUMIK_HOME") or Path.home() / ".zumik").expanduser())

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def tiny_model_dir(self) -> Path:
        return self.models_dir / "tiny"

    @property
    def tiny_b_model_dir(self) -> Path:
        return self.models_dir / "tiny-b"

    @property
    def tiny_wide_model_dir(self) -> Path:
        return self.models_dir / "tiny-wide"

    @property
    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    @property
    def tiny_lora_adapter_dir(self) -> Path:
        return self.adapters_dir / "tiny-lora"

    @property
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def ensure(self) -> ZumikHome:
        """Create the folders, owner-only (0700): the home holds the embedded Redis's data and the
        secrets, and nothing in it is meant for another user of the machine."""
        for folder in (self.root, self.models_dir, self.redis_dir, self.run_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            if folder.stat().st_mode & 0o077:
                folder.chmod(0o700)
        return self
