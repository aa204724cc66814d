"""Strict checks of /v1 bodies: against the official ``openai`` package's types (no key outside
their fields, recursively) and, where ``../shared`` is present, against the official OpenAPI spec
(JSON Schema validation of the named component, plus the same no-extra-keys walk)."""

from __future__ import annotations

import functools
import types
import typing
from typing import Any

import pydantic

from tests.support.shared import openai_spec_path


def assert_matches_openai_type(data: Any, model: type[pydantic.BaseModel], path: str = "$") -> None:
    """``data`` validates as ``model`` and carries no key that ``model`` does not declare."""
    model.model_validate(data)
    _no_extra_keys(data, model, path)


def _no_extra_keys(data: Any, annotation: Any, path: str) -> None:
    if data is None:
        return
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        candidates = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                _no_extra_keys(data, candidate, path)
                return
            except AssertionError as exc:
                errors.append(str(exc))
        if errors:
            raise AssertionError(errors[0])
        return
    if origin is typing.Annotated:
        _no_extra_keys(data, typing.get_args(annotation)[0], path)
        return
    if origin in (list, typing.List):  # noqa: UP006
        (item_type,) = typing.get_args(annotation) or (Any,)
        for index, item in enumerate(data):
            _no_extra_keys(item, item_type, f"{path}[{index}]")
        return
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        assert isinstance(data, dict), f"{path}: expected an object"
        fields = {info.alias or name: info for name, info in annotation.model_fields.items()}
        extra = sorted(set(data) - set(fields))
        assert not extra, f"{path}: keys outside the official schema: {extra}"
        for key, value in data.items():
            _no_extra_keys(value, fields[key].annotation, f"{path}.{key}")


@functools.cache
def _spec() -> dict[str, Any] | None:
    path = openai_spec_path()
    if path is None:
        return None
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open("rb") as handle:
        spec = yaml.load(handle, Loader=loader)  # noqa: S506 - a safe loader
    return _apply_nullable(spec)


def _apply_nullable(node: Any) -> Any:
    """The spec says ``openapi: 3.1.0`` but still marks some schemas with the 3.0 keyword
    ``nullable: true``, which JSON Schema 2020-12 ignores. Read it as the spec means it: the
    value may also be null."""
    if isinstance(node, list):
        return [_apply_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _apply_nullable(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


def spec_available() -> bool:
    return _spec() is not None


def assert_official(data: Any, model: type[pydantic.BaseModel], component: str) -> None:
    """``data`` matches the SDK's ``model`` with no extra key, and, where the spec is present, its
    ``component`` (the spec's check is skipped only when ``../shared`` is absent)."""
    assert_matches_openai_type(data, model)
    if spec_available():
        assert_matches_spec_component(data, component)


def assert_matches_spec_component(data: Any, component: str) -> None:
    """Validate ``data`` against ``#/components/schemas/<component>`` of the official spec."""
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    spec = _spec()
    assert spec is not None, "the OpenAI spec is not available"
    resource = Resource.from_contents(spec, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:openai", resource)
    schema = {"$ref": f"urn:openai#/components/schemas/{component}"}
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.path))
    assert not errors, f"{component}: {errors[0].message} at {list(errors[0].path)}"
    _spec_no_extra_keys(data, spec["components"]["schemas"][component], spec, "$")


def _spec_no_extra_keys(data: Any, schema: dict[str, Any], spec: dict[str, Any], path: str) -> None:
    schema = _deref(schema, spec)
    variants = schema.get("anyOf") or schema.get("oneOf")
    if variants:
        for variant in variants:
            try:
                _spec_no_extra_keys(data, variant, spec, path)
                return
            except AssertionError:
                continue
        raise AssertionError(f"{path}: matches no variant without extra keys")
    if "allOf" in schema:
        merged: dict[str, Any] = {"properties": {}}
        for part in schema["allOf"]:
            merged["properties"].update(_all_properties(part, spec))
        schema = {**schema, **merged}
    if isinstance(data, dict) and "properties" in schema:
        extra = sorted(set(data) - set(schema["properties"]))
        assert not extra, f"{path}: keys outside the official schema: {extra}"
        for key, value in data.items():
            _spec_no_extra_keys(value, schema["properties"][key], spec, f"{path}.{key}")
    elif isinstance(data, list) and "items" in schema:
        for index, item in enumerate(data):
            _spec_no_extra_keys(item, schema["items"], spec, f"{path}[{index}]")


def _all_properties(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The properties a schema declares, through nested ``allOf`` (``CreateResponse`` is an allOf
    of ``CreateModelResponseProperties``, itself an allOf of ``ModelResponseProperties``...)."""
    schema = _deref(schema, spec)
    properties: dict[str, Any] = {}
    for part in schema.get("allOf", []):
        properties.update(_all_properties(part, spec))
    properties.update(schema.get("properties", {}))
    return properties


def _deref(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema
