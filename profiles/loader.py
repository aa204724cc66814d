"""Loading profiles from YAML: built-in ones by name, others by path, errors naming the field.

One expansion happens before validation: a route's ``base_url`` may hold ``${VAR}`` or
``${VAR:-default}`` (shell meaning: the default when VAR is unset or empty), so one built-in
profile can point at a provider chosen by the environment. Nothing else in a profile expands.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

from profiles.model import Profile

BUILTIN_PACKAGE = "profiles.builtin"
DEFAULT_PROFILE = "local-cpu"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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


def load_builtin(name: str, *, env: Mapping[str, str] | None = None) -> Profile:
    """Load a profile shipped in ``profiles/builtin/`` by its name (``env``: see ``parse_profile``)."""
    names = builtin_names()
    if name not in names:
        raise ProfileError(f"unknown built-in profile {name!r}; built-in profiles: {', '.join(names)}")
    text = resources.files(BUILTIN_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return parse_profile(text, source=f"builtin:{name}", env=env)


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


def parse_profile(text: str, *, source: str, env: Mapping[str, str] | None = None) -> Profile:
    """Validate a profile's YAML text; ``env`` (default: os.environ) feeds base_url expansion."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProfileError(f"profile {source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ProfileError(f"profile {source}: the top level must be a mapping of fields")
    _expand_route_urls(data, os.environ if env is None else env, source)
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


def expand_env_refs(value: str, env: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in ``value``; an unset or empty VAR takes the
    default, and without one raises KeyError naming VAR."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = env.get(name, "")
        if found:
            return found
        if default is not None:
            return default
        raise KeyError(name)

    return _ENV_REF.sub(substitute, value)


def _expand_route_urls(data: dict[object, object], env: Mapping[str, str], source: str) -> None:
    routes = data.get("routes")
    if not isinstance(routes, list):
        return  # validation reports a wrong type with the field named
    for index, route in enumerate(routes):
        if isinstance(route, dict) and isinstance(route.get("base_url"), str):
            try:
                route["base_url"] = expand_env_refs(route["base_url"], env)
            except KeyError as exc:
                raise ProfileError(
                    f"profile {source}: routes.{index}.base_url: environment variable {exc.args[0]} "
                    "is not set and has no default (write ${VAR:-default})"
                ) from None
