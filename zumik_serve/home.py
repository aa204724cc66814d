"""Where Zumik keeps its files on a machine: ``ZUMIK_HOME`` (default ``~/.zumik``).

$ZUMIK_HOME/
  models/tiny/     the built-in tiny model (built on first use)
  redis/           the embedded redis-server's data directory (AOF files)
  run/             files describing what is running now (redis.json)
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
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def ensure(self) -> ZumikHome:
        for folder in (self.root, self.models_dir, self.redis_dir, self.run_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self
