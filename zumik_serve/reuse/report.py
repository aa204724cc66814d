"""``zumik reuse report``: a tenant's reuse figures from a running Zumik, as a table and a plot.

It reads ``GET /v2/reuse`` with the tenant's key (``--key``, else ``$ZUMIK_API_KEY``, else
``$ZUMIK_DEV_KEY``), so it shows exactly what the tenant may see. Opportunity and each capture
level stay in their own columns, labelled with their evidence; the plot draws opportunity and
capture over time, one line per group.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx


def fetch(url: str, key: str, *, group_by: str, window_s: int) -> dict[str, Any]:
    response = httpx.get(
        f"{url.rstrip('/')}/v2/reuse",
        params={"group_by": group_by, "window_s": window_s, "series": "true"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    if response.status_code != 200:
        message = response.json().get("error", {}).get("message", response.text) if response.content else ""
        raise RuntimeError(f"GET /v2/reuse answered {response.status_code}: {message}")
    data: dict[str, Any] = response.json()
    return data


def run_reuse_report(args: Any, console: Any) -> int:
    from rich.table import Table

    key = args.key or os.environ.get("ZUMIK_API_KEY") or os.environ.get("ZUMIK_DEV_KEY")
    if not key:
        console.print(
            "[red]no API key[/red]: pass --key, or set ZUMIK_API_KEY (zumik tenant create NAME prints one)"
        )
        return 2
    try:
        report = fetch(args.url, key, group_by=args.group_by, window_s=args.window_s)
    except (httpx.HTTPError, RuntimeError) as exc:
        console.print(
            f"[red]could not read the report[/red] from {args.url}: {exc}. Is `zumik serve` running?"
        )
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reuse.json").write_text(json.dumps(report, indent=2))
    plot_series(report, args.out / "reuse.png")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title=f"Reuse over the last {args.window_s} s, by {args.group_by} (levels kept apart)")
    columns = [args.group_by, "requests", "prompt tokens", "opportunity (estimated)", "captured (observed)",
               "captured (reported)", "capture unknown (requests)", "saved USD"]  # fmt: skip
    for column in columns:
        table.add_column(column)
    for group in report["groups"]:
        captured = {c["evidence"]: c for c in group["captured"]}
        saved = (
            ", ".join(f"{s['usd']} ({s['evidence']})" for s in group["savings_usd"] if s["usd"] != "0") or "-"
        )
        table.add_row(
            str(group[args.group_by]), str(group["requests"]), f"{group['prompt_tokens']:,}",
            f"{group['opportunity']['tokens']:,}", f"{captured['observed']['tokens']:,}",
            f"{captured['reported']['tokens']:,}", str(captured["unknown"]["requests"]), saved,
        )  # fmt: skip
    console.print(table)
    console.print(f"wrote {args.out / 'reuse.json'} and {args.out / 'reuse.png'}")
    return 0


def plot_series(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_by = report["group_by"]
    points = report.get("series", [])
    fig, ax = plt.subplots(figsize=(9, 4))
    starts = sorted({p["t"] for p in points}) or [0]
    origin = starts[0]
    for key in sorted({str(p[group_by]) for p in points}):
        mine = [p for p in points if str(p[group_by]) == key]
        minutes = [(p["t"] - origin) / 60 for p in mine]
        ax.plot(minutes, [p["opportunity_estimated"] for p in mine], "--", marker="o",
                label=f"{key}: opportunity (estimated)")  # fmt: skip
        captured = [p["captured_observed"] + p["captured_reported"] for p in mine]
        ax.plot(minutes, captured, "-", marker="s", label=f"{key}: captured (observed + reported)")
    ax.set_xlabel("minutes since the first point")
    ax.set_ylabel("prompt tokens per minute")
    ax.set_title(f"Reuse opportunity vs capture, by {group_by}")
    if points:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
