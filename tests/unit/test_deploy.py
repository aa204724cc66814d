"""deploy/ and the GPU profiles it serves, checked without a GPU, a Docker engine or a cluster.

- Every manifest passes the schema of what applies it (``tests/support/manifests.py``, each
  refusing unknown fields and wrong types): KubeRay's CRDs for RayServices (skipped, saying so,
  where ``../shared`` is absent), Kubernetes' strict schema for core objects and for each pod
  template inside a RayService, Ray's own schema and ``ray up``'s checks for the cluster
  launcher config, Ray Serve's schema for Serve configs. A wrong field fails each of them.
- Each RayService agrees with the profile it serves: a worker pod holds one whole engine replica
  (GPUs per pod = tensor_parallel_size x pipeline_parallel_size), ``/dev/shm`` holds the
  profile's host tier and Ray's object store and is counted in the pod's memory limit, the disk
  tier is on a volume of its own as big as its budget, every pod fetches the profile's model into
  a volume of its own (no ReadOnlyMany claim, no storage class named), readiness is Zumik's
  ``/healthz`` through the pod's Serve proxy, and the KV tier has its own Redis.
- The cluster launcher config agrees with its profile the same way (GPUs per node, ``/dev/shm``,
  the disk tier's folder on the VM's disk).
- Redis: the state server keeps AOF with fsync always and never evicts; the KV server is a
  bounded LRU cache; both with ACL users from a Secret (checked on a real redis-server).
"""

from __future__ import annotations

import copy
import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from profiles import Profile, load_builtin
from tests.support.manifests import (
    NO_KUBERAY_CRDS,
    ManifestError,
    kuberay_crd_dir,
    pod_templates,
    validate_core,
    validate_kuberay,
    validate_pod_template,
    validate_ray_cluster_config,
    validate_serve_config,
)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERAY = DEPLOY / "kuberay"
RAY_CLUSTER = DEPLOY / "ray-cluster"
RAYSERVICES = sorted(KUBERAY.glob("rayservice*.yaml"))
GIB = 1024**3
DATA_MOUNT = "/var/lib/zumik"  # the image's data folder: ZUMIK_HOME and the disk tier
# What a pod's processes (vLLM's, the replica's, Ray's) get besides /dev/shm: at least this.
PROCESS_MEMORY_BASE = 16 * GIB
PROCESS_MEMORY_PER_GPU = 16 * GIB
RAY_NODE_HEALTH_PORT = 52365  # the dashboard agent: raylet and agent health (KubeRay's probes)

needs_crds = pytest.mark.skipif(kuberay_crd_dir() is None, reason=NO_KUBERAY_CRDS)


def _documents(path: Path) -> list[Any]:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def _kubernetes_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in _manifests()
        for doc in _documents(path)
        if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc
    ]


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


def _walk(node: Any) -> list[Any]:
    """``node`` and everything nested in it."""
    found = [node]
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        found.extend(_walk(child))
    return found


def _quantity_bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(quantity))
    assert match, f"{quantity}: give sizes in Ki, Mi, Gi or Ti"
    return (
        int(match.group(1))
        * {None: 1, "Ki": 1024, "Mi": 1024**2, "Gi": GIB, "Ti": 1024 * GIB}[match.group(2)]
    )


def _rayservice(path: Path) -> dict[str, Any]:
    (service,) = [doc for doc in _documents(path) if doc.get("kind") == "RayService"]
    return service


def _served_profile(service: dict[str, Any]) -> Profile:
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return load_builtin(app["args"]["profile"])


def _ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]  # KubeRay's Ray container is the first


