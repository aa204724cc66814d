"""GPU smoke of the whole path, for a GPU machine with the image's vLLM (CUDA), Ray and Redis.

NOT RUN YET: no machine with a GPU and CUDA vLLM has been available; the parts that need none
(arguments, profiles per tier, the report's checks) are tested in tests/unit/test_gpu_e2e_check.py.

    python tests/gpu/e2e_check.py --profile qwen-small-gpu --out gpu-e2e.json
    python tests/gpu/e2e_check.py --tiny --out gpu-e2e.json    # the tiny model on CUDA, no weights

It runs what ``zumik serve --profile ...`` runs (``LocalStack``: redis-server, a Ray head, the
Serve app) in this process, with the KV tiers on (host, Redis, disk; the disk tier in a
temporary folder unless ``--disk-root``), then these steps, each a record of the JSON report:

    environment     torch and vLLM versions, the GPU (stops here without CUDA)
    serve           the stack answers /healthz
    repeat          the same chat twice: the second has usage...cached_tokens > 0
    snapshot        artifact -> bundle -> snapshot, warmed by a chat naming it (x-zumik-snapshot)
    restore-host    redeploy with only the host tier (a fresh engine replica: its own prefix
    restore-redis   cache is empty), the warmed chat again: cached_tokens > 0 and Server-Timing's
    restore-disk    ``restore`` names that tier and no other
    purge           redeploy the profile, purge the artifact: a receipt, the snapshot is gone (404),
                    the repeated prompt is no longer cached (its cache scope moved on)
    receipt         ``zumik receipt verify`` with the key of /v2/keys: exit 0; a changed copy: exit 1

Exit status 0 when every step passed; the report says which failed and why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TIERS = ("host", "redis", "disk")
STEPS = (
    "environment",
    "serve",
    "repeat",
    "snapshot",
    *(f"restore-{tier}" for tier in TIERS),
    "purge",
    "receipt",
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--profile", default="qwen-small-gpu", help="a built-in profile name or a YAML path")
    which.add_argument("--tiny", action="store_true", help="the tiny test model on CUDA (built locally)")
    parser.add_argument("--out", type=Path, default=Path("gpu-e2e.json"), help="where the JSON report goes")
    parser.add_argument(
        "--disk-root", type=Path, default=None, help="the disk tier's folder (default: a temp one)"
    )
    parser.add_argument(
        "--host-bytes", type=int, default=1 << 30, help="host tier capacity (bytes of /dev/shm)"
    )
    parser.add_argument("--timeout-s", type=float, default=900.0, help="stop the check after this long")
    args = parser.parse_args(argv)
    if args.host_bytes <= 0:
        parser.error("--host-bytes must be positive: the host tier is one of the tiers checked")
    return args


def tiny_cuda_profile() -> Any:
    """The tiny model (built locally, no download) on one GPU, with local-cpu's other settings."""
    from profiles import load_builtin

    data = load_builtin("local-cpu").model_dump(mode="json")
    data["name"] = "tiny-cuda"
    data["engine"].update(device="cuda", cpus_per_replica=1.0)  # validated: cuda needs a KV size
    return type(load_builtin("local-cpu")).model_validate(data)


def tiered_profile(profile: Any, *, only: str | None, disk_root: Path, host_bytes: int) -> Any:
    """``profile`` with the KV tiers on: every tier (``only=None``) or just ``only``."""
    if only is not None and only not in TIERS:
        raise ValueError(f"unknown tier {only!r}: choose from {', '.join(TIERS)}")
    update = {
        "enabled": True,
        "host_capacity_bytes": host_bytes if only in (None, "host") else 0,
        "redis": only in (None, "redis"),
        "disk_root": str(disk_root) if only in (None, "disk") else None,
    }
    tiers = profile.kv_tiers.model_copy(update=update)
    return type(profile).model_validate({**profile.model_dump(), "kv_tiers": tiers.model_dump()})


