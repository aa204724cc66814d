"""``zumik bench fuzz``: schemathesis against the official OpenAI spec, and Zumik's own /v2 spec.

The /v1 part (test T1 of the reliability plan) loads the official ``openapi.yaml``
(``$ZUMIK_OPENAI_SPEC``, else ``<repo>/../shared/data/openai/openapi.yaml``; skipped, saying so,
when absent), keeps the operations Zumik implements and declares the spec's ``ErrorResponse``
for every 4xx Zumik answers, then sends schemathesis-generated requests in positive and
negative modes. Per answer:

    5xx                 never
    schema              a 200 JSON body validates against the operation's declared schema
                        (``text/event-stream`` bodies are SSE and are skipped); a 4xx body is an
                        ``ErrorResponse`` with all four keys and ``code`` a string or null
    non-spec keys       every object's keys are declared by its schema, recursively: SDK
                        models tolerate extras, so only this check sees an engine field leaking

In positive mode most requests are steered to reach the engine: the served model, only
spec-declared fields, none that Zumik rejects as unsupported, ``max_tokens`` at most 16 and
``n`` at most 2 (the engine is a tiny model on a few CPU cores). The /v2 part fuzzes the
``/openapi.json`` the app serves; its routes read their bodies themselves and declare no
request schema, so there the generated inputs are paths, queries and headers, and the only
check is no 5xx.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPEC_ENV = "ZUMIK_OPENAI_SPEC"
V1_OPERATIONS = (
    ("GET", "/models"),
    ("GET", "/models/{model}"),
    ("POST", "/chat/completions"),
    ("POST", "/completions"),
    ("POST", "/responses"),
    ("GET", "/responses/{response_id}"),
    ("DELETE", "/responses/{response_id}"),
)
ERROR_STATUSES = ("400", "401", "404", "413", "429")  # the 4xx statuses Zumik answers on /v1
MODES = ("positive", "negative")
MAX_TOKENS_CAP = 16
MIN_OUTPUT_TOKENS = 16  # the spec's minimum of max_output_tokens (/responses), also its cap here
N_CAP = 2
EXAMPLES_KEPT = 5  # failing examples kept per operation and mode
REASON_CHARS = 240
REQUEST_TIMEOUT_S = 120.0
# The spec's Error object, for when the spec itself is absent (unit tests on a user's clone).
INLINE_ERROR_RESPONSE = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message", "param", "code"],
            "properties": {
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "message": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "type": {"type": "string"},
            },
        }
    },
}
ERROR_KEYS = ("message", "type", "param", "code")


def default_spec_path() -> Path:
    """``$ZUMIK_OPENAI_SPEC``, else the shared copy next to the repository (absent in a clone)."""
    configured = os.environ.get(SPEC_ENV)
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "openai" / "openapi.yaml"


def spec_missing_reason(path: Path) -> str | None:
    """Why the /v1 fuzz cannot run, or None when the spec file is there."""
    if path.is_file():
        return None
    return (
        f"the official OpenAI spec is not at {path}; set {SPEC_ENV} to a copy of openapi.yaml "
        "(github.com/openai/openai-openapi) to fuzz /v1"
    )


@functools.lru_cache(maxsize=2)
def load_spec(path: Path) -> dict[str, Any]:
    """The spec, its 3.0-style ``nullable: true`` read as JSON Schema (``anyOf`` with null)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C loader reads 3 MB in 0.5 s
    with path.open() as handle:
        spec: dict[str, Any] = _apply_nullable(yaml.load(handle, Loader=loader))
    return spec


