"""Where Zumik keeps its files on a machine: ``ZUMIK_HOME`` (default ``~/.zumik``).

$ZUMIK_HOME/
  models/tiny/          the built-in model builtin:tiny (built on first use)
  models/tiny-b/        the second built-in model builtin:tiny-b (built on first use)
  adapters/tiny-lora/   builtin:tiny-lora, a LoRA adapter of builtin:tiny (built on first use)
  redis/                the embedded redis-server's data directory (AOF files)
  run/                  files describing what is running now (redis.json)
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
        for folder in (self.root, self.models_dir, self.redis_dir, self.run_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self
