"""KV tier manager: compat keys, block keys, tiers (host RAM, Redis, disk) and the ordered walk.

Rule kept here (DESIGN.md section 2): logical state is not physical KV state. A block is reused
only under an identical compat key and cache salt; a mismatch, a gap, a corrupt or unreachable
entry is a miss and a recompute, never a wrong answer and never a client error.

The vLLM KV connector that feeds these tiers to engine replicas is ``connector.py``
(``ZumikKVConnector``, loaded by vLLM through ``kv_connector_module_path``); warming a snapshot
is ``POST /v2/snapshots/{id}/warm`` (``zumik_serve/pipeline/pipeline.py``).
"""
