"""Schema checks for deploy/: every check refuses an unknown field and a wrong type.

- KubeRay custom resources (RayService, RayCluster): the ``openAPIV3Schema`` of KubeRay's own
  CRDs (``../shared/data/kuberay``; absent in a user's clone, where the callers skip), made
  strict the way the API server's strict field validation is (``kubectl apply`` refuses unknown
  fields by default): an object schema that lists properties admits no others, unless it says
  ``x-kubernetes-preserve-unknown-fields``.
- Kubernetes core objects (ConfigMap, StatefulSet, Service, NetworkPolicy, ...), and every pod
  template inside a custom resource (as a ``PodTemplate``, whose template the CRD leaves loosely
  typed in places, ``metadata`` for one): ``kubernetes-validate`` with its strict schemas.
- The Ray cluster launcher's config: Ray's own ``ray/autoscaler/ray-schema.json`` and the
  checks ``ray up`` makes.
- Serve configs (``serveConfigV2``, ``serve deploy`` files): Ray Serve's ``ServeDeploySchema``,
  plus no key its models do not declare (the model itself ignores extra keys).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from tests.support.shared import shared_dir

KUBERNETES_VERSION = "1.30"  # the oldest minor the managed services still support: fields exist there
KUBERAY_CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML
NO_KUBERAY_CRDS = (
    "KubeRay CRDs not found (../shared/data/kuberay, or ZUMIK_SHARED_DIR): a user's clone has none"
)


class ManifestError(AssertionError):
    """A manifest that a schema refuses; the message names the file, the object and the field."""


def kuberay_crd_dir() -> Path | None:
    root = shared_dir()
    folder = root / "data" / "kuberay" if root else None
    return (
        folder if folder and all((folder / name).is_file() for name in KUBERAY_CRD_FILES.values()) else None
    )


@functools.cache
def kuberay_schema(kind: str, version: str = "v1") -> dict[str, Any]:
    """The strict ``openAPIV3Schema`` of KubeRay's CRD for ``kind`` at ``version``."""
    folder = kuberay_crd_dir()
    if folder is None:
        raise FileNotFoundError(NO_KUBERAY_CRDS)
    crd = yaml.load((folder / KUBERAY_CRD_FILES[kind]).read_text(), Loader=_LOADER)
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return strict_schema(entry["schema"]["openAPIV3Schema"])


def strict_schema(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema where an object that lists ``properties`` refuses others."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return schema


def validate_kuberay(doc: dict[str, Any], source: str) -> None:
    """A RayService or RayCluster against KubeRay's CRD, and each of its pod templates against
    Kubernetes' PodTemplateSpec; a RayService's ``serveConfigV2`` against Ray Serve's schema."""
    kind = doc["kind"]
    _raise_first(jsonschema.Draft202012Validator(kuberay_schema(kind)), doc, f"{source}: {kind}")
    for where, template in pod_templates(doc):
        validate_pod_template(template, f"{source}: {kind} {where}")
    if kind == "RayService":
        validate_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]), f"{source}: serveConfigV2")


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, template) for the head group and each worker group of a RayService or RayCluster."""
    cluster = doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]
    yield "headGroupSpec.template", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield f"workerGroupSpecs[{group['groupName']}].template", group["template"]


def validate_pod_template(template: dict[str, Any], source: str) -> None:
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    validate_core(wrapped, source)


def validate_core(doc: dict[str, Any], source: str) -> None:
    """A core Kubernetes object against the strict schema of its kind (unknown fields fail)."""
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.absolute_path) or "(top)"
        raise ManifestError(f"{source}: {doc.get('kind')} {where}: {exc.message}") from None


@functools.cache
def ray_cluster_schema() -> dict[str, Any]:
    text = resources.files("ray.autoscaler").joinpath("ray-schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def validate_ray_cluster_config(config: dict[str, Any], source: str) -> None:
    """A cluster launcher config against Ray's own schema, then as ``ray up`` checks it (its
    defaults filled in: ``prepare_config``, then ``validate_config``, which also refuses, e.g., a
    head node type that is not among the node types)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    _raise_first(jsonschema.Draft7Validator(ray_cluster_schema()), config, source)
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (ValueError, RuntimeError, jsonschema.ValidationError) as exc:
        raise ManifestError(f"{source}: {exc}") from None


def validate_serve_config(config: dict[str, Any], source: str) -> None:
    """A Serve config (``serve deploy`` file or ``serveConfigV2``) against Ray Serve's schema,
    refusing keys its models do not declare."""
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
    except Exception as exc:  # pydantic's ValidationError, through Ray's compat layer
        raise ManifestError(f"{source}: {exc}") from None
    _known_keys(config, ServeDeploySchema, source)
    for index, app in enumerate(config.get("applications", [])):
        _known_keys(app, ServeApplicationSchema, f"{source}: applications[{index}]")


def _known_keys(data: dict[str, Any], model: Any, source: str) -> None:
    unknown = sorted(set(data) - set(model.model_fields))
    if unknown:
        raise ManifestError(f"{source}: unknown field(s) {', '.join(unknown)} for {model.__name__}")


def _raise_first(validator: jsonschema.protocols.Validator, doc: Any, source: str) -> None:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        first = errors[0]
        where = ".".join(str(part) for part in first.absolute_path) or "(top)"
        raise ManifestError(f"{source} {where}: {first.message}")