def _apply_nullable(node: Any) -> Any:
    # The spec says 3.1.0 but still marks some schemas ``nullable: true``, which JSON Schema
    # 2020-12 ignores; the validator must read them as the spec means them.
    if isinstance(node, list):
        return [_apply_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _apply_nullable(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


# --- the checks: pure functions over (schema, instance) -------------------------------------


class SchemaContext:
    """Resolves local ``$ref``s against a root document and validates instances against it."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        from jsonschema import Draft202012Validator

        self.root = root
        self._validator = Draft202012Validator(root)

    def deref(self, schema: Any) -> Any:
        seen = 0
        while isinstance(schema, Mapping) and isinstance(schema.get("$ref"), str) and seen < 64:
            ref: str = schema["$ref"]
            if not ref.startswith("#"):
                return {}  # a remote reference: treated as unconstrained
            target: Any = self.root
            for part in ref[1:].split("/")[1:]:
                target = target[part.replace("~1", "/").replace("~0", "~")]
            rest = {key: value for key, value in schema.items() if key != "$ref"}
            schema = {"allOf": [target, rest]} if rest else target
            seen += 1
        return schema

    def problems(self, schema: Any, instance: Any) -> list[str]:
        """Validation errors of ``instance`` against ``schema``, shortest path first, short."""
        errors = sorted(
            self._validator.evolve(schema=schema).iter_errors(instance), key=lambda e: len(e.absolute_path)
        )
        return [_short(f"{_json_path(error.absolute_path)}: {error.message}") for error in errors[:3]]

    def is_valid(self, schema: Any, instance: Any) -> bool:
        return bool(self._validator.evolve(schema=schema).is_valid(instance))


def non_spec_keys(schema: Any, instance: Any, root: Mapping[str, Any] | None = None) -> list[str]:
    """Paths (``$.choices[0].message.reasoning``) of object keys that ``schema`` does not declare.

    A key is declared when some applicable schema lists it in ``properties``: all of an
    ``allOf``, the ``anyOf``/``oneOf`` branches the instance validates against (all branches
    when none does; the schema failure is reported by the conformance check). An object whose
    schemas declare no ``properties`` and no ``additionalProperties`` is free-form, and
    ``additionalProperties: true`` or ``patternProperties`` opens one; an
    ``additionalProperties`` schema applies to the undeclared keys' values. ``$ref``s resolve
    against ``root`` (default: ``schema`` itself).
    """
    context = SchemaContext(root if root is not None else schema)
    found: list[str] = []
    _walk([schema], instance, "$", context, found)
    return found


def _walk(schemas: list[Any], instance: Any, path: str, context: SchemaContext, found: list[str]) -> None:
    leaves = _flatten(schemas, instance, context)
    if isinstance(instance, dict):
        declared: dict[str, list[Any]] = {}
        additional: list[Any] = []
        shaped = opened = False
        for leaf in leaves:
            for key, sub in (leaf.get("properties") or {}).items():
                declared.setdefault(key, []).append(sub)
                shaped = True
            extra = leaf.get("additionalProperties")
            if extra is True or leaf.get("patternProperties"):
                opened = True
            elif isinstance(extra, Mapping):
                additional.append(extra)
            shaped = shaped or "additionalProperties" in leaf
        for key, value in instance.items():
            child = f"{path}.{key}" if key.isidentifier() else f"{path}[{json.dumps(key)}]"
            if key in declared:
                _walk(declared[key], value, child, context, found)
            elif additional:
                _walk(additional, value, child, context, found)
            elif shaped and not opened:
                found.append(child)
    elif isinstance(instance, list):
        for index, item in enumerate(instance):
            items: list[Any] = []
            for leaf in leaves:
                prefix = leaf.get("prefixItems")
                if isinstance(prefix, list) and index < len(prefix):
                    items.append(prefix[index])
                elif isinstance(leaf.get("items"), Mapping):
                    items.append(leaf["items"])
            if items:
                _walk(items, item, f"{path}[{index}]", context, found)


def _flatten(schemas: list[Any], instance: Any, context: SchemaContext) -> list[Mapping[str, Any]]:
    """The schemas that apply to ``instance`` at this level, with references and compositions
    expanded (``anyOf``/``oneOf`` to the branches it validates against)."""
    leaves: list[Mapping[str, Any]] = []
    pending = list(schemas)
    seen: set[int] = set()
    while pending:
        schema = context.deref(pending.pop())
        if not isinstance(schema, Mapping) or id(schema) in seen:
            continue
        seen.add(id(schema))
        leaves.append(schema)
        pending.extend(schema.get("allOf") or [])
        for keyword in ("anyOf", "oneOf"):
            branches = schema.get(keyword) or []
            valid = [branch for branch in branches if context.is_valid(branch, instance)]
            pending.extend(valid or branches)
    return leaves


def error_body_problems(body: Any, schema: Any = None, root: Mapping[str, Any] | None = None) -> list[str]:
    """Why a 4xx body is not an OpenAI ``ErrorResponse`` ([] when it is).

    ``schema`` is the spec's ``ErrorResponse`` (resolved against ``root``), by default the
    same shape inline. Beyond the schema, all four keys must be present and ``code`` must be a
    string or null: the SDKs read them unconditionally.
    """
    if schema is None:
        schema, root = INLINE_ERROR_RESPONSE, INLINE_ERROR_RESPONSE
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ["the body has no 'error' object"]
    problems = [f"'error' lacks '{key}'" for key in ERROR_KEYS if key not in error]
    if "code" in error and not (error["code"] is None or isinstance(error["code"], str)):
        problems.append(f"'code' is a {type(error['code']).__name__}, not a string or null")
    context = SchemaContext(root if root is not None else schema)
    return problems + [problem for problem in context.problems(schema, body) if problem not in problems]


def _json_path(parts: Any) -> str:
    path = "$"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _short(text: str) -> str:
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


# --- the spec Zumik answers to ---------------------------------------------------------------


def zumik_v1_spec(spec: Mapping[str, Any], base_url: str) -> dict[str, Any]:
    """The official spec cut to the operations Zumik implements, every 4xx an ErrorResponse."""
    error = {
        "description": "An OpenAI error object.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    paths: dict[str, Any] = {}
    for method, path in V1_OPERATIONS:
        operation = dict(spec["paths"][path][method.lower()])
        operation["responses"] = {**operation["responses"], **dict.fromkeys(ERROR_STATUSES, error)}
        paths.setdefault(path, {})[method.lower()] = operation
    reduced = {key: value for key, value in spec.items() if key not in ("paths", "webhooks", "x-oaiMeta")}
    return {**reduced, "paths": paths, "servers": [{"url": f"{base_url.rstrip('/')}/v1"}]}


def _response_schema(operation: Mapping[str, Any], status: int, media_type: str) -> Any:
    response = operation["responses"].get(str(status))
    if response is None:
        return None
    return ((response.get("content") or {}).get(media_type) or {}).get("schema")


def _steer_positive(
    case: Any,
    choice: int,
    model: str,
    declared: Mapping[str, frozenset[str]],
    unsupported: Mapping[str, frozenset[str]],
) -> Any:
    """Caps the sizes of every positive case and, unless ``choice`` is 3, aims it at the engine:
    the served model, spec-declared fields only, none Zumik rejects as unsupported, no
    ``stream_options`` without ``stream`` (a 400 the unsteered cases cover). ``choice`` comes
    from Hypothesis, which favours 0: about 4 cases in 5 are steered."""
    label = f"{case.operation.method.upper()} {case.operation.path}"
    if label == "GET /models/{model}" and choice < 2:
        case.path_parameters = {**(case.path_parameters or {}), "model": model}
    if not isinstance(case.body, dict):
        return case
    body = dict(case.body)
    if choice < 3:
        allowed = declared.get(label, frozenset())
        refused = unsupported.get(label, frozenset())
        body = {key: value for key, value in body.items() if key in allowed and key not in refused}
        body["model"] = model
        if body.get("stream") is not True:
            body.pop("stream_options", None)
        if label == "POST /responses":
            body.pop("previous_response_id", None)  # an unknown id is a 404 the unsteered cases cover
            body.setdefault("input", "Hello")
            body["max_output_tokens"] = MIN_OUTPUT_TOKENS
        elif not any(key in body for key in ("max_tokens", "max_completion_tokens")):
            body["max_completion_tokens" if label == "POST /chat/completions" else "max_tokens"] = (
                1 + 5 * choice
            )
    caps = (("max_tokens", MAX_TOKENS_CAP), ("max_completion_tokens", MAX_TOKENS_CAP),
            ("max_output_tokens", MIN_OUTPUT_TOKENS), ("n", N_CAP))  # fmt: skip
    for key, cap in caps:
        if isinstance(body.get(key), int | float) and not isinstance(body[key], bool) and body[key] > cap:
            body[key] = cap
    case.body = body
    return case


def _declared_request_fields(spec: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    context = SchemaContext(spec)
    fields: dict[str, frozenset[str]] = {}
    for method, path in V1_OPERATIONS:
        body = spec["paths"][path][method.lower()].get("requestBody")
        if body is None:
            continue
        schema = body["content"]["application/json"]["schema"]
        leaves = _flatten([schema], None, context)
        fields[f"{method} {path}"] = frozenset(key for leaf in leaves for key in leaf.get("properties") or {})
    return fields


# --- the run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailingExample:
    suite: str
    mode: str
    operation: str  # "POST /chat/completions"
    path: str  # the path sent
    status: int | None  # None: no answer
    reason: str
    request_body: str | None  # the JSON sent, cut short


@dataclass
class OperationCounts:
    """What one operation answered in one mode. Counts are of answers, not of problems."""

    suite: str  # "v1" (the official spec) or "v2" (Zumik's own)
    operation: str
    mode: str
    examples: int = 0
    ok_2xx: int = 0
    client_4xx: int = 0
    server_5xx: int = 0
    no_answer: int = 0  # refused, reset or timed out
    schema_failures: int = 0  # 200 off its schema, 4xx not an ErrorResponse, undeclared status
    non_spec_keys: int = 0
    skipped: str | None = None  # why no example ran: no input of this mode exists

    @property
    def failures(self) -> int:
        return self.server_5xx + self.no_answer + self.schema_failures + self.non_spec_keys


@dataclass
class FuzzResult:
    base_url: str
    seed: int
    examples_per_operation: int
    modes: tuple[str, ...]
    spec_path: str
    spec_version: str | None = None
    schemathesis_version: str = ""
    v1_skipped: str | None = None  # why /v1 was not fuzzed (no spec file)
    v2_skipped: str | None = None  # why /v2 was not fuzzed (no /openapi.json)
    operations: list[OperationCounts] = field(default_factory=list)
    examples: list[FailingExample] = field(default_factory=list)  # EXAMPLES_KEPT per row at most
    elapsed_s: float = 0.0

    @property
    def failed(self) -> bool:
        return any(counts.failures for counts in self.operations)

    def short_v1_rows(self) -> list[OperationCounts]:
        """The /v1 operation-and-mode rows that got fewer examples than asked for (hypothesis
        stops early when it runs out of distinct inputs): the T1 figure is not reached there."""
        return [
            c for c in self.operations
            if c.suite == "v1" and c.skipped is None and c.examples < self.examples_per_operation
        ]  # fmt: skip

    def counts(self, suite: str, operation: str, mode: str) -> OperationCounts:
        return next(c for c in self.operations if (c.suite, c.operation, c.mode) == (suite, operation, mode))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for entry, counts in zip(data["operations"], self.operations, strict=True):
            entry["failures"] = counts.failures
        short = [f"{c.operation} {c.mode}: {c.examples}" for c in self.short_v1_rows()]
        return {**data, "failed": self.failed, "short_v1_rows": short}


Progress = Callable[[str, int], None]  # (row label, examples sent in that row so far)
Check = Callable[[OperationCounts, Any], list[str]]  # (counts, response) -> problems found


def run_fuzz(
    base_url: str,
    api_key: str,
    *,
    examples_per_operation: int,
    modes: tuple[str, ...] = MODES,
    seed: int = 0,
    model: str | None = None,
    spec_path: Path | None = None,
    fuzz_v2: bool = True,
    on_progress: Progress | None = None,
) -> FuzzResult:
    """Fuzz a running Zumik; ``model`` defaults to the first of ``GET /v1/models``."""
    import httpx
    import schemathesis

    spec_path = spec_path or default_spec_path()
    base_url = base_url.rstrip("/")
    result = FuzzResult(base_url, seed, examples_per_operation, tuple(modes), str(spec_path),
                        schemathesis_version=schemathesis.__version__)  # fmt: skip
    run = _Run(result, {"Authorization": f"Bearer {api_key}"}, on_progress)
    started = time.perf_counter()
    with httpx.Client(base_url=base_url, headers=run.headers, timeout=30) as http:
        if model is None:
            listing = http.get("/v1/models")
            listing.raise_for_status()
            model = str(listing.json()["data"][0]["id"])
        result.v1_skipped = spec_missing_reason(spec_path)
        if result.v1_skipped is None:
            spec = zumik_v1_spec(load_spec(spec_path), base_url)
            result.spec_version = str(spec.get("info", {}).get("version"))
            run.v1(spec, model)
        served = http.get("/openapi.json") if fuzz_v2 else None
    if served is not None and served.status_code != 200:
        result.v2_skipped = f"the app serves no /openapi.json (HTTP {served.status_code})"
    elif served is not None:
        run.v2(served.json())
    result.elapsed_s = time.perf_counter() - started
    return result


class _Run:
    """One fuzz run: drives each operation in each mode and fills in ``result``."""

    def __init__(self, result: FuzzResult, headers: dict[str, str], on_progress: Progress | None) -> None:
        self.result, self.headers, self.on_progress = result, headers, on_progress

    def v1(self, spec: dict[str, Any], model: str) -> None:
        import schemathesis
        from hypothesis import strategies as st
        from schemathesis.hooks import HookDispatcher, HookScope

        from zumik_serve.api.v1.wire import UNSUPPORTED_FIELDS
        from zumik_serve.responses.wire import UNSUPPORTED_FIELDS as RESPONSES_UNSUPPORTED

        chat_unsupported = frozenset(UNSUPPORTED_FIELDS)
        unsupported = {  # by operation: a field one surface refuses may be another's to use
            "POST /chat/completions": chat_unsupported,
            "POST /completions": chat_unsupported,
            "POST /responses": frozenset(RESPONSES_UNSUPPORTED),
        }

        declared = _declared_request_fields(spec)
        steer = HookDispatcher(scope=HookScope.TEST)

        def flatmap_case(context: Any, case: Any) -> Any:
            return st.integers(0, 3).map(lambda k: _steer_positive(case, k, model, declared, unsupported))

        steer.register_hook_with_name(flatmap_case, "flatmap_case")
        schema = schemathesis.openapi.from_dict(spec)
        checker = _V1Check(spec)
        for method, path in V1_OPERATIONS:
            operation = spec["paths"][path][method.lower()]
            for mode in self.result.modes:
                self._drive(
                    OperationCounts("v1", f"{method} {path}", mode), schema[path][method],
                    steer if mode == "positive" else None, functools.partial(checker, operation),
                )  # fmt: skip

    def v2(self, served: dict[str, Any]) -> None:
        import schemathesis

        # The /v2 routes read their bodies themselves and declare no request schema: the
        # inputs generated are path parameters, queries and headers; the check is no 5xx.
        schema = schemathesis.openapi.from_dict({**served, "servers": [{"url": self.result.base_url}]})
        for path, methods in sorted(served["paths"].items()):
            for method in sorted(methods) if path.startswith("/v2/") else ():
                for mode in self.result.modes:
                    counts = OperationCounts("v2", f"{method.upper()} {path}", mode)
                    self._drive(counts, schema[path][method], None, lambda counts, response: [])

    def _drive(self, counts: OperationCounts, operation: Any, hooks: Any, check: Check) -> None:
        """Sends up to ``examples_per_operation`` generated cases of one operation in one mode."""
        import requests
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import seed as hypothesis_seed
        from hypothesis.errors import Unsatisfiable
        from schemathesis import GenerationMode

        result = self.result
        result.operations.append(counts)
        strategy = operation.as_strategy(generation_mode=GenerationMode(counts.mode), hooks=hooks)
        base_url = result.base_url + ("/v1" if counts.suite == "v1" else "")
        label = f"{counts.suite} {counts.operation} {counts.mode}"

        @hypothesis_seed(result.seed)
        @settings(
            max_examples=result.examples_per_operation, database=None, deadline=None,
            phases=[Phase.generate], suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
        )  # fmt: skip
        @given(strategy)
        def send(case: Any) -> None:
            counts.examples += 1
            try:
                response = case.call(base_url=base_url, session=session, headers=self.headers,
                                     timeout=REQUEST_TIMEOUT_S)  # fmt: skip
            except Exception as exc:  # the server did not answer
                counts.no_answer += 1
                self._keep(counts, case, None, [f"no answer: {type(exc).__name__}"])
            else:
                status = response.status_code
                counts.ok_2xx += 200 <= status < 300
                counts.client_4xx += 400 <= status < 500
                counts.server_5xx += status >= 500
                problems = [response.content.decode(errors="replace")] if status >= 500 else []
                self._keep(counts, case, status, problems or check(counts, response))
            if self.on_progress is not None:
                self.on_progress(label, counts.examples)

        with requests.Session() as session:
            try:
                send()
            except Unsatisfiable:  # nothing to negate: no parameters, or only string ones
                counts.skipped = f"no {counts.mode} input exists for this operation"

    def _keep(self, counts: OperationCounts, case: Any, status: int | None, problems: list[str]) -> None:
        result = self.result
        kept = sum(1 for e in result.examples if (e.suite, e.operation, e.mode) == (counts.suite,
                   counts.operation, counts.mode))  # fmt: skip
        if problems and kept < EXAMPLES_KEPT:
            example = FailingExample(counts.suite, counts.mode, counts.operation, case.formatted_path, status,
                                     _short("; ".join(problems)), _request_body(case))  # fmt: skip
            result.examples.append(example)


class _V1Check:
    """Checks one /v1 answer against its operation in the official spec."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec, self.context = spec, SchemaContext(spec)

    def __call__(self, operation: Mapping[str, Any], counts: OperationCounts, response: Any) -> list[str]:
        status = response.status_code
        media_type = _header(response, "content-type").split(";")[0].strip()
        if media_type == "text/event-stream" and status == 200:
            return []  # a stream=true answer: SSE events, not one JSON body
        schema = _response_schema(operation, status, "application/json")
        try:
            body = json.loads(response.content)
        except ValueError:
            body, schema = None, None
        if schema is None:
            counts.schema_failures += 1
            return [f"HTTP {status} with a {media_type or 'no'} body is not declared for this operation"]
        if 400 <= status < 500:
            problems = error_body_problems(body, schema, self.spec)
        else:
            problems = self.context.problems(schema, body)
        extra = non_spec_keys(schema, body, self.spec)
        counts.schema_failures += bool(problems)
        counts.non_spec_keys += bool(extra)
        return problems + [f"non-spec key {path}" for path in extra[:3]]


def _request_body(case: Any) -> str | None:
    body = getattr(case, "body", None)
    if isinstance(body, bytes):
        return _short(repr(body))
    if body is None or type(body).__name__ == "NotSet":
        return None
    try:
        return _short(json.dumps(body, ensure_ascii=False))
    except (TypeError, ValueError):
        return _short(repr(body))


def _header(response: Any, name: str) -> str:
    for key, values in response.headers.items():
        if key.lower() == name:
            return values[0] if isinstance(values, list) and values else str(values)
    return ""


# --- the command ----------------------------------------------------------------------------

COLUMNS = ("examples", "ok_2xx", "client_4xx", "server_5xx", "no_answer", "schema_failures", "non_spec_keys")


def run_fuzz_bench(args: Any, console: Any) -> int:
    from rich.progress import Progress as RichProgress
    from rich.table import Table

    key = args.key or os.environ.get("ZUMIK_DEV_KEY")
    if not key:
        console.print("[red]error:[/red] no API key: pass --key or set ZUMIK_DEV_KEY")
        return 2
    spec_path = default_spec_path()
    if spec_missing_reason(spec_path) is not None:
        console.print(f"[yellow]skipping /v1: {spec_missing_reason(spec_path)}[/yellow]")
    with RichProgress(console=console, transient=True) as progress:
        task = progress.add_task("fuzzing", total=None)

        def on_progress(label: str, done: int) -> None:
            progress.update(task, description=f"{label}: {done}/{args.examples}")

        result = run_fuzz(args.url, key, examples_per_operation=args.examples, seed=args.seed,
                          spec_path=spec_path, on_progress=on_progress)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    if args.json:
        print(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
        return 1 if result.failed or result.short_v1_rows() else 0
    table = Table(title=f"Fuzz of {result.base_url} (OpenAI spec {result.spec_version}, schemathesis "
                        f"{result.schemathesis_version}, seed {result.seed})")  # fmt: skip
    for column in (
        "suite",
        "operation",
        "mode",
        "examples",
        "2xx",
        "4xx",
        "5xx",
        "no answer",
        "schema",
        "extra keys",
    ):
        table.add_column(column, justify="left" if column in ("suite", "operation", "mode") else "right")
    for c in _table_rows(result):
        cells = [str(getattr(c, name)) for name in COLUMNS]
        table.add_row(c.suite, c.operation, c.mode, *cells, style="red" if c.failures else None)
    console.print(table)
    for line in _notes(result):
        console.print(line, markup=False, highlight=False)
    short = result.short_v1_rows()
    v1_rows = [c for c in result.operations if c.suite == "v1"]
    reached = len(v1_rows) - len(short)
    console.print(f"/v1 rows with at least {args.examples} examples: {reached} of {len(v1_rows)}")
    for c in short:
        console.print(f"SHORT {c.operation} ({c.mode}): {c.examples} examples", markup=False, highlight=False)
    console.print(f"{result.elapsed_s:.0f} s; wrote {args.out / 'fuzz.json'}")
    return 1 if result.failed or short else 0


def _table_rows(result: FuzzResult) -> Iterator[OperationCounts]:
    yield from (c for c in result.operations if c.suite == "v1")
    for mode in result.modes:  # /v2 has many operations: one summed row per mode, plus failing ones
        rows = [c for c in result.operations if c.suite == "v2" and c.mode == mode]
        total = OperationCounts("v2", f"{len(rows)} operations", mode)
        for name in COLUMNS:
            setattr(total, name, sum(getattr(c, name) for c in rows))
        yield from [total, *(c for c in rows if c.failures)] if rows else []


def _notes(result: FuzzResult) -> Iterator[str]:
    yield from (f"skipped: {reason}" for reason in (result.v1_skipped, result.v2_skipped) if reason)
    for c in result.operations:
        if c.skipped and c.suite == "v1":
            yield f"no examples for {c.operation} ({c.mode}): {c.skipped}"
    for mode in result.modes:
        skipped = [c for c in result.operations if c.suite == "v2" and c.mode == mode and c.skipped]
        if skipped:
            yield f"/v2 {mode}: {len(skipped)} operations have no {mode} input (no or only string parameters)"
    for e in result.examples:
        yield f"FAIL {e.suite} {e.mode} {e.operation.split()[0]} {e.path} -> {e.status}: {e.reason}"
        yield f"     body: {e.request_body}" if e.request_body else "     (no body)"
