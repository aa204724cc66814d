"""Logical state: artifacts, bundles, sessions, branches, snapshots, and the snapshot compiler.

Rules (the /v2 reference in ``docs/api.md``): artifacts, bundles and snapshots never change
once created; sessions and branches only grow, one gap-free sequence number per turn; a branch
never touches its parent; every handle is scoped to one tenant, and another tenant's handle is
"not found".

    objects.py    the values (frozen dataclasses) and their stored JSON
    requests.py   the /v2 request bodies (pydantic models) and their 400s
    responses.py  the /v2 response bodies
    outcomes.py   what the store answers for writes that can end more than one way
    service.py    the rules, per tenant (no Redis, no HTTP)
    store.py      Redis: the only module here that imports it
    compiler.py   snapshot → chat messages → token ids
"""