def _volumes(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {volume["name"]: volume for volume in template["spec"].get("volumes", [])}


def _mounts(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}


def _worker_groups(service: dict[str, Any]) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert groups, "no worker group"
    return groups


# -- every file parses, and every manifest passes the schema of what applies it ---------------


def test_every_manifest_parses() -> None:
    manifests = _manifests()
    assert len(manifests) >= 6
    for path in manifests:
        assert _documents(path), f"{path} is empty"


def test_every_import_path_resolves_in_the_installed_package() -> None:
    paths = [p for manifest in _manifests() for doc in _documents(manifest) for p in _import_paths(doc)]
    assert len(paths) >= 3, "no Serve import_path found under deploy/"
    for import_path in paths:
        module_name, _, attribute = import_path.partition(":")
        assert callable(getattr(importlib.import_module(module_name), attribute)), import_path


@needs_crds
def test_kuberay_resources_match_kuberays_crds_and_their_pod_templates_kubernetes() -> None:
    checked = 0
    for path, doc in _kubernetes_objects():
        if doc["apiVersion"].startswith("ray.io/"):
            validate_kuberay(doc, str(path.relative_to(REPO)))
            checked += 1
    assert checked == len(RAYSERVICES) >= 2


def test_pod_templates_inside_rayservices_match_the_kubernetes_schema() -> None:
    """Also where ../shared is absent (no CRDs): each pod template as a PodTemplate."""
    for path in RAYSERVICES:
        for where, template in pod_templates(_rayservice(path)):
            validate_pod_template(template, f"{path.name}: {where}")
    broken = copy.deepcopy(_worker_groups(_rayservice(RAYSERVICES[0]))[0]["template"])
    broken["spec"]["containers"][0]["volumeMounts"].append({"name": "models"})
    with pytest.raises(ManifestError, match="'mountPath' is a required property"):
        validate_pod_template(broken, "broken")
    broken["metadata"]["lables"] = {}
    with pytest.raises(ManifestError, match=re.escape("'lables' was unexpected")):
        validate_pod_template(broken, "broken")


def test_core_objects_match_the_kubernetes_schema() -> None:
    kinds = set()
    for path, doc in _kubernetes_objects():
        if not doc["apiVersion"].startswith("ray.io/"):
            validate_core(doc, str(path.relative_to(REPO)))
            kinds.add(doc["kind"])
    assert {"ConfigMap", "StatefulSet", "Service", "NetworkPolicy"} <= kinds


def test_cluster_launcher_config_matches_rays_schema_and_ray_ups_checks() -> None:
    (config,) = _documents(RAY_CLUSTER / "cluster.yaml")
    validate_ray_cluster_config(config, "deploy/ray-cluster/cluster.yaml")


def test_serve_configs_match_ray_serves_schema() -> None:
    (config,) = _documents(RAY_CLUSTER / "serve.yaml")
    validate_serve_config(config, "deploy/ray-cluster/serve.yaml")
    for path in RAYSERVICES:  # serveConfigV2 is a string: the CRD check cannot see into it
        validate_serve_config(yaml.safe_load(_rayservice(path)["spec"]["serveConfigV2"]), str(path))


def _broken(mutate: Any) -> dict[str, Any]:
    service = copy.deepcopy(_rayservice(KUBERAY / "rayservice.yaml"))
    mutate(service)
    return service


@needs_crds
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda s: s["spec"].update(serviceUnhealthyThreshold=900),
            "'serviceUnhealthyThreshold' was unexpected",
        ),
        (
            lambda s: s["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(replicas="two"),
            "is not of type",
        ),
        (
            lambda s: s["spec"]["rayClusterConfig"]["headGroupSpec"].update(rayStartParams={"num-cpus": 0}),
            "is not of type",
        ),
        (
            lambda s: s["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][
                0
            ].update(readinessprobe={}),
            "'readinessprobe' was unexpected",
        ),
        (lambda s: s["spec"].update(serveConfigV2="applications: [{import_path: a:b, argz: {}}]"), "argz"),
    ],
)
def test_a_wrong_field_or_type_in_a_rayservice_fails(mutate: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)):
        validate_kuberay(_broken(mutate), "broken")


def test_a_wrong_field_in_a_core_object_or_the_cluster_config_fails() -> None:
    statefulset = copy.deepcopy(_documents(DEPLOY / "redis" / "redis.yaml")[1])
    statefulset["spec"]["template"]["spec"]["containers"][0]["memoryLimit"] = "8Gi"
    with pytest.raises(ManifestError, match="'memoryLimit' was unexpected"):
        validate_core(statefulset, "broken")
    (config,) = _documents(RAY_CLUSTER / "cluster.yaml")
    for key, value, message in (
        ("docker", {**config["docker"], "entrypoint": ""}, "'entrypoint' was unexpected"),
        ("head_node_type", "gpu_h100_head", "must be one of `available_node_types`"),
        ("max_workers", "8", "is not of type 'integer'"),
    ):
        with pytest.raises(ManifestError, match=re.escape(message)):
            validate_ray_cluster_config({**config, key: value}, "broken")


