"""Where the Ray head of a running ``zumik serve`` is, for the operator's commands.

``zumik tenant delete`` sweeps every node's KV tiers through the cluster the stack runs on
(``app/node_sweep.py``). A stack notes its head's GCS address in the home's run folder while it
is up, with its own pid (the head of a local stack ends with it); ``RAY_ADDRESS`` names another
cluster. Kept apart from the Ray code so that the stack records it without importing Ray.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from zumik_serve.home import ZumikHome

RAY_ADDRESS_ENV = "RAY_ADDRESS"
RAY_RUN_FILE = "ray.json"  # in the home's run folder


def record_ray_address(home: ZumikHome, address: str) -> None:
    """Note the GCS address of the cluster this process runs the stack on, for the operator's
    commands (``running_ray_address``). The file names this process: once it ends, the stack
    (and a head it started) is gone, and the address is no longer read."""
    home.ensure()
    (home.run_dir / RAY_RUN_FILE).write_text(json.dumps({"address": address, "pid": os.getpid()}))


def forget_ray_address(home: ZumikHome) -> None:
    (home.run_dir / RAY_RUN_FILE).unlink(missing_ok=True)


def running_ray_address(home: ZumikHome, environ: Mapping[str, str] = os.environ) -> str | None:
    """``RAY_ADDRESS``, else the head a running ``zumik serve`` of this home started, else None."""
    if environ.get(RAY_ADDRESS_ENV):
        return environ[RAY_ADDRESS_ENV]
    try:
        info = json.loads((home.run_dir / RAY_RUN_FILE).read_text())
        address, pid = str(info["address"]), int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except PermissionError:  # the stack runs as another user: it is there
        return address
    except OSError:
        return None
    return address
