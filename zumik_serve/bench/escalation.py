"""The escalation arm of ``zumik bench routing``: what evidence-backed escalation costs.

One tenant runs an agent whose reuse grows over time: at first most calls are one-off prompts,
later most resend the agent's long system prompt with a short new suffix. The same request
sequence runs three times through the production gateway app in process (real Redis, real
reuse ledger, the real scheduler), each time under a profile that differs only in routing:

    managed-only   every request to the managed route
    byoc-only      every request to the tenant's own engines
    zumik          managed by default, escalating to BYOC per prefix family once the ledger's
                   evidence reaches the threshold and the priced comparison says BYOC is cheaper

The managed provider is an OpenAI-compatible server on loopback that caches prefixes per
``prompt_cache_key`` the way hosted providers do (prompts of at least 1024 tokens, in steps of
128 tokens, reported as ``cached_tokens``); the BYOC engine is an in-process prefix cache that
reports what it held (whole 32-token blocks). Token counts are characters // 4. Each request is
priced at the route that served it, with the profile's prices: uncached input, cached input and
output. Reported: cost per 1k requests of each arm, the request at which Zumik first escalated,
and where the evidence stood then.
"""

from __future__ import annotations

import asyncio
import random
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from profiles import Profile, parse_profile
from zumik_serve.engines.protocol import EngineCall, EngineEvent, EngineResponse, ReplicaAssigned

ARMS = ("managed-only", "byoc-only", "zumik")
CHARS_PER_TOKEN = 4
PROVIDER_MIN_TOKENS, PROVIDER_STEP_TOKENS = 1024, 128  # how hosted providers cache prefixes
ENGINE_BLOCK_TOKENS = 32
OUTPUT_TOKENS = 8
THRESHOLD_TOKENS = 6000  # escalation.min_reused_tokens_in_window of the zumik arm

# The arms' profile (its lines are YAML, as an operator writes them).
PROFILE = """
name: bench-escalation-{arm}
model: {{source: "builtin:tiny", served_name: zumik-tiny}}
engine: {{device: cpu, kv_cache_memory_bytes: 1048576, max_model_len: 8192}}
routes:
  - {{name: managed, kind: managed, base_url: "{base_url}", model: bench-managed,
     api_key_env: ZUMIK_BENCH_MANAGED_KEY, timeout_s: 30,
     prices: {{input: "1.00", cached_input: "0.50", output: "4.00"}}}}
  - {{name: local, kind: byoc, replica_hour_usd: "3.00", tokens_per_replica_hour: 2000000}}
routing:
  default_route: {default}
  fallback_order: [{default}]
  escalation: {{to: {to}, min_evidence: reported, min_reused_tokens_in_window: {threshold}, window_s: 3600}}
"""


@dataclass(frozen=True)
class ArmCost:
    arm: str
    requests: int
    byoc_requests: int
    cost_pusd: int
    first_escalated: int | None  # index of the first request Zumik sent to BYOC (None: never)
    evidence_at_escalation: dict[str, Any] | None  # the recorded evidence of that decision

    @property
    def usd_per_1k_requests(self) -> float:
        return self.cost_pusd / 1e12 * 1000 / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "usd_per_1k_requests": self.usd_per_1k_requests}