# -- each RayService agrees with the profile it serves ------------------------------------------


def test_there_is_a_rayservice_for_tensor_parallel_and_one_without() -> None:
    sizes = sorted(_served_profile(_rayservice(path)).engine.tensor_parallel_size for path in RAYSERVICES)
    assert sizes[0] == 1 and sizes[-1] >= 2


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_a_worker_pod_holds_one_whole_engine_replica(path: Path) -> None:
    service = _rayservice(path)
    profile = _served_profile(service)
    engine = profile.engine
    gpus = engine.tensor_parallel_size * engine.pipeline_parallel_size
    for group in _worker_groups(service):
        resources = _ray_container(group["template"])["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) == gpus, "GPUs per pod must be the replica's"
        assert resources["requests"] == resources["limits"]
        # the replica's CPUs, and room for a gateway (placement separate) and Ray's own
        assert float(resources["limits"]["cpu"]) >= engine.cpus_per_replica + 1
        assert group["minReplicas"] >= engine.num_replicas and group["replicas"] >= engine.num_replicas
        accelerator = json.loads(json.loads(group["rayStartParams"]["resources"]))
        assert accelerator == {f"accelerator_type:{engine.accelerator_type}": 1}
        assert engine.accelerator_type in group["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"]


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_dev_shm_and_memory_are_sized_from_the_profiles_host_tier(path: Path) -> None:
    service = _rayservice(path)
    tiers = _served_profile(service).kv_tiers
    for group in _worker_groups(service):
        template = group["template"]
        container = _ray_container(template)
        shm = _volumes(template)[_mounts(container)["/dev/shm"]["name"]]["emptyDir"]
        assert shm["medium"] == "Memory"
        object_store = int(group["rayStartParams"]["object-store-memory"])
        shm_bytes = _quantity_bytes(shm["sizeLimit"])
        assert shm_bytes >= tiers.host_capacity_bytes + object_store, "/dev/shm cannot hold the host tier"
        # /dev/shm is memory of the pod: the limit holds it and the processes beside it.
        limits = container["resources"]["limits"]
        gpus = int(limits["nvidia.com/gpu"])
        processes = _quantity_bytes(limits["memory"]) - shm_bytes
        assert processes >= PROCESS_MEMORY_BASE + PROCESS_MEMORY_PER_GPU * gpus


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_the_disk_tier_is_on_a_volume_of_its_own_as_big_as_its_budget(path: Path) -> None:
    service = _rayservice(path)
    tiers = _served_profile(service).kv_tiers
    assert tiers.enabled and tiers.disk_root and tiers.disk_root.startswith(f"{DATA_MOUNT}/")
    for group in _worker_groups(service):
        template = group["template"]
        mount = _mounts(_ray_container(template))[DATA_MOUNT]
        claim = _volumes(template)[mount["name"]]["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert claim["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in claim
        assert _quantity_bytes(claim["resources"]["requests"]["storage"]) >= tiers.disk_capacity_bytes


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_every_pod_fetches_the_profiles_model_into_a_volume_of_its_own(path: Path) -> None:
    """No ReadOnlyMany claim (most default storage classes cannot provision one): each pod's
    init container fetches the weights into the pod's own volume, at the profile's path."""
    service = _rayservice(path)
    source = _served_profile(service).model.source
    for where, template in pod_templates(service):
        (fetch,) = template["spec"]["initContainers"]
        env = {e["name"]: e for e in fetch["env"]}
        assert env["MODEL_DIR"]["value"] == source, where
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
        compile(fetch["command"][-1], f"{where} fetch-model", "exec")
        volume_name = _mounts(fetch)["/models"]["name"]
        claim = _volumes(template)[volume_name]["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert claim["accessModes"] == ["ReadWriteOnce"] and "storageClassName" not in claim
        ray_mount = _mounts(_ray_container(template))["/models"]
        assert ray_mount["name"] == volume_name and ray_mount["readOnly"] is True
    claims = [node for node in _walk(service) if isinstance(node, dict) and "accessModes" in node]
    assert claims and all(claim["accessModes"] == ["ReadWriteOnce"] for claim in claims)


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_worker_readiness_is_zumiks_health_and_liveness_the_ray_nodes(path: Path) -> None:
    service = _rayservice(path)
    for group in _worker_groups(service):
        container = _ray_container(group["template"])
        serve_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "serve")
        readiness = " ".join(container["readinessProbe"]["exec"]["command"])
        assert f"http://localhost:{serve_port}/healthz" in readiness  # zumik_serve/api/app.py
        assert f"localhost:{RAY_NODE_HEALTH_PORT}/api/local_raylet_healthz" in readiness
        liveness = container["livenessProbe"]["httpGet"]
        assert liveness == {"path": "/api/healthz", "port": RAY_NODE_HEALTH_PORT}
    # The head's readiness stays KubeRay's (Ray only): KubeRay deploys the app only once the head
    # is ready, so a head waiting for the app would wait forever.
    head = _ray_container(service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])
    assert "readinessProbe" not in head and "livenessProbe" not in head


@pytest.mark.redis
async def test_zumiks_healthz_answers_what_the_readiness_probe_greps_for(
    module_redis_url: str, tiny_model_dir: Path
) -> None:
    """The probe's request and its grep, against the production app (in-process, real Redis)."""
    from tests.support.inprocess import make_gateway

    container = _ray_container(_worker_groups(_rayservice(RAYSERVICES[0]))[0]["template"])
    command = container["readinessProbe"]["exec"]["command"][-1]
    (path, pattern) = re.search(r"localhost:\d+(/\w+) \| grep -q '([^']+)'", command).groups()  # type: ignore[union-attr]
    async with make_gateway(module_redis_url, tiny_model_dir).client(api_key="") as http:
        answer = await http.get(path)
    assert answer.status_code == 200 and pattern in answer.text


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_every_ray_pod_reaches_the_state_redis_and_the_kv_redis(path: Path) -> None:
    services = {
        doc["metadata"]["name"]
        for name in ("redis.yaml", "kv-redis.yaml")
        for doc in _documents(DEPLOY / "redis" / name)
        if doc["kind"] == "Service"
    }
    assert services == {"zumik-redis", "zumik-redis-kv"}
    service = _rayservice(path)
    assert _served_profile(service).kv_tiers.redis
    for where, template in pod_templates(service):
        env = {e["name"]: e.get("value") for e in _ray_container(template)["env"]}
        names = list(env)
        for variable, host in (("ZUMIK_REDIS_URL", "zumik-redis"), ("ZUMIK_KV_REDIS_URL", "zumik-redis-kv")):
            assert f"@{host}:6379/" in env[variable], where
            assert names.index("ZUMIK_REDIS_GATEWAY_PASSWORD") < names.index(variable), where


def test_the_rayservices_run_the_image_of_the_guide() -> None:
    for path in RAYSERVICES:
        for where, template in pod_templates(_rayservice(path)):
            images = {
                c["image"] for c in [*template["spec"]["containers"], *template["spec"]["initContainers"]]
            }
            assert images == {"ghcr.io/your-org/zumik:cuda"}, where
    (config,) = _documents(RAY_CLUSTER / "cluster.yaml")
    assert config["docker"]["image"] == "ghcr.io/your-org/zumik:cuda"


# -- the cluster launcher's nodes agree with the profile -------------------------------------


def test_cluster_launcher_nodes_are_sized_from_the_profile() -> None:
    (config,) = _documents(RAY_CLUSTER / "cluster.yaml")
    (serve_config,) = _documents(RAY_CLUSTER / "serve.yaml")
    (app,) = serve_config["applications"]
    profile = load_builtin(app["args"]["profile"])
    engine, tiers = profile.engine, profile.kv_tiers
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    (gpu,) = workers
    assert gpu["resources"]["GPU"] == engine.tensor_parallel_size * engine.pipeline_parallel_size
    assert gpu["resources"][f"accelerator_type:{engine.accelerator_type}"] == 1
    assert gpu["min_workers"] >= engine.num_replicas
    run_options = config["docker"]["run_options"]
    (shm,) = [o.split("=", 1)[1] for o in run_options if o.startswith("--shm-size=")]
    assert int(shm.removesuffix("g")) * GIB >= tiers.host_capacity_bytes + 8 * GIB
    assert tiers.disk_root and tiers.disk_root.startswith(f"{DATA_MOUNT}/")
    assert f"-v {DATA_MOUNT}:{DATA_MOUNT}" in run_options  # on the VM's disk: outlives the container
    assert any(
        f"install -d -o 1000 -g 1000 -m 0700 {DATA_MOUNT}" in c for c in config["initialization_commands"]
    )
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        command = " ".join(commands)
        assert "--metrics-export-port=8080" in command and "ZUMIK_KV_REDIS_URL=" in command


# -- Redis: state never evicted; the KV tier a bounded cache ----------------------------------


def test_redis_manifests_keep_aof_with_fsync_always_and_never_evict() -> None:
    conf = (DEPLOY / "redis" / "redis.conf").read_text().splitlines()
    assert "appendonly yes" in conf and "appendfsync always" in conf
    assert "maxmemory-policy noeviction" in conf
    (maxmemory,) = [line.split()[1] for line in conf if line.startswith("maxmemory ")]
    statefulset = _documents(DEPLOY / "redis" / "redis.yaml")[1]
    limit = statefulset["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert int(maxmemory.removesuffix("gb")) * GIB < _quantity_bytes(limit)  # refused writes, not an OOM kill
    config_map = _documents(DEPLOY / "redis" / "redis.yaml")[0]
    assert "appendfsync always" in config_map["data"]["redis.conf"]


def test_the_kv_redis_is_a_bounded_lru_cache_with_the_same_users() -> None:
    from zumik_serve.store.redis_acl import KV_USER, acl_template_text

    redis_dir = DEPLOY / "redis"
    conf = (redis_dir / "kv-redis.conf").read_text().splitlines()
    for line in ("appendonly no", 'save ""', "maxmemory-policy volatile-lru", "protected-mode yes",
                 "aclfile /run/redis/users.acl", "bind 127.0.0.1"):  # fmt: skip
        assert line in conf, line
    (maxmemory,) = [line.split()[1] for line in conf if line.startswith("maxmemory ")]
    # The engines' user may also run INFO there (the tier reports the server's memory), as on
    # the KV Redis that `zumik serve` starts (store/local_redis.py).
    expected = [
        f"{line} +info" if line.startswith(f"user {KV_USER} ") else line
        for line in acl_template_text().splitlines()
    ]
    assert (redis_dir / "kv-users.acl.template").read_text().splitlines() == expected
    config_map, statefulset, service, policy = _documents(redis_dir / "kv-redis.yaml")
    for name, source in (("redis.conf", "kv-redis.conf"), ("users.acl.template", "kv-users.acl.template"),
                         ("render-users-acl.sh", "render-users-acl.sh")):  # fmt: skip
        assert config_map["data"][name] == (redis_dir / source).read_text(), f"the ConfigMap's {name} differs"
    spec = statefulset["spec"]
    assert "volumeClaimTemplates" not in spec  # nothing in it must survive a restart
    (container,) = spec["template"]["spec"]["containers"]
    assert container["args"][-3:] == ["--bind", "127.0.0.1", "$(POD_IP)"]
    assert int(maxmemory.removesuffix("gb")) * GIB < _quantity_bytes(
        container["resources"]["limits"]["memory"]
    )
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/part-of": "zumik"
    }
    assert service["metadata"]["name"] == "zumik-redis-kv"


# -- who can reach what (issue #18): ACL users from a Secret, no password in a manifest ----------

REDIS = DEPLOY / "redis"
SECRETS_MOUNT = "/etc/zumik/secrets"
GATEWAY_PASSWORD = "gateway-" + "a" * 32
KV_PASSWORD = "kv-" + "b" * 32


def test_no_manifest_holds_a_password() -> None:
    """A Redis URL's password is a reference to the Secret, never a literal; no requirepass, no
    plaintext ACL password (``>...``); the ACL templates hold placeholders for hashes."""
    for path in [
        *_manifests(),
        *REDIS.glob("*.conf"),
        *REDIS.glob("*.acl.template"),
        *(DEPLOY / "ray-cluster").iterdir(),
        REPO / "docs" / "byoc.md",
    ]:
        text = path.read_text()
        assert "requirepass" not in text and not re.search(r"^\s*user .*\s>\S", text, re.M), path
        for user, password in re.findall(r"rediss?://([^:@/\s\"]+):([^@\s\"]+)@", text):
            assert user == "zumik-gateway", path
            assert password.startswith("$("), f"{path}: a literal password in a Redis URL"
    for template in REDIS.glob("*.acl.template"):
        text = template.read_text()
        assert "#GATEWAY_PASSWORD_SHA256" in text and "#KV_PASSWORD_SHA256" in text, template


def test_redis_config_keeps_protected_mode_acl_users_and_no_wildcard_bind() -> None:
    for name in ("redis.conf", "kv-redis.conf"):
        conf = (REDIS / name).read_text().splitlines()
        assert "protected-mode yes" in conf and "aclfile /run/redis/users.acl" in conf, name
        assert not any(line.startswith("bind") and "0.0.0.0" in line for line in conf), name
    assert (REDIS / "users.acl.template").read_text().splitlines()[0].startswith("user default off ")
    config_map, statefulset, _service, policy = _documents(REDIS / "redis.yaml")
    for name in ("redis.conf", "users.acl.template", "render-users-acl.sh"):
        assert config_map["data"][name] == (REDIS / name).read_text(), f"the ConfigMap's {name} differs"
    for manifest in ("redis.yaml", "kv-redis.yaml"):
        statefulset = _documents(REDIS / manifest)[1]
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


def _shipped_redis(tmp_path: Path, conf_name: str, template_name: str, *args: str) -> tuple[Any, int]:
    """redis-server with the shipped ``conf_name`` (its data folder moved into ``tmp_path``) and
    the ACL file that render-users-acl.sh renders from ``template_name``, as the init container
    does. Returns the process and its port."""
    import subprocess
    import time

    import redis

    from zumik_serve.store.local_redis import free_port

    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "redis-gateway.password").write_text(GATEWAY_PASSWORD + "\n")  # --from-file style
    (secrets / "redis-kv.password").write_text(KV_PASSWORD)  # --from-literal style
    subprocess.run(["sh", str(REDIS / "render-users-acl.sh"), str(secrets), str(REDIS / template_name),
                    str(tmp_path / "users.acl")], check=True)  # fmt: skip
    assert oct((tmp_path / "users.acl").stat().st_mode & 0o777) == "0o600"
    assert "a" * 32 not in (tmp_path / "users.acl").read_text()
    port = free_port()
    (tmp_path / "data").mkdir()
    # The shipped file as it is, but for its data folder (redis-server enters `dir` as it reads it).
    conf = (REDIS / conf_name).read_text().replace("\ndir /data\n", f"\ndir {tmp_path / 'data'}\n")
    (tmp_path / "redis.conf").write_text(conf)
    process = subprocess.Popen(
        ["redis-server", str(tmp_path / "redis.conf"), "--port", str(port),
         "--aclfile", str(tmp_path / "users.acl"), "--daemonize", "no", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    probe = redis.Redis(host="127.0.0.1", port=port, username="zumik-gateway", password=GATEWAY_PASSWORD)
    for _ in range(400):
        try:
            probe.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    return process, port


@pytest.mark.redis
def test_the_shipped_redis_config_and_rendered_acl_work_on_a_real_redis(tmp_path: Path) -> None:
    """render-users-acl.sh as the init container runs it, then redis-server with redis.conf:
    default refused, the gateway's user in, the engines' user kept to the KV keys."""
    import redis

    process, port = _shipped_redis(tmp_path, "redis.conf", "users.acl.template")
    try:
        gateway = redis.Redis(
            host="127.0.0.1", port=port, username="zumik-gateway", password=GATEWAY_PASSWORD
        )
        assert (
            gateway.set("zumik:apikey:x", b"ten_a")
            and gateway.config_get("appendfsync")["appendfsync"] == "always"
        )
        assert gateway.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        kv = redis.Redis(host="127.0.0.1", port=port, username="zumik-kv", password=KV_PASSWORD)
        assert kv.set("kv:c:s:k", b"block")
        with pytest.raises(redis.exceptions.NoPermissionError):
            kv.get("zumik:apikey:x")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, protocol=2).get("zumik:apikey:x")
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.redis
def test_the_shipped_kv_redis_evicts_old_blocks_and_keeps_its_users(tmp_path: Path) -> None:
    """kv-redis.conf with its rendered ACL on a real redis-server (maxmemory lowered to 4 MB, so
    that a few blocks fill it): the engines' user stores blocks and reads INFO; past maxmemory
    the oldest blocks go, a store never fails; nothing is written to disk; default refused."""
    import redis

    process, port = _shipped_redis(tmp_path, "kv-redis.conf", "kv-users.acl.template", "--maxmemory", "4mb")
    try:
        kv = redis.Redis(host="127.0.0.1", port=port, username="zumik-kv", password=KV_PASSWORD)
        block = b"x" * (256 * 1024)
        assert kv.set("kv:used:c:s", 0)  # a tier byte counter: no TTL, so never evicted
        for index in range(64):  # 16 MB of blocks (each with a TTL, as the tier stores them) into 4 MB
            assert kv.set(f"kv:c:s:{index:03d}", block, ex=3600)
        stats = kv.info("stats")
        assert stats["evicted_keys"] > 0 and kv.get("kv:c:s:063") == block and kv.get("kv:c:s:000") is None
        assert kv.get("kv:used:c:s") == b"0"
        memory = kv.info("memory")
        assert memory["maxmemory_policy"] == "volatile-lru"
        assert kv.info("persistence")["aof_enabled"] == 0 and not list((tmp_path / "data").iterdir())
        with pytest.raises(redis.exceptions.NoPermissionError):
            kv.set("zumik:apikey:x", b"ten_a")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, protocol=2).get("kv:c:s:063")
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_ray_pods_mount_the_secret_and_take_the_redis_password_from_it(path: Path, tmp_path: Path) -> None:
    from zumik_serve.store.redis_acl import engine_redis_access

    service = _rayservice(path)
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert "redis_url" not in app["args"]  # a Serve config is visible to anyone who can read the CR
    assert "kv_redis_url" not in app["args"]
    for _where, pod in pod_templates(service):
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
            (tmp_path / "redis-kv.password").write_text("k" * 64)
            for variable, host in (
                ("ZUMIK_REDIS_URL", "zumik-redis"),
                ("ZUMIK_KV_REDIS_URL", "zumik-redis-kv"),
            ):
                assert names.index("ZUMIK_REDIS_GATEWAY_PASSWORD") < names.index(variable)
                url = env[variable]["value"].replace("$(ZUMIK_REDIS_GATEWAY_PASSWORD)", "p" * 64)
                engines = engine_redis_access(url, tmp_path)  # what the engines get from this URL
                assert engines.url == f"redis://zumik-kv@{host}:6379/0"


