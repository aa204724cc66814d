"""Where a profile's weights live on this machine, building the tiny model when needed."""

from __future__ import annotations

from pathlib import Path

from profiles import TINY_MODEL_SOURCE, Profile
from zumik_serve.home import ZumikHome
from zumik_serve.model.tiny import build_tiny_model, is_model_dir


class ModelSourceError(ValueError):
    pass


def resolve_model_dir(profile: Profile, home: ZumikHome) -> Path:
    source = profile.model.source
    if source == TINY_MODEL_SOURCE:
        if not is_model_dir(home.tiny_model_dir):
            build_tiny_model(home.tiny_model_dir)
        return home.tiny_model_dir
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ModelSourceError(
            f"profile {profile.name}: model.source {source!r} is not a local Hugging Face model "
            "directory (no config.json); nothing is downloaded from a model hub"
        )
    return path
