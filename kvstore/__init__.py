"""KV tier manager: compat keys, block keys, tiers and the vLLM KV connector.

The tiers land with the KV tier manager issue; the profile's compat-key inputs (model,
tokenizer, dtype, KV dtype, block size, parallel layout, region) already live in ``profiles``.
"""
