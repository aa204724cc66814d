"""deploy/ and Dockerfile.cuda, checked without a GPU or a Docker engine: every manifest parses,
every Serve import path resolves in the installed package, the GPU profiles load and say their
region and quantization, and the image installs the `gpu` extra as a non-root user."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from profiles import Device, load_builtin

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _documents(path: Path) -> list[Any]:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def _import_paths(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "import_path" and isinstance(value, str):
                found.append(value)
            elif key == "serveConfigV2" and isinstance(value, str):
                found.extend(_import_paths(yaml.safe_load(value)))
            else:
                found.extend(_import_paths(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_import_paths(item))
    return found


def test_every_manifest_parses() -> None:
    manifests = _manifests()
    assert len(manifests) >= 4
    for path in manifests:
        assert _documents(path), f"{path} is empty"


def test_every_import_path_resolves_in_the_installed_package() -> None:
    paths = [p for manifest in _manifests() for doc in _documents(manifest) for p in _import_paths(doc)]
    assert paths, "no Serve import_path found under deploy/"
    for import_path in paths:
        module_name, _, attribute = import_path.partition(":")
        assert callable(getattr(importlib.import_module(module_name), attribute)), import_path


def test_rayservice_is_a_kuberay_rayservice_with_the_zumik_app() -> None:
    (service, claim) = _documents(DEPLOY / "kuberay" / "rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    load_builtin(app["args"]["profile"])  # the profile it names exists
    assert claim["kind"] == "PersistentVolumeClaim"


def test_redis_manifests_keep_aof_with_fsync_always() -> None:
    conf = (DEPLOY / "redis" / "redis.conf").read_text().splitlines()
    assert "appendonly yes" in conf and "appendfsync always" in conf
    config_map = _documents(DEPLOY / "redis" / "redis.yaml")[0]
    assert "appendfsync always" in config_map["data"]["redis.conf"]


@pytest.mark.parametrize("name", ["llama-8b-h100", "qwen-small-gpu"])
def test_gpu_profiles_load_with_region_and_quantization(name: str) -> None:
    profile = load_builtin(name)
    assert profile.engine.device is Device.CUDA
    assert profile.region and profile.region != "local"
    assert (
        "quantization" in profile.engine.model_fields_set
        and "kv_cache_dtype" in profile.engine.model_fields_set
    )
    assert profile.engine.gpu_memory_utilization or profile.engine.kv_cache_memory_bytes


def test_dockerfile_installs_gpu_extra_as_non_root() -> None:
    text = (REPO / "Dockerfile.cuda").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert (
        any(line.startswith("FROM") and "vllm" in line.lower() for line in lines)
        or "VLLM_IMAGE=vllm/" in text
    )
    assert "[gpu]" in text
    user_lines = [line for line in lines if line.startswith("USER ")]
    assert user_lines and user_lines[-1] != "USER root"
    assert text.count("FROM ") >= 2  # multi-stage


def test_grafana_dashboard_queries_ray_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "zumik-dashboard.json").read_text())
    targets = [target for panel in dashboard["panels"] for target in panel["targets"]]
    assert len(dashboard["panels"]) >= 6 and targets
    assert all("ray_" in target["expr"] for target in targets)
    assert any("ray_zumik_kv_tier_blocks_total" in target["expr"] for target in targets)
