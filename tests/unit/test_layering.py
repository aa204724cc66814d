"""The domain stays free of framework imports (DESIGN.md section 3)."""

from __future__ import annotations

import subprocess
import sys

DOMAIN_MODULES = [
    "profiles",
    "kvstore",
    "zumik_serve.tenancy.tenant",
    "zumik_serve.ids",
    "zumik_serve.errors",
    "zumik_serve.pipeline.service",
    "zumik_serve.engines.protocol",
    "zumik_serve.engines.vllm_config",
    "zumik_serve.model.tiny",
    "zumik_serve.state.objects",
    "zumik_serve.state.compiler",
    "zumik_serve.state.service",
    "zumik_serve.routing.scheduler",
    "zumik_serve.reuse.evidence",
    "zumik_serve.reuse.figures",
    "kvstore.compat",
    "kvstore.keys",
    "kvstore.tier",
    "kvstore.manager",
    "kvstore.codec",
    "kvstore.tiers.shared_memory",
    "kvstore.tiers.disk",
    "zumik_serve.routing.breaker",
    "zumik_serve.routing.residency",
    "zumik_serve.routing.decision",
    "zumik_serve.routing.replay",
    "zumik_serve.routing.retry",
    "zumik_serve.routing.release",
    "zumik_serve.purge.classes",
    "zumik_serve.purge.receipt",
]
FRAMEWORKS = ["ray", "fastapi", "vllm", "torch", "redis", "starlette"]


def test_domain_modules_import_no_framework() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {module}\n" for module in DOMAIN_MODULES)
        + f"print(','.join(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"framework modules imported by the domain: {result.stdout}"
