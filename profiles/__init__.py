"""Profiles: what Zumik serves, on which hardware, with which engine settings."""

from profiles.loader import (
    DEFAULT_PROFILE,
    ProfileError,
    builtin_names,
    load_builtin,
    load_profile,
    parse_profile,
    resolve_profile,
)
from profiles.model import (
    TINY_MODEL_SOURCE,
    AdapterSpec,
    Device,
    EngineSpec,
    GatewayPlacement,
    GatewaySpec,
    KvTiersSpec,
    ModelGroupSpec,
    ModelSpec,
    Profile,
)

__all__ = [
    "DEFAULT_PROFILE",
    "TINY_MODEL_SOURCE",
    "AdapterSpec",
    "Device",
    "EngineSpec",
    "GatewayPlacement",
    "GatewaySpec",
    "KvTiersSpec",
    "ModelGroupSpec",
    "ModelSpec",
    "Profile",
    "ProfileError",
    "builtin_names",
    "load_builtin",
    "load_profile",
    "parse_profile",
    "resolve_profile",
]
