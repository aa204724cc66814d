"""A fresh vLLM engine process with Zumik's KV connector, for connector tests.

    python -m tests.support.kv_engine MODEL_DIR CONFIG_JSON PROMPTS_JSON

Prints one JSON line: for each prompt (a list of token ids), the number of cached prompt tokens
vLLM reports and the greedy output token ids.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir, config, prompts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(
        model=model_dir, dtype="bfloat16", block_size=32, kv_cache_memory_bytes=128 << 20, max_model_len=2048,
        enforce_eager=True, enable_prefix_caching=True, seed=0,
        kv_transfer_config={
            "kv_connector": "ZumikKVConnector", "kv_connector_module_path": "kvstore.connector",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": config,
        },
    )  # fmt: skip
    results = []
    for prompt in prompts:  # one at a time: each restore is its own request
        (output,) = llm.generate(
            [TokensPrompt(prompt_token_ids=prompt)], SamplingParams(max_tokens=16, temperature=0)
        )
        results.append({"cached": output.num_cached_tokens, "ids": list(output.outputs[0].token_ids)})
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
