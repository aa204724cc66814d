"""Logical state: artifacts, bundles, sessions, branches, snapshots, and the snapshot compiler.

Rules (DESIGN.md section 5): artifacts, bundles and snapshots never change once created;
sessions and branches only grow, one gap-free sequence number per turn; a branch never touches
its parent; every handle is scoped to one tenant, and another tenant's handle is "not found".
This package holds the values and the pure rules; Redis lives in ``store/state_store.py``.
"""
