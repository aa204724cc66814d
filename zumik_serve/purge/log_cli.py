"""`zumik receipt log`: fetch a tenant's whole receipt log from a running Zumik and check it.

It pages through ``GET /v2/receipts`` (100 a page, with a progress line), takes the signing keys
from ``GET /v2/keys``, checks the log as a chain (``receipt.verify_chain``) and writes it, oldest
first, to ``--out``, where ``zumik receipt verify`` checks it again offline. It ends by printing
the newest receipt's hash: keep it, and pass it as ``--anchor`` next time. A log that no longer
holds a receipt of that hash was rewritten, even if every receipt in it was signed again.

Exit codes: 0 intact (and leading to the anchor), 1 not intact, 2 no key, or Zumik unreachable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from zumik_serve.purge.receipt import Verification, key_id_of, load_public_key, receipt_hash, verify_chain

PAGE = 100
EXIT_INTACT, EXIT_NOT_INTACT, EXIT_UNREACHABLE = 0, 1, 2


def fetch_log(url: str, key: str, *, on_page: Any = None) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The tenant's receipts, oldest first, and the signing keys by key id."""
    headers = {"Authorization": f"Bearer {key}"}
    base = url.rstrip("/")
    receipts: list[dict[str, Any]] = []
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        params: dict[str, Any] = {"limit": PAGE}
        while True:
            page = _get(client, "/v2/receipts", params)
            receipts.extend(page["data"])
            if on_page is not None:
                on_page(len(receipts))
            if not page["has_more"]:
                break
            params = {"limit": PAGE, "after": page["last_id"]}
        listed = _get(client, "/v2/keys", {})["keys"]
    keys: dict[str, bytes] = {}
    for item in listed:
        pem = str(item["public_key"]).encode("ascii")
        keys[key_id_of(load_public_key(pem))] = pem
    receipts.reverse()
    return receipts, keys


def check_anchor(receipts: Sequence[dict[str, Any]], anchor: str) -> Verification:
    """The log still holds the receipt whose hash a tenant kept from an earlier check."""
    for receipt in receipts:
        if receipt_hash(receipt) == anchor:
            return Verification(True, f"the log leads to the receipt you kept (seq {receipt['seq']})")
    return Verification(
        False,
        f"no receipt in the log has the hash you kept ({anchor[:16]}…): the log was rewritten or "
        "truncated since you checked it",
    )


def run_receipt_log(args: Any, console: Any) -> int:
    key = args.key or os.environ.get("ZUMIK_API_KEY") or os.environ.get("ZUMIK_DEV_KEY")
    if not key:
        console.print("[red]no API key[/red]: pass --key, or set ZUMIK_API_KEY")
        return EXIT_UNREACHABLE
    try:
        with console.status("reading the receipt log") as status:
            receipts, keys = fetch_log(args.url, key, on_page=lambda n: status.update(f"{n} receipts read"))
    except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as exc:
        console.print(f"[red]could not read the log[/red] from {args.url}: {exc}. Is `zumik serve` running?")
        return EXIT_UNREACHABLE
    args.out.write_text(json.dumps(receipts, indent=2, ensure_ascii=False))
    if not receipts:
        result = {"ok": True, "receipts": 0, "reason": "no receipts yet", "head": None}
        _print(console, result, as_json=args.json, out=args.out)
        return EXIT_INTACT
    verification = verify_chain(receipts, keys)
    if verification.ok and args.anchor:
        verification = check_anchor(receipts, args.anchor)
    head = receipts[-1]
    result = {
        "ok": verification.ok,
        "receipts": len(receipts),
        "reason": verification.reason,
        "head": {"id": head["id"], "seq": head["seq"], "hash": receipt_hash(head)},
    }
    _print(console, result, as_json=args.json, out=args.out)
    return EXIT_INTACT if verification.ok else EXIT_NOT_INTACT


def _print(console: Any, result: dict[str, Any], *, as_json: bool, out: Path) -> None:
    if as_json:
        print(json.dumps({**result, "file": str(out)}))
        return
    verdict = "[green]OK[/green]" if result["ok"] else "[red]FAILED[/red]"
    console.print(f"{verdict} {result['receipts']} receipts: {result['reason']}")
    console.print(
        f"wrote {out} (oldest first; `zumik receipt verify {out} --keys KEYS.json` checks it again)"
    )
    if result["head"] is not None:
        console.print(f"newest: seq {result['head']['seq']}, hash {result['head']['hash']}")
        console.print("keep that hash; next time pass it as --anchor to check the log still leads to it")


def _get(client: httpx.Client, path: str, params: dict[str, Any]) -> dict[str, Any]:
    response = client.get(path, params=params)
    if response.status_code != 200:
        message = response.json().get("error", {}).get("message", "") if response.content else ""
        raise RuntimeError(f"GET {path} answered {response.status_code}: {message}")
    data: dict[str, Any] = response.json()
    return data
