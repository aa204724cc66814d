"""Prefix families and the provider cache keys derived from them, per tenant.

A prefix family is the set of a tenant's prompts that start the same way: the first
``FAMILY_TOKENS`` tokens of the prompt text (about ``CHARS_PER_TOKEN`` characters each, as the
scheduler's prefix keys count them), under the tenant's cache salt. An agent's calls share their
system prompt and tools, so they share a family while their suffixes differ; a prompt shorter
than that is a family of its own. It is what escalation evidence is counted by
(``reuse/store.py``) and what a provider's ``prompt_cache_key`` is derived from.

Rules kept here: a family id and a cache key are keyed hashes under the tenant's cache salt (an
HMAC of the server's cache-salt secret, ``tenancy/tenant.py``), so the same prefix under two
tenants gives unrelated ids and keys, and nobody without the secret can tell which prefix an id
stands for; a client's own ``prompt_cache_key`` is kept, namespaced inside its tenant (hashed
under the same salt), so two tenants sending the same key never share a provider cache group.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import NewType

from zumik_serve.routing.scheduler import CHARS_PER_TOKEN

FAMILY_TOKENS = 256  # about what a provider hashes to route a prompt to a cache (its first tokens)
FAMILY_CHARS = FAMILY_TOKENS * CHARS_PER_TOKEN

PrefixFamily = NewType("PrefixFamily", str)  # "fam_" + 24 hex digits


def prefix_family(salt: str, prompt_text: str) -> PrefixFamily:
    """The family of a prompt (its first ``FAMILY_CHARS`` characters) in the tenant's scope."""
    head = prompt_text[:FAMILY_CHARS].encode()
    digest = hmac.new(salt.encode(), b"zumik-family/1\x1f" + head, hashlib.sha256).hexdigest()
    return PrefixFamily("fam_" + digest[:24])


def provider_cache_key(salt: str, *, family: str, client_key: str | None = None) -> str:
    """The ``prompt_cache_key`` sent to a provider: the client's own key namespaced inside its
    tenant when it sent one, else the prompt's family's; both hashed under the tenant's salt.
    Stable for a tenant and a family (or a client key); never the same for two tenants."""
    material = f"client\x1f{client_key}" if client_key is not None else f"family\x1f{family}"
    digest = hmac.new(salt.encode(), b"zumik-prompt-cache-key/2\x1f" + material.encode(), hashlib.sha256)
    return "zk-" + digest.hexdigest()[:32]