def restored_tiers(server_timing: str) -> dict[str, int]:
    """Tokens per tier from Server-Timing's ``restore`` entry (``desc="disk 96 tokens, ..."``;
    the description holds commas, so entries are not split on them)."""
    start = server_timing.find("restore;")
    if start < 0 or (start > 0 and server_timing[start - 1] not in ", "):
        return {}
    entry = server_timing[start:]
    if 'desc="' not in entry.split(",", 1)[0]:
        return {}
    desc = entry.split('desc="', 1)[1].split('"', 1)[0]
    tiers: dict[str, int] = {}
    for part in desc.split(","):
        words = part.split()
        if len(words) == 3 and words[2] == "tokens" and words[0] in TIERS:
            tiers[words[0]] = int(words[1])
    return tiers


def check_report(report: dict[str, Any]) -> list[str]:
    """What is wrong with a report: a step missing, failed, or passed without its evidence."""
    problems: list[str] = []
    steps = {step.get("name"): step for step in report.get("steps", [])}
    for name in STEPS:
        step = steps.get(name)
        if step is None:
            problems.append(f"{name}: did not run")
        elif not step.get("ok"):
            problems.append(f"{name}: failed: {step.get('error') or 'no error recorded'}")
    for name, step in steps.items():
        if step.get("ok") and not _has_evidence(str(name), step.get("details") or {}):
            problems.append(f"{name}: marked ok without its evidence: {step.get('details')}")
    return problems


def _has_evidence(name: str, details: dict[str, Any]) -> bool:
    if name == "repeat":
        return bool(details.get("second_cached_tokens", 0) > 0)
    if name == "purge":
        return details.get("snapshot_status") == 404 and details.get("cached_after", -1) == 0
    if name == "receipt":
        return details.get("intact_exit") == 0 and details.get("changed_exit") == 1
    if name.startswith("restore-"):
        tier = name.removeprefix("restore-")
        return bool(details.get("cached_tokens", 0) > 0) and set(details.get("tiers", {})) == {tier}
    return True


class Run:
    """The report being written: one record per step, in order."""

    def __init__(self) -> None:
        self.report: dict[str, Any] = {
            "steps": [],
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def step(self, name: str, body: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        t0 = time.monotonic()
        record: dict[str, Any] = {"name": name}
        try:
            record["details"] = body()
            record["ok"] = True
        except Exception as exc:
            record.update(
                ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:]
            )
        record["seconds"] = round(time.monotonic() - t0, 2)
        self.report["steps"].append(record)
        print(json.dumps({k: v for k, v in record.items() if k != "trace"}), flush=True)
        return record.get("details") if record["ok"] else None


def _environment() -> dict[str, Any]:
    import torch
    import vllm

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible to PyTorch: this check needs one")
    return {"torch": torch.__version__, "vllm": vllm.__version__, "gpu": torch.cuda.get_device_name(0)}


def _cached(response: Any) -> int:
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url} answered {response.status_code}: {response.text[:300]}")
    return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run()
    try:
        _check(args, run)
    finally:
        problems = check_report(run.report)
        run.report.update(ok=not problems, problems=problems)
        args.out.write_text(json.dumps(run.report, indent=2))
        print(json.dumps({"ok": not problems, "problems": problems, "report": str(args.out)}), flush=True)
    return 0 if not problems else 1