def workload(seed: int, requests: int) -> list[str]:
    """Prompts whose reuse grows: request i resends the agent's system prompt (about 1500
    tokens) with probability i / requests, else it is a one-off prompt as long."""
    rng = random.Random(seed)
    words = [f"w{n}" for n in range(500)]

    def text(tokens: int) -> str:
        out = " ".join(rng.choice(words) for _ in range(tokens * CHARS_PER_TOKEN // 4))
        return out[: tokens * CHARS_PER_TOKEN].ljust(tokens * CHARS_PER_TOKEN)

    system = text(1500)
    prompts = []
    for index in range(requests):
        head = system if rng.random() < index / requests else text(1500)
        prompts.append(head + text(60))
    return prompts


def arm_profile(arm: str, base_url: str) -> Profile:
    default = "local" if arm == "byoc-only" else "managed"
    to = "byoc" if arm == "zumik" else "none"
    text = PROFILE.format(arm=arm, base_url=base_url, default=default, to=to, threshold=THRESHOLD_TOKENS)
    return parse_profile(text, source=f"bench escalation {arm}")


# --- the managed provider: an OpenAI-compatible server on loopback --------------------------------


class ProviderCache:
    """Prefixes a hosted provider caches, per ``prompt_cache_key``: prompts of at least
    ``PROVIDER_MIN_TOKENS`` tokens, whole ``PROVIDER_STEP_TOKENS`` steps of them."""

    def __init__(self) -> None:
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def cached_tokens(self, key: str, prompt: str) -> int:
        tokens = len(prompt) // CHARS_PER_TOKEN
        if tokens < PROVIDER_MIN_TOKENS:
            return 0
        step = PROVIDER_STEP_TOKENS * CHARS_PER_TOKEN
        with self._lock:
            seen = self._seen.setdefault(key, set())
            hit = 0
            while (hit + 1) * step <= len(prompt) - CHARS_PER_TOKEN and prompt[: (hit + 1) * step] in seen:
                hit += 1
            seen.update(prompt[: n * step] for n in range(1, len(prompt) // step + 1))
        return hit * PROVIDER_STEP_TOKENS


@contextmanager
def managed_provider() -> Iterator[str]:
    """A loopback provider answering /v1/completions with usage and cached tokens; its base URL."""
    import json

    import uvicorn

    cache = ProviderCache()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """POST /v1/completions only (a plain ASGI app: the bench imports no web framework)."""
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        status, payload = (
            404,
            {"error": {"message": "only POST /v1/completions", "type": "invalid_request_error"}},
        )
        if scope["method"] == "POST" and scope["path"] == "/v1/completions":
            body = json.loads(b"".join(chunks) or b"{}")
            prompt = str(body.get("prompt") or "")
            cached = cache.cached_tokens(str(body.get("prompt_cache_key") or ""), prompt)
            status, payload = 200, _answer(prompt, cached, "text_completion")
        data = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the loopback provider did not start within 10 s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _answer(prompt: str, cached: int, kind: str) -> dict[str, Any]:
    usage = {
        "prompt_tokens": len(prompt) // CHARS_PER_TOKEN,
        "completion_tokens": OUTPUT_TOKENS,
        "total_tokens": len(prompt) // CHARS_PER_TOKEN + OUTPUT_TOKENS,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    choice = {"index": 0, "text": " ok" * OUTPUT_TOKENS, "finish_reason": "length", "logprobs": None}
    return {
        "id": "cmpl-bench",
        "object": kind,
        "created": 0,
        "model": "bench",
        "choices": [choice],
        "usage": usage,
    }


# --- the BYOC engine: a prefix cache of whole blocks ----------------------------------------------


class PrefixCacheEngine:
    """An engine replica on the ``EngineClient`` protocol whose usage reports the whole
    ``ENGINE_BLOCK_TOKENS`` blocks of the prompt it held from earlier prompts (unbounded)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    async def complete(self, call: EngineCall, body: dict[str, Any]) -> list[EngineEvent]:
        prompt = str(body.get("prompt") or "")
        step = ENGINE_BLOCK_TOKENS * CHARS_PER_TOKEN
        salted = str(body.get("cache_salt") or "") + "\x1f"
        hit = 0
        while (hit + 1) * step <= len(prompt) - CHARS_PER_TOKEN and salted + prompt[
            : (hit + 1) * step
        ] in self._seen:
            hit += 1
        self._seen.update(salted + prompt[: n * step] for n in range(1, len(prompt) // step + 1))
        return [
            ReplicaAssigned("bench-r0"),
            EngineResponse(_answer(prompt, hit * ENGINE_BLOCK_TOKENS, "text_completion")),
        ]

    async def generate(self, call: EngineCall, body: dict[str, Any]) -> AsyncIterator[EngineEvent]:
        for event in await self.complete(call, body):
            yield event


# --- the arms ---------------------------------------------------------------------------------


async def run_arm(arm: str, prompts: list[str], *, base_url: str, redis_url: str, model_dir: Path,
                  secrets_dir: Path) -> ArmCost:  # fmt: skip
    from zumik_serve.api.app import build_app
    from zumik_serve.app.context import GatewaySettings, Metrics, build_context
    from zumik_serve.store.client import gateway_client
    from zumik_serve.tenancy.store import RedisTenantStore

    profile = arm_profile(arm, base_url)
    settings = GatewaySettings(
        profile_name=profile.name, served_model=profile.model.served_name, model_created_s=0,
        redis_url=redis_url, max_body_bytes=profile.gateway.max_body_bytes,
        max_artifact_bytes=profile.gateway.max_artifact_bytes, model_dir=str(model_dir), compat_digest="",
        block_size=profile.engine.block_size, kv_redis_tier=False, purge_ceiling=profile.purge.ceiling,
        profile_json=profile.model_dump_json(), secrets_dir=str(secrets_dir),
    )  # fmt: skip
    app = build_app(build_context(settings, {"bench-r0": PrefixCacheEngine()}, Metrics()))
    app.state.pipeline.evidence_ttl_s = 0.0  # each decision reads the ledger as it stands
    client = gateway_client(redis_url)
    try:
        _, api_key = await RedisTenantStore(client).create_tenant(f"bench-{arm}-{random.randrange(10**9)}")
    finally:
        await client.aclose()
    prices = {route.name: route.token_prices_pusd() for route in profile.effective_routes()}
    cost = byoc = 0
    first: int | None = None
    evidence: dict[str, Any] | None = None
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers) as http:
        for index, prompt in enumerate(prompts):
            body = {"model": "zumik-tiny", "prompt": prompt, "max_tokens": OUTPUT_TOKENS}
            response = await http.post("/v1/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{arm}: request {index}: {response.status_code} {response.text[:300]}")
            usage = response.json()["usage"]
            route = response.headers["x-zumik-route"]
            name = "local" if route.startswith("byoc:") else route.split(":", 1)[1]
            input_price, cached_price, output_price = prices[name]
            cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
            cost += (usage["prompt_tokens"] - cached) * input_price + cached * cached_price
            cost += usage["completion_tokens"] * output_price
            if name == "local":
                byoc += 1
                if first is None and arm == "zumik":
                    first = index
                    decision = await http.get(f"/v2/decisions/{response.headers['x-zumik-decision-id']}")
                    record = decision.json()["record"]
                    evidence = {**record["inputs"]["evidence"], "verdict": record["escalation"]["reason"]}
            await _ledger_settles()
    return ArmCost(arm, len(prompts), byoc, cost, first, evidence)


async def _ledger_settles() -> None:
    """Wait for the background ledger write of the last answer (it is written after the answer),
    so that each decision sees every answer before it, whatever the machine's speed."""
    pending = asyncio.all_tasks() - {asyncio.current_task()}
    if pending:
        await asyncio.wait(pending, timeout=10)


def run_escalation(*, requests: int, seed: int) -> dict[str, Any]:
    """Every arm on the same prompts: their costs and the verdict; in-process, no Ray."""
    from zumik_serve.model.tiny import build_tiny_model
    from zumik_serve.server_secrets import generate_missing
    from zumik_serve.store.local_redis import LocalRedis

    prompts = workload(seed, requests)
    import os

    os.environ.setdefault("ZUMIK_BENCH_MANAGED_KEY", "sk-bench-managed")
    with tempfile.TemporaryDirectory(prefix="zumik-bench-escalation-") as tmp:
        root = Path(tmp)
        secrets = root / "secrets"
        generate_missing(secrets)
        model_dir = build_tiny_model(root / "tiny")
        server = LocalRedis(data_dir=root / "redis").start()
        try:
            with managed_provider() as base_url:
                costs = [
                    asyncio.run(
                        run_arm(
                            arm,
                            prompts,
                            base_url=base_url,
                            redis_url=server.url,
                            model_dir=model_dir,
                            secrets_dir=secrets,
                        )
                    )  # fmt: skip
                    for arm in ARMS
                ]
        finally:
            server.stop()
    by_arm = {cost.arm: cost for cost in costs}
    cheaper = min(by_arm["managed-only"].cost_pusd, by_arm["byoc-only"].cost_pusd)
    ratio = by_arm["zumik"].cost_pusd / cheaper if cheaper else 0.0
    return {
        "requests": requests, "seed": seed, "threshold_tokens": THRESHOLD_TOKENS,
        "arms": [cost.to_json() for cost in costs],
        "zumik_over_cheaper_arm": ratio, "within_5_percent": ratio <= 1.05,
    }  # fmt: skip


def print_escalation(summary: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"Escalation: cost per 1k requests ({summary['requests']} requests, reuse growing)")
    for column in ("arm", "USD / 1k requests", "BYOC requests", "first escalated at"):
        table.add_column(column)
    for arm in summary["arms"]:
        first = "-" if arm["first_escalated"] is None else str(arm["first_escalated"])
        table.add_row(arm["arm"], f"{arm['usd_per_1k_requests']:.4f}", str(arm["byoc_requests"]), first)
    console.print(table)
    zumik = next(arm for arm in summary["arms"] if arm["arm"] == "zumik")
    if zumik["evidence_at_escalation"] is not None:
        console.print(f"evidence at the first escalation: {zumik['evidence_at_escalation']}")
    console.print(
        f"zumik / cheaper single route: {summary['zumik_over_cheaper_arm']:.3f} "
        f"({'within' if summary['within_5_percent'] else 'NOT within'} 5%)"
    )
