"""One fresh vLLM engine process with Zumik's KV connector (for `zumik bench tiers` and tests).

    python -m zumik_serve.bench.kv_engine REQUEST_JSON

REQUEST_JSON: {"model_dir", "config" (kv_connector_extra_config), "prompts" (token id lists),
"mode": "generate" | "prime" | "restore" | "pressure", "max_tokens", "repeats", and the engine's
"max_num_batched_tokens" (a prompt longer than it is prefilled in chunks) and "kv_cache_bytes"
(default 128 MiB)}. Prints one line
``RESULT <json>``: a list with, per prompt, ``cached`` (prompt tokens vLLM reports cached),
``ids`` (greedy output) and ``seconds`` (the generate call); in ``prime`` mode also
``host_seconds`` / ``host_cached``, the same prompt again after the engine's own prefix cache was
reset (so it restores from tiers). With ``repeats`` (restore and prime modes), the restore is
done that many times more, the engine's prefix cache reset before each (``warm_seconds``): the
first restore of a fresh engine pays first-call costs (connections, buffers growing) that the
later ones, like a serving engine's, do not. After them, ``engine_hit_seconds`` /
``engine_hit_cached``: the same prompt from vLLM's own prefix cache (``repeats`` times, at least
once), the floor of a restore's TTFT in that same process (processes differ by several ms a
step on this machine, so each restore is set beside its own process's).
In ``pressure`` mode each prompt is first generated alone (``alone_ids``; its blocks stored),
then vLLM's own prefix cache is reset and all prompts are generated at once, in a KV cache too
small for all of them, so vLLM preempts requests and resumes them, restoring their prompts from
the tiers (``ids``; ``preemptions``: how many the engine counted).
Stores run behind the engine step (``kvstore/write_behind.py``): before a restore of what it
just computed, and before it exits, the process waits for its workers' store queues.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


class FlushKvWrites:
    """Mixed into vLLM's workers (``worker_extension_cls``): ``collective_rpc("flush_kv_writes")``
    waits for each worker's store queue."""

    def flush_kv_writes(self) -> bool:
        from kvstore.connector import flush_writes

        return flush_writes()


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(sys.argv[1])
    mode = request.get("mode")
    batched = (
        {"max_num_batched_tokens": request["max_num_batched_tokens"]}
        if "max_num_batched_tokens" in request
        else {}
    )
    llm = LLM(
        model=request["model_dir"], dtype="bfloat16", block_size=32,
        kv_cache_memory_bytes=int(request.get("kv_cache_bytes", 128 << 20)), **batched,
        max_model_len=2048, enforce_eager=True, enable_prefix_caching=True, seed=0,
        disable_log_stats=mode != "pressure",  # the preemption count is one of its stats
        worker_extension_cls="zumik_serve.bench.kv_engine.FlushKvWrites",
        kv_transfer_config={
            "kv_connector": "ZumikKVConnector", "kv_connector_module_path": "kvstore.connector",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": request["config"],
        },
    )  # fmt: skip
    params = SamplingParams(max_tokens=int(request.get("max_tokens", 16)), temperature=0)
    llm.generate([TokensPrompt(prompt_token_ids=[5, 6, 7])], params)  # warm-up, no full block

    def run(prompt: list[int]) -> dict[str, Any]:
        started = time.perf_counter()
        (output,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        return {
            "seconds": time.perf_counter() - started,
            "cached": output.num_cached_tokens,
            "ids": list(output.outputs[0].token_ids),
            "kv": (output.kv_transfer_params or {}).get("zumik_kv"),  # the connector's report
        }

    def restore_again(prompt: list[int]) -> dict[str, Any]:
        llm.reset_prefix_cache()
        return run(prompt)

    if mode == "pressure":
        print("RESULT " + json.dumps(under_pressure(llm, request["prompts"], params, run)), flush=True)
        return
    results = []
    repeats = int(request.get("repeats", 0))
    for prompt in request["prompts"]:  # one request at a time: each restore is measured alone
        result = run(prompt)
        if mode == "prime":
            llm.collective_rpc("flush_kv_writes")
            again = restore_again(prompt)
            result.update(host_seconds=again["seconds"], host_cached=again["cached"])
        if mode in ("prime", "restore"):
            result["warm_seconds"] = [restore_again(prompt)["seconds"] for _ in range(repeats)]
            # vLLM's own prefix cache holds the prompt now: in this same process, the TTFT no
            # restore can beat (no tier is asked)
            hits = [run(prompt) for _ in range(max(repeats, 1))]
            result.update(
                engine_hit_seconds=[hit["seconds"] for hit in hits], engine_hit_cached=hits[0]["cached"]
            )
        results.append(result)
    llm.collective_rpc("flush_kv_writes")
    print("RESULT " + json.dumps(results), flush=True)


def under_pressure(llm: Any, prompts: list[list[int]], params: Any, run: Any) -> list[dict[str, Any]]:
    """Each prompt alone, then all at once in a KV cache that cannot hold them (``pressure``)."""
    from vllm.inputs import TokensPrompt

    alone = [run(prompt)["ids"] for prompt in prompts]
    llm.collective_rpc("flush_kv_writes")  # every prompt's blocks are in the tiers
    llm.reset_prefix_cache()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    preemptions = sum(
        int(getattr(metric, "value", 0))
        for metric in llm.get_metrics()
        if metric.name == "vllm:num_preemptions"
    )
    return [
        {"alone_ids": ids, "ids": list(output.outputs[0].token_ids), "preemptions": preemptions,
         "kv": (output.kv_transfer_params or {}).get("zumik_kv")}
        for ids, output in zip(alone, outputs, strict=True)
    ]  # fmt: skip


if __name__ == "__main__":
    main()