def _check(args: argparse.Namespace, run: Run) -> None:  # pragma: no cover - needs a GPU
    import httpx

    from profiles import resolve_profile
    from zumik_serve.app.stack import LocalStack, StackConfig
    from zumik_serve.home import ZumikHome
    from zumik_serve.store.local_redis import free_port

    if run.step("environment", _environment) is None:
        return
    work = Path(tempfile.mkdtemp(prefix="zumik-gpu-e2e-"))
    disk_root = args.disk_root or work / "kv"
    base = tiny_cuda_profile() if args.tiny else resolve_profile(args.profile)
    full = tiered_profile(base, only=None, disk_root=disk_root, host_bytes=args.host_bytes)
    home = ZumikHome(work / "home")
    stack = LocalStack(StackConfig(profile=full, home=home, port=free_port(), dev_key=None))
    model = full.model.served_name
    try:
        if run.step("serve", lambda: {"url": stack.start(print).url, "timings_s": stack.timings_s}) is None:
            return
        key = asyncio.run(_tenant(stack.redis_url))
        http = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=300)

        def chat(content: str, **headers: str) -> Any:
            body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
            return http.post("/v1/chat/completions", json=body, headers=headers)

        prompt = f"{uuid.uuid4()} " + "A long stable prefix the agent sends on every turn. " * 30

        def repeat() -> dict[str, Any]:
            first, second = _cached(chat(prompt)), _cached(chat(prompt))
            if second <= 0:
                raise RuntimeError(f"the repeated prompt was not cached (cached_tokens {first}, {second})")
            return {"first_cached_tokens": first, "second_cached_tokens": second}

        run.step("repeat", repeat)
        canary = f"GPU-CANARY-{uuid.uuid4().hex} "
        ids: dict[str, str] = {}

        def snapshot() -> dict[str, Any]:
            ids["artifact"] = http.post(
                "/v2/artifacts", json={"role": "document", "content": canary * 60}
            ).json()["id"]
            ids["bundle"] = http.post("/v2/bundles", json={"artifacts": [ids["artifact"]]}).json()["id"]
            ids["snapshot"] = http.post("/v2/snapshots", json={"bundle": ids["bundle"]}).json()["id"]
            warm = [_cached(chat("hello", **{"x-zumik-snapshot": ids["snapshot"]})) for _ in range(2)]
            time.sleep(5)  # stores are write-behind: let them reach the tiers before the replica goes
            return {**ids, "warm_cached_tokens": warm}

        if run.step("snapshot", snapshot) is None:
            return
        for tier in TIERS:

            def restore(tier: str = tier) -> dict[str, Any]:
                stack.redeploy(
                    tiered_profile(base, only=tier, disk_root=disk_root, host_bytes=args.host_bytes)
                )
                answer = chat("hello", **{"x-zumik-snapshot": ids["snapshot"]})
                tiers = restored_tiers(answer.headers.get("server-timing", ""))
                cached = _cached(answer)
                if cached <= 0 or set(tiers) != {tier}:
                    raise RuntimeError(
                        f"a fresh replica with only the {tier} tier: cached {cached}, restored {tiers}"
                    )
                return {
                    "cached_tokens": cached,
                    "tiers": tiers,
                    "server_timing": answer.headers.get("server-timing"),
                }

            run.step(f"restore-{tier}", restore)
        receipt: dict[str, Any] = {}

        def purge() -> dict[str, Any]:
            stack.redeploy(full)
            response = http.post("/v2/purge", json={"target": ids["artifact"]})
            if response.status_code != 200:
                raise RuntimeError(f"purge answered {response.status_code}: {response.text[:300]}")
            receipt.update(response.json()["receipt"])
            status = chat("hello", **{"x-zumik-snapshot": ids["snapshot"]}).status_code
            after = _cached(chat(prompt))
            if status != 404 or after != 0:
                raise RuntimeError(f"after the purge: snapshot chat {status}, repeated prompt cached {after}")
            return {
                "receipt_id": receipt["id"], "guarantee_class": receipt["guarantee_class"],
                "stores": receipt["stores"], "snapshot_status": status, "cached_after": after,
            }  # fmt: skip

        if run.step("purge", purge) is None:
            return

        def verify() -> dict[str, Any]:
            keys = http.get("/v2/keys").json()["keys"]
            public = next(k["public_key"] for k in keys if k["key_id"] == receipt["key_id"])
            (work / "key.pem").write_text(public)
            (work / "receipt.json").write_text(json.dumps(receipt))
            (work / "changed.json").write_text(json.dumps({**receipt, "guarantee_class": "crypto_erased"}))
            command = [sys.executable, "-m", "zumik_serve.cli", "receipt", "verify"]
            exits = [
                subprocess.run(
                    [*command, str(work / name), "--public-key", str(work / "key.pem")], check=False
                ).returncode
                for name in ("receipt.json", "changed.json")
            ]
            if exits != [0, 1]:
                raise RuntimeError(f"receipt verify exits {exits}, expected [0, 1]")
            return {"intact_exit": exits[0], "changed_exit": exits[1]}

        run.step("receipt", verify)
    finally:
        stack.stop()


async def _tenant(redis_url: str) -> str:  # pragma: no cover - needs the stack
    import redis.asyncio as aioredis

    from zumik_serve.tenancy.store import RedisTenantStore

    client = aioredis.from_url(redis_url)
    try:
        _, key = await RedisTenantStore(client).create_tenant(f"gpu-e2e-{uuid.uuid4().hex[:8]}")
    finally:
        await client.aclose()
    return str(key)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a checkout
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.exit(main())
