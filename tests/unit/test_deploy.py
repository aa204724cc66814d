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
    (service, claim, policy) = _documents(DEPLOY / "kuberay" / "rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    load_builtin(app["args"]["profile"])  # the profile it names exists
    assert claim["kind"] == "PersistentVolumeClaim" and policy["kind"] == "NetworkPolicy"


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


# -- who can reach what (issue #18): ACL users from a Secret, no password in a manifest ----------

REDIS = DEPLOY / "redis"
SECRETS_MOUNT = "/etc/zumik/secrets"


def _containers(doc: Any) -> list[dict[str, Any]]:
    """Every container (and init container) spec in ``doc``, wherever it is nested."""
    found: list[dict[str, Any]] = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found.extend(value)
            else:
                found.extend(_containers(value))
    elif isinstance(doc, list):
        for item in doc:
            found.extend(_containers(item))
    return found


def test_no_manifest_holds_a_password() -> None:
    """A Redis URL's password is a reference to the Secret, never a literal; no requirepass, no
    plaintext ACL password (``>...``); the ACL template holds placeholders for hashes."""
    import re

    for path in [
        *_manifests(),
        REDIS / "redis.conf",
        REDIS / "users.acl.template",
        *(DEPLOY / "ray-cluster").iterdir(),
    ]:
        text = path.read_text()
        assert "requirepass" not in text and not re.search(r"^\s*user .*\s>\S", text, re.M), path
        for user, password in re.findall(r"rediss?://([^:@/\s\"]+):([^@\s\"]+)@", text):
            assert user == "zumik-gateway", path
            assert password.startswith("$("), f"{path}: a literal password in a Redis URL"
    template = (REDIS / "users.acl.template").read_text()
    assert "#GATEWAY_PASSWORD_SHA256" in template and "#KV_PASSWORD_SHA256" in template


def test_redis_config_keeps_protected_mode_acl_users_and_no_wildcard_bind() -> None:
    conf = (REDIS / "redis.conf").read_text().splitlines()
    assert "protected-mode yes" in conf and "aclfile /run/redis/users.acl" in conf
    assert not any(line.startswith("bind") and "0.0.0.0" in line for line in conf)
    assert (REDIS / "users.acl.template").read_text().splitlines()[0].startswith("user default off ")
    config_map, statefulset, _service, policy = _documents(REDIS / "redis.yaml")
    for name in ("redis.conf", "users.acl.template", "render-users-acl.sh"):
        assert config_map["data"][name] == (REDIS / name).read_text(), f"the ConfigMap's {name} differs"
    (redis_container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert redis_container["args"][-3:] == ["--bind", "127.0.0.1", "$(POD_IP)"]
    assert "0.0.0.0" not in json.dumps(statefulset)
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["redis-passwords"]["secret"]["secretName"] == "zumik-secrets"
    assert {item["key"] for item in volumes["redis-passwords"]["secret"]["items"]} == {
        "redis-gateway.password", "redis-kv.password"
    }  # fmt: skip
    assert volumes["acl"]["emptyDir"]["medium"] == "Memory"  # the rendered file never hits a disk
    assert policy["kind"] == "NetworkPolicy"
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/part-of": "zumik"
    }


@pytest.mark.redis
def test_the_shipped_redis_config_and_rendered_acl_work_on_a_real_redis(tmp_path: Path) -> None:
    """render-users-acl.sh as the init container runs it, then redis-server with redis.conf:
    default refused, the gateway's user in, the engines' user kept to the KV keys."""
    import subprocess
    import time

    import redis

    from zumik_serve.store.local_redis import free_port

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "redis-gateway.password").write_text("gateway-" + "a" * 32 + "\n")  # --from-file style
    (secrets / "redis-kv.password").write_text("kv-" + "b" * 32)  # --from-literal style
    subprocess.run(["sh", str(REDIS / "render-users-acl.sh"), str(secrets), str(REDIS / "users.acl.template"),
                    str(tmp_path / "users.acl")], check=True)  # fmt: skip
    assert oct((tmp_path / "users.acl").stat().st_mode & 0o777) == "0o600"
    assert "a" * 32 not in (tmp_path / "users.acl").read_text()
    port = free_port()
    (tmp_path / "data").mkdir()
    # The shipped file as it is, but for its data folder (redis-server enters `dir` as it reads it).
    conf = (REDIS / "redis.conf").read_text().replace("\ndir /data\n", f"\ndir {tmp_path / 'data'}\n")
    (tmp_path / "redis.conf").write_text(conf)
    process = subprocess.Popen(
        ["redis-server", str(tmp_path / "redis.conf"), "--port", str(port),
         "--aclfile", str(tmp_path / "users.acl"), "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        gateway = redis.Redis(
            host="127.0.0.1", port=port, username="zumik-gateway", password="gateway-" + "a" * 32
        )
        for _ in range(200):
            try:
                gateway.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        assert (
            gateway.set("zumik:apikey:x", b"ten_a")
            and gateway.config_get("appendfsync")["appendfsync"] == "always"
        )
        kv = redis.Redis(host="127.0.0.1", port=port, username="zumik-kv", password="kv-" + "b" * 32)
        assert kv.set("kv:c:s:k", b"block")
        with pytest.raises(redis.exceptions.NoPermissionError):
            kv.get("zumik:apikey:x")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, protocol=2).get("zumik:apikey:x")
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_ray_pods_mount_the_secret_and_take_the_redis_password_from_it(tmp_path: Path) -> None:
    from zumik_serve.store.redis_acl import engine_redis_access

    service, _claim, policy = _documents(DEPLOY / "kuberay" / "rayservice.yaml")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert "redis_url" not in app["args"]  # a Serve config is visible to anyone who can read the CR
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    for pod in pods:
        secret_volumes = {
            v["name"]
            for v in pod["spec"]["volumes"]
            if v.get("secret", {}).get("secretName") == "zumik-secrets"
        }
        assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "zumik"
        for container in pod["spec"]["containers"]:
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts[SECRETS_MOUNT]["name"] in secret_volumes and mounts[SECRETS_MOUNT]["readOnly"]
            env = {e["name"]: e for e in container["env"]}
            assert env["ZUMIK_SECRETS_DIR"]["value"] == SECRETS_MOUNT
            assert env["ZUMIK_REDIS_GATEWAY_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                "name": "zumik-secrets", "key": "redis-gateway.password"
            }  # fmt: skip
            names = list(env)  # Kubernetes expands $(VAR) only from variables defined before it
            assert names.index("ZUMIK_REDIS_GATEWAY_PASSWORD") < names.index("ZUMIK_REDIS_URL")
            url = env["ZUMIK_REDIS_URL"]["value"].replace("$(ZUMIK_REDIS_GATEWAY_PASSWORD)", "p" * 64)
            (tmp_path / "redis-kv.password").write_text("k" * 64)
            engines = engine_redis_access(url, tmp_path)  # what the engines get from this URL
            assert engines.url == "redis://zumik-kv@zumik-redis:6379/0"
    # The dashboard listens in the pod (the operator submits Serve configs through it), and only
    # the operator may reach it.
    operator_rule = next(
        rule
        for rule in policy["spec"]["ingress"]
        if {"port": 8265, "protocol": "TCP"} in rule.get("ports", [])
    )
    assert operator_rule["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kuberay-operator"
    }
    assert all(
        8265 not in [p["port"] for p in rule.get("ports", [])] or rule.get("from")
        for rule in policy["spec"]["ingress"]
    )


def test_ray_cluster_on_vms_keeps_the_dashboard_on_loopback_and_reads_the_password_file() -> None:
    (cluster,) = _documents(DEPLOY / "ray-cluster" / "cluster.yaml")
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for command in (head, " ".join(cluster["worker_start_ray_commands"])):
        assert f"ZUMIK_SECRETS_DIR={SECRETS_MOUNT}" in command
        assert f"$(cat {SECRETS_MOUNT}/redis-gateway.password)" in command
    assert f"-v {SECRETS_MOUNT}:{SECRETS_MOUNT}:ro" in cluster["docker"]["run_options"]
    (serve_config,) = _documents(DEPLOY / "ray-cluster" / "serve.yaml")
    assert "redis_url" not in serve_config["applications"][0]["args"]
