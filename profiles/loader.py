"""Loading profiles from YAML: built-in ones by name, others by path, errors naming the field."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from profiles.model import Profile

BUILTIN_PACKAGE = "profiles.builtin"
DEFAULT_PROFILE = "local-cpu"


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file and every bad field."""


def load_profile(path: str | Path) -> Profile:
    """Load and validate a profile YAML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"profile {path}: cannot read file: {exc.strerror}") from exc
    return parse_profile(text, source=str(path))


def load_builtin(name: str) -> Profile:
    """Load a profile shipped in ``profiles/builtin/`` by its name."""
    names = builtin_names()
    if name not in names:
        raise ProfileError(f"unknown built-in profile {name!r}; built-in profiles: {', '.join(names)}")
    text = resources.files(BUILTIN_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return parse_profile(text, source=f"builtin:{name}")


def resolve_profile(name_or_path: str) -> Profile:
    """A built-in name (``local-cpu``) or a path to a YAML file."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        return load_profile(name_or_path)
    return load_builtin(name_or_path)


def builtin_names() -> list[str]:
    folder = resources.files(BUILTIN_PACKAGE)
    return sorted(
        entry.name.removesuffix(".yaml") for entry in folder.iterdir() if entry.name.endswith(".yaml")
    )


def parse_profile(text: str, *, source: str) -> Profile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"profile {source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"profile {source}: the top level must be a mapping of fields")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"profile {source}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        problems.append(f"{field}: {error['msg']}")
    return "; ".join(problems)