def test_only_the_operator_reaches_the_dashboard() -> None:
    """The dashboard listens in the head pod (the operator submits Serve configs through it);
    the NetworkPolicy that both RayServices' pods fall under admits only the operator to it."""
    (policy,) = _documents(KUBERAY / "network-policy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "zumik"}
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


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_the_ray_clusters_of_kuberay_require_rays_token(path: Path) -> None:
    """The dashboard listens on the pod's address (the operator submits through it): its Jobs
    API runs code in pods that mount the secrets. A NetworkPolicy guards it only where the
    network plugin enforces one; Ray's token auth guards it everywhere (KubeRay makes the token,
    and Ray 2.52+ checks it)."""
    (service,) = _documents(path)
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    major, minor, _ = (int(part) for part in cluster["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)


def test_only_prometheus_reaches_the_metrics_port_and_anyone_serve() -> None:
    """Zumik's series carry a tenant label (each tenant's token counts): port 8080 is admitted
    from pods labelled as Prometheus only, and Serve's 8000 from anywhere (its API keys guard it)."""
    (policy,) = _documents(KUBERAY / "network-policy.yaml")
    rules = policy["spec"]["ingress"]
    by_port = {p["port"]: rule for rule in rules for p in rule.get("ports", [])}
    assert by_port[8080]["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    ]
    assert "from" not in by_port[8000]


def test_ray_cluster_on_vms_keeps_the_dashboard_on_loopback_and_reads_the_password_file() -> None:
    (cluster,) = _documents(DEPLOY / "ray-cluster" / "cluster.yaml")
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for command in (head, " ".join(cluster["worker_start_ray_commands"])):
        assert f"ZUMIK_SECRETS_DIR={SECRETS_MOUNT}" in command
        assert f"$(cat {SECRETS_MOUNT}/redis-gateway.password)" in command
    # Every node, the autoscaler's new ones included, gets the secrets folder from the launcher
    # (file_mounts are copied to each node and mounted into its container).
    assert cluster["file_mounts"][SECRETS_MOUNT].startswith("~/")  # outside the repository
    (serve_config,) = _documents(DEPLOY / "ray-cluster" / "serve.yaml")
    assert not {"redis_url", "kv_redis_url"} & set(serve_config["applications"][0]["args"])
