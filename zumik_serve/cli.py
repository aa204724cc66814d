"""The ``zumik`` command line: serve, tenants, the tiny model, benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zumik", description=__doc__)
    sub = parser.add_subparsers(title="commands")

    serve = sub.add_parser(
        "serve", help="start Redis, Ray and the Zumik app; SIGTERM or Ctrl-C drains, then stops all"
    )
    serve.add_argument(
        "--profile", action="append", default=None,
        help="built-in profile name or YAML path (default local-cpu); repeat it to serve several "
        "profiles, the first being the default and x-zumik-profile choosing",
    )  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--ingress", choices=["haproxy", "serve"], default="haproxy",
        help="HTTP ingress of a local Ray head: Serve's HAProxy (default, fastest) or its Python proxy",
    )  # fmt: skip
    _add_monitoring_arguments(serve)
    serve.set_defaults(run=_cmd_serve)

    tenant = sub.add_parser("tenant", help="manage tenants").add_subparsers(title="tenant commands")
    create = tenant.add_parser("create", help="create a tenant and print its API key (shown once)")
    create.add_argument("name")
    create.add_argument(
        "--qos", help="QoS classes it may use, comma-separated (default: interactive,standard,batch)"
    )
    create.add_argument(
        "--no-reuse-accounting", action="store_true",
        help="keep no opportunity index of its prompts and no reuse ledger (headers say 'unknown')",
    )  # fmt: skip
    create.add_argument(
        "--profiles", help="profiles it may use (x-zumik-profile), comma-separated (default: every profile)"
    )
    create.add_argument("--json", action="store_true", help="machine-readable output")
    create.set_defaults(run=_cmd_tenant_create)
    listing = tenant.add_parser("list", help="every tenant, its id and how many keys it has")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_cmd_tenant_list)
    delete = tenant.add_parser(
        "delete", help="revoke every key of a tenant, purge all its data, print a signed receipt"
    )
    delete.add_argument("name")
    delete.add_argument("--yes", action="store_true", help="confirm: the deletion cannot be undone")
    delete.add_argument("--receipt-out", type=Path, help="write the receipt here (default: print it)")
    delete.add_argument("--profile", default="local-cpu", help="the running profile (its KV tiers, ceiling)")
    delete.add_argument(
        "--ray-address",
        help="the Ray cluster whose nodes' KV tiers are swept (default: RAY_ADDRESS, else the head "
        "of a running `zumik serve`; none: this machine's tiers only)",
    )
    delete.set_defaults(run=_cmd_tenant_delete)
    key = tenant.add_parser("key", help="a tenant's API keys").add_subparsers(title="key commands")
    key_create = key.add_parser("create", help="a new API key for a tenant (printed once)")
    key_list = key.add_parser("list", help="a tenant's key ids, hints and creation times (never the keys)")
    key_revoke = key.add_parser("revoke", help="revoke one key; every gateway refuses it within 1 s")
    for command in (key_create, key_list, key_revoke):
        command.add_argument("tenant")
    key_revoke.add_argument("key_id", help="as `zumik tenant key list` shows it (key_...)")
    key_runs = ((key_create, _cmd_key_create), (key_list, _cmd_key_list), (key_revoke, _cmd_key_revoke))
    for command, run in key_runs:
        command.add_argument("--json", action="store_true")
        command.set_defaults(run=run)

    quota = tenant.add_parser("quota", help="a tenant's quotas").add_subparsers(title="quota commands")
    quota_set = quota.add_parser("set", help="override the profile's default limits for one tenant")
    quota_show = quota.add_parser("show", help="a tenant's limits in force, its overrides and its usage")
    for command in (quota_set, quota_show):
        command.add_argument("tenant", help="the tenant's name (or its id, ten_...)")
        command.add_argument("--json", action="store_true", help="machine-readable output")
    quota_show.add_argument("--profile", default="local-cpu", help="the profile whose defaults apply")
    for name in ("stored_bytes", "objects", "session_turns", "kv_bytes", "requests_per_minute",
                 "tokens_per_minute"):  # fmt: skip
        quota_set.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar="N|unlimited|default")
    quota_set.set_defaults(run=_cmd_tenant_quota)
    quota_show.set_defaults(run=_cmd_tenant_quota)

    decision = sub.add_parser("decision", help="routing decisions").add_subparsers(title="decision commands")
    replay = decision.add_parser("replay", help="replay a recorded decision; exit 1 if it differs")
    replay.add_argument("decision_id", help="as the x-zumik-decision-id response header gives it (dec_...)")
    replay.add_argument("--tenant", help="the tenant's name (default: whichever tenant holds the id)")
    replay.add_argument("--json", action="store_true", help="machine-readable output")
    replay.set_defaults(run=_cmd_decision_replay)

    model = sub.add_parser("model", help="models").add_subparsers(title="model commands")
    tiny = model.add_parser("tiny", help="build the tiny test model (byte-identical every time)")
    tiny.add_argument("--out", required=True, type=Path)
    tiny.add_argument("--json", action="store_true")
    tiny.set_defaults(run=_cmd_model_tiny)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(title="benchmarks")
    overhead = bench.add_parser(
        "overhead", help="latency Zumik's /v1 adds over vLLM's own server, interleaved rounds"
    )
    overhead.add_argument("--profile", default="local-cpu")
    overhead.add_argument("--rounds", type=int, default=7)
    overhead.add_argument("--requests", type=int, default=40, help="requests per arm per round")
    overhead.add_argument("--warmup", type=int, default=20)
    overhead.add_argument("--out", type=Path, default=Path("bench-out/overhead"))
    overhead.add_argument(
        "--placement", choices=["separate", "colocated"], help="override the profile's gateway placement"
    )
    overhead.add_argument("--ingress", choices=["haproxy", "serve"], default="haproxy")
    overhead.add_argument(
        "--shapes", type=lambda text: text.split(","), default=["repeated", "shared-prefix", "unique"],
        help="comma-separated prompt shapes: repeated, shared-prefix, unique",
    )  # fmt: skip
    overhead.add_argument(
        "--arms", type=lambda text: text.split(","),
        default=["vllm-defaults", "vllm", "vllm-connector", "zumik"],
        help="comma-separated arms: vllm-defaults, vllm, vllm-connector, zumik (vllm is needed)",
    )  # fmt: skip
    overhead.add_argument(
        "--accounting", action="store_true",
        help="add an arm for a tenant without reuse accounting (its cost, as a share of the added latency)",
    )  # fmt: skip
    overhead.add_argument("--json", action="store_true")
    overhead.set_defaults(run=_cmd_bench_overhead)
    state = bench.add_parser("state", help="state-store rates next to redis-benchmark SET, same server")
    state.add_argument("--ops", type=int, default=20000, help="operations per arm")
    state.add_argument("--concurrency", type=int, default=50)
    state.add_argument("--out", type=Path, default=Path("bench-out/state"))
    state.add_argument("--json", action="store_true")
    state.set_defaults(run=_cmd_bench_state)
    tiers = bench.add_parser(
        "tiers", help="TTFT restoring KV from host/Redis/disk vs recompute, fresh engines"
    )
    tiers.add_argument("--lengths", default="512,1024,2040", help="prompt lengths in tokens, comma-separated")
    tiers.add_argument("--out", type=Path, default=Path("bench-out/tiers"))
    tiers.add_argument("--plain", action="store_true", help="Redis and disk blocks unsealed (default sealed)")
    tiers.add_argument("--json", action="store_true")
    tiers.set_defaults(run=_cmd_bench_tiers)
    purge = bench.add_parser(
        "purge", help="purge latency by what the target touched; sealing cost on restores"
    )
    purge.add_argument("--iterations", type=int, default=10, help="purges per arm")
    purge.add_argument("--blocks", type=int, default=64, help="KV blocks per target (and per sealing arm)")
    purge.add_argument("--block-bytes", type=int, default=131072, help="bytes of KV per block")
    purge.add_argument("--rounds", type=int, default=15, help="interleaved sealed/plain restore rounds")
    purge.add_argument("--sweep-keys", type=int, default=200_000, help="other blocks in the sweep arms")
    purge.add_argument(
        "--sweep-epochs",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 2, 10, 50],
        help="salt epochs swept, comma-separated",
    )
    purge.add_argument("--out", type=Path, default=Path("bench-out/purge"))
    purge.add_argument("--json", action="store_true")
    purge.set_defaults(run=_cmd_bench_purge)

    routing = bench.add_parser(
        "routing",
        help="hit ratio, TTFT and decision time: Serve's balancing vs Zumik, several gateways and replicas",
    )
    routing.add_argument("--scale", type=int, default=10, help="requests per workload = 4 x scale")
    routing.add_argument("--concurrency", type=int, default=6)
    routing.add_argument("--replicas", type=int, default=3, help="vLLM engine replicas in the group")
    routing.add_argument("--gateways", type=int, default=2, help="gateway replicas")
    routing.add_argument(
        "--kv-mib", type=int, default=32, help="KV cache per replica (MiB): below the working set"
    )
    routing.add_argument(
        "--arms", default="rr-cache,zumik,zumik-scaling",
        help="comma-separated, of rr-nocache (the floor), rr-cache, zumik, zumik-scaling, zumik-text-chat; "
        "with zumik and its baseline (zumik-text-chat under --api chat when given, else rr-cache), "
        "the two again side by side",
    )  # fmt: skip
    routing.add_argument(
        "--api", choices=("completions", "chat"), default="completions",
        help="send the workloads as token ids on /v1/completions, or as conversations on "
        "/v1/chat/completions (arm zumik-text-chat: chat prompts with text keys)",
    )  # fmt: skip
    routing.add_argument(
        "--model", default=None,
        help="the engines' model source (default: the profile's builtin:tiny); builtin:tiny-wide has "
        "the same tokenizer and KV bytes per token with a prefill several times heavier, so a "
        "prompt's compute outweighs the stack's fixed work per request, as on a GPU",
    )  # fmt: skip
    routing.add_argument("--mooncake-requests", type=int, default=400, help="requests of the Mooncake slice")
    routing.add_argument(
        "--workloads", default="no_reuse,shared_prefix,agent_sessions,mooncake",
        help="comma-separated, of no_reuse, shared_prefix, agent_sessions, mooncake",
    )  # fmt: skip
    routing.add_argument(
        "--open-loop-load", default="",
        help="also send fresh prompts of each reuse workload open loop (Poisson arrivals) to rr-cache "
        "and zumik side by side, together at this multiple of the request rate rr-cache sustained "
        "in closed loop; several, comma-separated (e.g. 1.2,1.6,2.4), sweep the load (needs "
        "rr-cache first and zumik; empty or 0: off)",
    )  # fmt: skip
    routing.add_argument("--scaling-requests", type=int, default=4000, help="at most, for the scaling arm")
    routing.add_argument("--scaling-phase-requests", type=int, default=120, help="steady and after phases")
    routing.add_argument("--seed", type=int, default=1)
    routing.add_argument("--out", type=Path, default=Path("bench-out/routing"))
    routing.add_argument("--escalation-requests", type=int, default=120, help="escalation arm requests")
    routing.add_argument(
        "--escalation-only", action="store_true", help="only the escalation arm (in process, no Ray)"
    )
    routing.add_argument(
        "--cluster-only", action="store_true",
        help="only the in-process figures: two gateways with and without one owner, decision times",
    )  # fmt: skip
    routing.add_argument("--json", action="store_true")
    routing.set_defaults(run=_cmd_bench_routing)
    fuzz = bench.add_parser("fuzz", help="schemathesis on the official OpenAI spec (/v1) and on /v2")
    fuzz.add_argument("--url", default="http://127.0.0.1:8000", help="a running Zumik")
    fuzz.add_argument("--key", help="an API key (default: $ZUMIK_DEV_KEY)")
    fuzz.add_argument("--examples", type=int, default=100, help="examples per operation and mode")
    fuzz.add_argument("--seed", type=int, default=0)
    fuzz.add_argument("--out", type=Path, default=Path("bench-out/fuzz"))
    fuzz.add_argument("--json", action="store_true")
    fuzz.set_defaults(run=_cmd_bench_fuzz)

    qos = bench.add_parser("qos", help="interactive TTFT under batch floods; a burst and sustained overload")
    qos.add_argument("--url", default="http://127.0.0.1:8000", help="a running Zumik")
    qos.add_argument("--key", help="an API key (default: $ZUMIK_DEV_KEY)")
    qos.add_argument("--rounds", type=int, default=5)
    qos.add_argument("--probes", type=int, default=10, help="interactive probes per arm and round")
    qos.add_argument("--flood", type=int, default=16, help="flood clients")
    qos.add_argument("--burst", type=int, default=100, help="requests in the burst (10x the batch capacity)")
    qos.add_argument("--sustain-s", type=float, default=60.0, help="seconds of sustained overload (0: skip)")
    qos.add_argument("--sustain-clients", type=int, default=30)
    qos.add_argument("--seed", type=int, default=0)
    qos.add_argument("--out", type=Path, default=Path("bench-out/qos"))
    qos.add_argument("--json", action="store_true")
    qos.set_defaults(run=_cmd_bench_qos)
    churn = bench.add_parser(
        "churn", help="tenants read their objects under aborts, Redis and replica restarts: no 401, no leak"
    )
    churn.add_argument("--profile", default="local-cpu")
    churn.add_argument("--tenants", type=int, default=8)
    churn.add_argument("--objects", type=int, default=8, help="objects per tenant")
    churn.add_argument("--seconds", type=float, default=600.0, help="reading time (every disruption runs)")
    churn.add_argument("--redis-restarts", type=int, default=5, help="kill -9 + restart cycles of Redis")
    churn.add_argument("--replica-restarts", type=int, default=3, help="engine replica actor kills")
    churn.add_argument("--abort-share", type=float, default=0.25, help="share of requests aborted mid-flight")
    churn.add_argument("--timeout-s", type=float, default=30.0, help="a reader's request timeout")
    churn.add_argument("--seed", type=int, default=0)
    churn.add_argument("--out", type=Path, default=Path("bench-out/churn"))
    churn.add_argument("--json", action="store_true")
    churn.set_defaults(run=_cmd_bench_churn)
    durability = bench.add_parser(
        "durability", help="kill -9 of Redis and the gateway under /v2 writers: no acknowledged write lost"
    )
    durability.add_argument("--profile", default="local-cpu")
    durability.add_argument("--cycles", type=int, default=20, help="kill -9 cycles of each (alternating)")
    durability.add_argument(
        "--placement", choices=["separate", "colocated"], default="separate",
        help="separate: the gateway is a Gateway replica; colocated: the engine replica (vLLM reload)",
    )  # fmt: skip
    durability.add_argument("--gateway-replicas", type=int, default=1, help="Gateway replicas (separate)")
    durability.add_argument("--writers", type=int, default=4)
    durability.add_argument("--writes-between", type=int, default=50, help="acknowledged writes per cycle")
    durability.add_argument("--timeout-s", type=float, default=10.0, help="a writer's request timeout")
    durability.add_argument("--out", type=Path, default=Path("bench-out/durability"))
    durability.add_argument("--json", action="store_true")
    durability.set_defaults(run=_cmd_bench_durability)
    timing = bench.add_parser(
        "isolation-timing", help="TTFT on another tenant's cached prefix vs a fresh one (timing channel)"
    )
    timing.add_argument("--profile", default="local-cpu")
    timing.add_argument("--rounds", type=int, default=250, help="samples per arm")
    timing.add_argument("--prompt-tokens", type=int, default=1900)
    timing.add_argument("--prefix-fraction", type=float, default=0.95)
    timing.add_argument("--warm", type=int, default=3, help="tenant A's sends of each prefix before a round")
    timing.add_argument("--leak-alpha", type=float, default=0.01)
    timing.add_argument("--control-alpha", type=float, default=1e-6)
    timing.add_argument("--seed", type=int, default=0)
    timing.add_argument("--out", type=Path, default=Path("bench-out/isolation-timing"))
    timing.add_argument("--json", action="store_true")
    timing.set_defaults(run=_cmd_bench_isolation_timing)

    reuse = sub.add_parser("reuse", help="reuse figures").add_subparsers(title="reuse commands")
    report = reuse.add_parser("report", help="a tenant's opportunity and capture, as a table and a plot")
    report.add_argument("--url", default="http://127.0.0.1:8000", help="a running Zumik")
    report.add_argument("--key", help="the tenant's API key (default: $ZUMIK_API_KEY, then $ZUMIK_DEV_KEY)")
    report.add_argument("--group-by", choices=["tenant", "profile", "snapshot", "route"], default="route")
    report.add_argument("--window-s", type=int, default=3600)
    report.add_argument("--out", type=Path, default=Path("reuse-report"))
    report.add_argument("--json", action="store_true")
    report.set_defaults(run=_cmd_reuse_report)

    receipt = sub.add_parser("receipt", help="purge receipts").add_subparsers(title="receipt commands")
    verify = receipt.add_parser("verify", help="check a receipt offline; exit 0 only when it is intact")
    verify.add_argument(
        "file", type=Path,
        help="a receipt as JSON (the 'receipt' of POST /v2/purge), or a part of your log: the body of "
        "GET /v2/receipts or a JSON array of receipts (each checked, and each linked to the one before)",
    )  # fmt: skip
    verify.add_argument(
        "--public-key", "--keys", dest="public_key", required=True, type=Path,
        help="PEM with one or more public keys, or the JSON of GET /v2/keys (the receipt's key_id picks)",
    )  # fmt: skip
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(run=_cmd_receipt_verify)
    log = receipt.add_parser(
        "log", help="fetch your whole receipt log from a running Zumik and check it as a chain"
    )
    log.add_argument("--url", default="http://127.0.0.1:8000", help="a running Zumik")
    log.add_argument("--key", help="the tenant's API key (default: $ZUMIK_API_KEY, then $ZUMIK_DEV_KEY)")
    log.add_argument(
        "--out", type=Path, default=Path("receipts.json"), help="where the log goes, oldest first"
    )
    log.add_argument(
        "--anchor", help="the newest receipt's hash from an earlier check: the log must still hold it"
    )
    log.add_argument("--json", action="store_true")
    log.set_defaults(run=_cmd_receipt_log)

    secrets = sub.add_parser("secrets", help="the server's secrets (files, never in Redis)").add_subparsers(
        title="secrets commands"
    )
    folder_help = "the secrets folder (default: $ZUMIK_SECRETS_DIR, else $ZUMIK_HOME/secrets)"
    init = secrets.add_parser("init", help="create the missing secret files (0600); prints their names")
    migrate = secrets.add_parser(
        "migrate", help="an earlier deployment's secrets: copied from Redis into files, deleted from Redis"
    )
    migrate.add_argument("--redis-url", required=True, help="the deployment's Redis")
    rotate = secrets.add_parser(
        "rotate-signing-key", help="a new receipt signing key; the old public key stays listed as retired"
    )
    commands = ((init, _cmd_secrets_init), (migrate, _cmd_secrets_migrate), (rotate, _cmd_secrets_rotate))
    for command, run in commands:
        command.add_argument("--secrets-dir", type=Path, help=folder_help)
        command.add_argument("--json", action="store_true", help="machine-readable output")
        command.set_defaults(run=run)
    return parser


def _cmd_serve(args: argparse.Namespace) -> int:
    from profiles import ProfileError, resolve_profile
    from zumik_serve.app.monitoring import MonitoringOptions
    from zumik_serve.app.shutdown import StopSignals
    from zumik_serve.app.stack import LocalStack, StackConfig
    from zumik_serve.tenancy.tenant import check_dev_key

    try:
        profile, *more = [resolve_profile(name) for name in (args.profile or ["local-cpu"])]
    except ProfileError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    # vLLM's INFO lines (from imports in this process) would bury the progress display; the
    # engine replicas' own logs stay in Ray's log folder.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    monitoring = MonitoringOptions(
        include_dashboard=not args.no_dashboard, dashboard_host=args.dashboard_host,
        dashboard_port=args.dashboard_port, metrics_port=args.metrics_port,
    )  # fmt: skip
    config = StackConfig.from_env(
        profile, host=args.host, port=args.port, ingress=args.ingress, more_profiles=tuple(more)
    )
    config.monitoring = monitoring
    try:
        check_dev_key(config.dev_key)  # before anything starts
    except ValueError as exc:
        console.print(f"[red]error:[/red] Zumik did not start: {exc}")
        return 1
    stack = LocalStack(config)
    signals = StopSignals()
    signals.install()
    t0 = time.monotonic()
    try:
        with console.status("starting Zumik", spinner="dots") as status:

            def progress(message: str) -> None:
                signals.install()  # again: ray.init replaces the process's SIGTERM handler
                console.log(message)
                status.update(f"{message} ({time.monotonic() - t0:.0f} s)")

            stack.start(progress)
    except KeyboardInterrupt:
        signals.stopping()
        console.print("interrupted; stopping what was started")
        stack.stop()
        return 0 if signals.received == signal.SIGTERM else 130
    except Exception as exc:
        console.print(f"[red]error:[/red] Zumik did not start: {exc}")
        return 1
    signals.install()
    signals.serving()
    _print_ready(stack, profile.model.served_name, time.monotonic() - t0)
    received = signals.wait()
    console.print(
        f"{signal.Signals(received).name}: draining (new requests get 503; waiting up to "
        f"{args.drain_timeout:g} s for those in flight)"
    )
    t1 = time.monotonic()
    try:
        console.print(stack.drain(args.drain_timeout).summary(time.monotonic() - t1))
    except KeyboardInterrupt:
        console.print("second signal: stopping without waiting for requests in flight")
    except Exception as exc:
        console.print(f"[yellow]drain failed ({exc}); stopping anyway[/yellow]")
    signals.stopping()
    console.print("stopping Zumik (Serve app, Ray, Redis)...")
    stack.stop()
    console.print("stopped.")
    return 0


def _add_monitoring_arguments(serve: argparse.ArgumentParser) -> None:
    from zumik_serve.app import monitoring as m

    env = os.environ.get
    serve.add_argument(
        "--dashboard-host", default=env("ZUMIK_DASHBOARD_HOST", m.LOOPBACK),
        help="address of the Ray dashboard (default 127.0.0.1; $ZUMIK_DASHBOARD_HOST)",
    )  # fmt: skip
    serve.add_argument(
        "--dashboard-port", type=int, default=int(env("ZUMIK_DASHBOARD_PORT", m.DEFAULT_DASHBOARD_PORT)),
        help="port of the Ray dashboard (default 8265; $ZUMIK_DASHBOARD_PORT)",
    )  # fmt: skip
    serve.add_argument("--no-dashboard", action="store_true", help="start Ray without its dashboard")
    serve.add_argument(
        "--metrics-port", type=int, default=int(env("ZUMIK_METRICS_PORT", m.DEFAULT_METRICS_PORT)),
        help="Ray's metrics export port, Prometheus text at /metrics (default 8080; $ZUMIK_METRICS_PORT)",
    )  # fmt: skip
    serve.add_argument(
        "--drain-timeout", type=float, default=float(env("ZUMIK_DRAIN_TIMEOUT_S", "30")),
        help="on SIGTERM or Ctrl-C, seconds to wait for requests in flight before stopping "
        "(default 30; $ZUMIK_DRAIN_TIMEOUT_S)",
    )  # fmt: skip


def _print_ready(stack: object, model: str, elapsed_s: float) -> None:
    url = stack.url  # type: ignore[attr-defined]
    key_hint = "$ZUMIK_DEV_KEY" if stack.config.dev_key else "$ZUMIK_API_KEY"  # type: ignore[attr-defined]
    console.print(f"\n[bold green]Zumik is ready[/bold green] in {elapsed_s:.0f} s at [bold]{url}/v1[/bold]")
    if not stack.config.dev_key:  # type: ignore[attr-defined]
        console.print("Create a key first:  zumik tenant create myteam   (then export ZUMIK_API_KEY=...)")
    console.print("Try it:\n")
    print(
        f'curl {url}/v1/chat/completions -H "Authorization: Bearer {key_hint}" '
        f"-H 'Content-Type: application/json' "
        f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], '
        f'"max_tokens": 16}}\'\n',
        flush=True,
    )
    _print_monitoring(stack.monitoring)  # type: ignore[attr-defined]
    console.print("Press Ctrl-C (or send SIGTERM) to drain and stop.")


def _print_monitoring(urls: object) -> None:
    """The dashboard and metrics URLs, one per line on stdout (scripts read them)."""
    dashboard = getattr(urls, "dashboard", None)
    print(f"Ray dashboard:  {dashboard or 'off (--no-dashboard, or Ray without its dashboard)'}")
    for url in getattr(urls, "metrics", ()):
        print(f"Metrics:        {url}   (ray_zumik_*, ray_vllm_*, ray_serve_*)")
    targets = getattr(urls, "discovery_file", "")
    print(f"Prometheus:     deploy/prometheus/prometheus.yml (metrics addresses: {targets})\n", flush=True)


def _cmd_decision_replay(args: argparse.Namespace) -> int:
    from zumik_serve.routing.decision_cli import run_decision_replay

    return run_decision_replay(args, console)


def _cmd_tenant_list(args: argparse.Namespace) -> int:
    from zumik_serve.tenancy.tenant_cli import run_tenant_list

    return run_tenant_list(args, console)


def _cmd_tenant_delete(args: argparse.Namespace) -> int:
    from zumik_serve.home import ZumikHome
    from zumik_serve.purge.nodes import NodeSweeper
    from zumik_serve.tenancy.tenant_cli import run_tenant_delete

    def cluster_sweeper(config: dict[str, object]) -> NodeSweeper | None:
        from zumik_serve.app.node_sweep import cluster_node_sweeper
        from zumik_serve.app.ray_head import running_ray_address

        address = args.ray_address or running_ray_address(ZumikHome.from_env())
        if address is None:
            return None
        console.print(f"sweeping the KV tiers of every node of the Ray cluster at {address}")
        try:
            return cluster_node_sweeper(address, config)
        except OSError as exc:  # refused before any step: nothing is revoked yet
            raise ValueError(
                f"no Ray cluster answers at {address} ({exc}); start the stack, or pass the cluster's "
                "address with --ray-address, so that every node's KV tiers are swept"
            ) from exc

    return run_tenant_delete(args, console, cluster_sweeper)


def _cmd_key_create(args: argparse.Namespace) -> int:
    from zumik_serve.tenancy.tenant_cli import run_key_create

    return run_key_create(args, console)


def _cmd_key_list(args: argparse.Namespace) -> int:
    from zumik_serve.tenancy.tenant_cli import run_key_list

    return run_key_list(args, console)


def _cmd_key_revoke(args: argparse.Namespace) -> int:
    from zumik_serve.tenancy.tenant_cli import run_key_revoke

    return run_key_revoke(args, console)


def _cmd_tenant_create(args: argparse.Namespace) -> int:
    from zumik_serve.home import ZumikHome
    from zumik_serve.store.client import plain_client
    from zumik_serve.store.local_redis import embedded_redis, running_redis_url
    from zumik_serve.tenancy.store import RedisTenantStore, TenantExistsError

    qos = None
    if args.qos:
        qos = frozenset(part.strip() for part in args.qos.split(",") if part.strip())
        unknown = sorted(qos - {"interactive", "standard", "batch"})
        if unknown or not qos:
            console.print(
                f"[red]error:[/red] --qos takes interactive, standard, batch; not {', '.join(unknown)}"
            )
            return 2
    home = ZumikHome.from_env().ensure()
    url = running_redis_url(home)
    temporary = None
    if url is None:  # nothing running: write into the embedded server's AOF directly
        temporary = embedded_redis(home).start()
        url = temporary.url

    async def create() -> tuple[str, str]:
        client = plain_client(url)
        try:
            names = (args.profiles or "").split(",")
            profiles = frozenset(n.strip() for n in names if n.strip()) if args.profiles else None
            tenant, api_key = await RedisTenantStore(client).create_tenant(
                args.name, qos_classes=qos, reuse_accounting=not args.no_reuse_accounting, profiles=profiles
            )
        finally:
            await client.aclose()
        return tenant.id, api_key

    try:
        tenant_id, api_key = asyncio.run(create())
    except (TenantExistsError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    finally:
        if temporary is not None:
            temporary.stop()
    if args.json:
        print(json.dumps({"tenant": args.name, "tenant_id": tenant_id, "api_key": api_key}))
    else:
        console.print(f"created tenant [bold]{args.name}[/bold] ({tenant_id}); its API key (shown once):")
        print(api_key)
    return 0


def _cmd_tenant_quota(args: argparse.Namespace) -> int:
    from zumik_serve.qos.quota_cli import run_tenant_quota

    return run_tenant_quota(args, console)


def _cmd_model_tiny(args: argparse.Namespace) -> int:
    from zumik_serve.model.tiny import build_tiny_model, fingerprint_model_dir, is_model_dir

    before = fingerprint_model_dir(args.out) if is_model_dir(args.out) else None
    out = build_tiny_model(args.out)
    fingerprint = fingerprint_model_dir(out)
    if args.json:
        print(json.dumps({"path": str(out), "fingerprint": fingerprint, "changed": fingerprint != before}))
    else:
        if before is None:
            console.print(f"built the tiny model in {out}")
        elif before == fingerprint:
            console.print(f"the tiny model in {out} is up to date")
        else:
            console.print(f"updated the tiny model in {out} (an older build's files were replaced)")
        print(f"fingerprint sha256:{fingerprint}")
    return 0


def _cmd_bench_overhead(args: argparse.Namespace) -> int:
    from zumik_serve.bench.overhead import run_overhead_bench

    return run_overhead_bench(args, console)


def _cmd_bench_state(args: argparse.Namespace) -> int:
    from zumik_serve.bench.state import run_state_bench

    return run_state_bench(args, console)


def _cmd_bench_tiers(args: argparse.Namespace) -> int:
    from zumik_serve.bench.tiers import run_tiers_bench

    return run_tiers_bench(args, console)


def _cmd_bench_purge(args: argparse.Namespace) -> int:
    from zumik_serve.bench.purge import run_purge_bench

    return run_purge_bench(args, console)


def _cmd_bench_routing(args: argparse.Namespace) -> int:
    from zumik_serve.bench.routing import run_routing_bench

    return run_routing_bench(args, console)


def _cmd_bench_fuzz(args: argparse.Namespace) -> int:
    from zumik_serve.bench.fuzz import run_fuzz_bench

    return run_fuzz_bench(args, console)


def _cmd_bench_qos(args: argparse.Namespace) -> int:
    from zumik_serve.bench.qos import run_qos_bench

    return run_qos_bench(args, console)


def _cmd_bench_churn(args: argparse.Namespace) -> int:
    from zumik_serve.bench.churn import run_churn_bench

    return run_churn_bench(args, console)


def _cmd_bench_durability(args: argparse.Namespace) -> int:
    from zumik_serve.bench.durability import run_durability_bench

    return run_durability_bench(args, console)


def _cmd_bench_isolation_timing(args: argparse.Namespace) -> int:
    from zumik_serve.bench.isolation_timing import run_isolation_timing_bench

    return run_isolation_timing_bench(args, console)


def _cmd_reuse_report(args: argparse.Namespace) -> int:
    from zumik_serve.reuse.report import run_reuse_report

    return run_reuse_report(args, console)


def _cmd_receipt_verify(args: argparse.Namespace) -> int:
    from zumik_serve.purge.verify_cli import run_verify

    return run_verify(args.file, args.public_key, as_json=args.json)


def _cmd_receipt_log(args: argparse.Namespace) -> int:
    from zumik_serve.purge.log_cli import run_receipt_log

    return run_receipt_log(args, console)


def _cmd_secrets_init(args: argparse.Namespace) -> int:
    from zumik_serve.app.secrets_setup import run_secrets_init

    return run_secrets_init(args, console)


def _cmd_secrets_migrate(args: argparse.Namespace) -> int:
    from zumik_serve.app.secrets_setup import run_secrets_migrate

    return run_secrets_migrate(args, console)


def _cmd_secrets_rotate(args: argparse.Namespace) -> int:
    from zumik_serve.app.secrets_setup import run_rotate_signing_key

    return run_rotate_signing_key(args, console)


if __name__ == "__main__":
    sys.exit(main())
