"""The profile model: everything Zumik needs to serve one model on one kind of hardware.

Rules kept here: a profile is frozen and forbids unknown fields, so a typo fails at load with
the field named; every size carries its unit in its name; the fingerprint is a digest of the
canonical JSON of the whole profile, so any change to a profile gives a new fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import re
from decimal import ROUND_HALF_EVEN, Context, Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

TINY_MODEL_SOURCE = "builtin:tiny"


class Device(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ServedName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")]


class AdapterSpec(_Frozen):
    """A LoRA adapter on a model: served by the model's own engines, under its own name (vLLM
    keeps an adapter's prefix cache apart from the base model's)."""

    name: ServedName = Field(description="The `model` name clients send to use the adapter.")
    source: str = Field(
        description="'builtin:tiny-lora' (built locally on first use, for the tiny model) or a local "
        "PEFT adapter directory (adapter_config.json). Nothing is downloaded."
    )


class ModelSpec(_Frozen):
    """Which weights and tokenizer to serve, and the name clients use for them."""

    source: str = Field(
        description=f"'{TINY_MODEL_SOURCE}' (built locally on first use) or a local Hugging "
        "Face model directory. Nothing is downloaded from a model hub."
    )
    served_name: ServedName = Field(description="The `model` name clients send on /v1 and see in /v1/models.")
    tokenizer: str | None = Field(
        default=None, description="A tokenizer directory; defaults to the model directory."
    )
    adapters: tuple[AdapterSpec, ...] = Field(
        default=(), description="LoRA adapters served on this model by its engines."
    )


VllmArgValue = str | bool | int | float | list[Any] | dict[str, Any] | None
"""A value of one vLLM argument, as YAML gives it (a dict or list for JSON-valued arguments)."""

VLLM_ARGS_OWNED_BY_PROFILE: dict[str, str] = {
    "model": "model.source",
    "served_model_name": "model.served_name",
    "tokenizer": "model.tokenizer",
    "enable_lora": "model.adapters",
    "lora_modules": "model.adapters",
    "device": "engine.device",
    "dtype": "engine.dtype",
    "quantization": "engine.quantization",
    "kv_cache_dtype": "engine.kv_cache_dtype",
    "block_size": "engine.block_size",
    "kv_cache_memory_bytes": "engine.kv_cache_memory_bytes",
    "gpu_memory_utilization": "engine.gpu_memory_utilization",
    "max_model_len": "engine.max_model_len",
    "max_num_seqs": "engine.max_num_seqs",
    "enable_prefix_caching": "engine.enable_prefix_caching",
    "enforce_eager": "engine.enforce_eager",
    "tensor_parallel_size": "engine.tensor_parallel_size",
    "pipeline_parallel_size": "engine.pipeline_parallel_size",
    "seed": "engine.seed",
    "scheduling_policy": "engine.scheduling_policy",
    "kv_transfer_config": "kv_tiers",
    "enable_prompt_tokens_details": "nothing (always on: usage reports cached tokens)",
    "disable_log_stats": "nothing (always off: engine metrics feed Zumik's)",
    "prefix_caching_hash_algo": (
        "nothing (always sha256_cbor: Zumik's routing computes the engine's block hashes, and a "
        "non-cryptographic hash would let a crafted prompt collide with cached blocks)"
    ),
}
"""vLLM arguments that come from a profile field: given in ``vllm_args`` they are refused, so
that each setting has one place (and the compat key sees it)."""


SERVE_METRICS_INTERVAL_S = 10.0  # Serve's AutoscalingConfig.metrics_interval_s default


class AutoscalingSpec(_Frozen):
    """Ray Serve autoscaling of an engine group (one deployment; Zumik still picks the replica).
    ``num_replicas`` is then ignored."""

    min_replicas: Annotated[int, Field(ge=0, le=64)] = 1
    max_replicas: Annotated[int, Field(ge=1, le=64)] = 2
    target_ongoing_requests: Annotated[float, Field(gt=0)] = 4.0
    initial_replicas: Annotated[int, Field(ge=0, le=64)] | None = Field(
        default=None, description="Replicas at deploy (Serve's default: min_replicas)."
    )
    # Serve's defaults. An engine replica takes minutes to start and its prefix cache is lost
    # when it stops: scale down slowly unless the load really changes.
    upscale_delay_s: Annotated[float, Field(ge=0)] = 30.0
    downscale_delay_s: Annotated[float, Field(ge=0)] = 600.0
    look_back_period_s: Annotated[float, Field(gt=0)] = Field(
        default=30.0, description="The window Serve averages ongoing requests over."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("engine.autoscaling.min_replicas must not exceed max_replicas")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError("engine.autoscaling.initial_replicas must lie within min_replicas..max_replicas")
        if self.look_back_period_s <= SERVE_METRICS_INTERVAL_S:
            raise ValueError(
                f"engine.autoscaling.look_back_period_s ({self.look_back_period_s:g}) must be above "
                f"Serve's metrics interval ({SERVE_METRICS_INTERVAL_S:g} s): a window that short holds "
                "one report at most (Serve warns now and will refuse it); use 12 or more"
            )
        return self


class EngineSpec(_Frozen):
    """How the vLLM engine replicas run."""

    device: Device = Device.CPU
    num_replicas: Annotated[int, Field(ge=1, le=64)] = 1
    autoscaling: AutoscalingSpec | None = Field(
        default=None, description="Serve autoscaling of the engine group instead of num_replicas."
    )
    dtype: str = Field(default="bfloat16", description="Weights/activation dtype for vLLM.")
    quantization: str | None = Field(default=None, description="vLLM weight quantization.")
    kv_cache_dtype: str = Field(default="auto", description="vLLM KV cache dtype.")
    block_size: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=32, description="KV block size in tokens; cache hits come in multiples of it."
    )
    kv_cache_memory_bytes: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="Explicit KV cache size. Required on CPU, where vLLM would otherwise "
        "reserve a fraction of host RAM.",
    )
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    max_model_len: Annotated[int, Field(ge=16)] = 2048
    max_num_seqs: Annotated[int, Field(ge=1)] = 16
    enable_prefix_caching: bool = True
    enforce_eager: bool = True
    tensor_parallel_size: Annotated[int, Field(ge=1)] = 1
    pipeline_parallel_size: Annotated[int, Field(ge=1)] = 1
    accelerator_type: str | None = Field(
        default=None, description="Ray accelerator type the replicas need (e.g. 'H100'), or any."
    )
    cpus_per_replica: Annotated[float, Field(gt=0)] = 1.0
    seed: int = 0
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        default="fcfs",
        description="vLLM's scheduling policy; 'priority' lets QoS classes reach the engine "
        "(qos.classes.*.engine_priority, lower runs first).",
    )
    vllm_args: dict[str, VllmArgValue] = Field(
        default_factory=dict,
        description="Any other vLLM engine or OpenAI-server argument, by its Python name "
        "(`vllm serve --tool-call-parser hermes` is `tool_call_parser: hermes`), checked against "
        "vLLM's own argument parser when the profile is served or validated. Arguments the "
        "profile has a field for are refused here, naming the field.",
    )

    @field_validator("vllm_args")
    @classmethod
    def _vllm_args_are_not_profile_fields(cls, value: dict[str, VllmArgValue]) -> dict[str, VllmArgValue]:
        for name in value:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(
                    f"vllm_args: {name!r} is not a vLLM argument name; use its Python name "
                    "(--tool-call-parser is tool_call_parser)"
                )
            owner = VLLM_ARGS_OWNED_BY_PROFILE.get(name)
            if owner is not None:
                raise ValueError(f"vllm_args.{name}: set {owner} instead (Zumik derives it from there)")
        return value

    @model_validator(mode="after")
    def _device_settings_are_consistent(self) -> EngineSpec:
        kv_size_unset = self.gpu_memory_utilization is None and self.kv_cache_memory_bytes is None
        if self.device is Device.CUDA and kv_size_unset:
            raise ValueError(
                "a cuda profile needs gpu_memory_utilization (e.g. 0.9) or kv_cache_memory_bytes, "
                "so that the KV cache size is a choice, not a default"
            )
        return self

    @model_validator(mode="after")
    def _cpu_needs_explicit_kv_size(self) -> EngineSpec:
        if self.device is Device.CPU and self.kv_cache_memory_bytes is None:
            raise ValueError(
                "kv_cache_memory_bytes is required when device is 'cpu' (vLLM would otherwise "
                "reserve a fraction of host RAM); set e.g. 268435456 for 256 MiB"
            )
        return self


class ModelGroupSpec(_Frozen):
    """One more model a profile serves, on an engine group of its own (``engine``: its replicas
    and settings, as the profile's ``engine`` section)."""

    model: ModelSpec
    engine: EngineSpec


class GatewayPlacement(StrEnum):
    SEPARATE = "separate"
    COLOCATED = "colocated"


class GatewaySpec(_Frozen):
    """The stateless ingress in front of the engines."""

    placement: GatewayPlacement = Field(
        default=GatewayPlacement.SEPARATE,
        description="'separate': Gateway replicas call engine replicas through a Serve handle. "
        "'colocated': each engine replica serves the gateway app in-process (one hop fewer; "
        "num_replicas is then the engine's).",
    )
    num_replicas: Annotated[int, Field(ge=1, le=64)] = 1
    max_body_bytes: Annotated[int, Field(ge=1024)] = 4 * 1024 * 1024
    max_artifact_bytes: Annotated[int, Field(ge=1)] = 2 * 1024 * 1024
    max_n: Annotated[int, Field(ge=1, le=128)] = Field(default=8, description="Largest n a request may ask.")
    max_messages: Annotated[int, Field(ge=1)] = Field(default=2048, description="Most messages per request.")
    max_prompts: Annotated[int, Field(ge=1)] = Field(
        default=64, description="Most prompts in one /v1/completions request."
    )
    body_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=60.0,
        description="Most seconds a request body may take to arrive (from the first byte the handler "
        "reads); a slower upload gets 408. Neither uvicorn nor Ray Serve bounds it by default.",
    )
    max_snapshot_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=8 * 1024 * 1024,
        description="Most bytes a bundle or snapshot expands to: every artifact reference counted "
        "in full (a repeated artifact each time), plus a snapshot's turns. Beyond it: 413.",
    )
    max_bundle_artifacts: Annotated[int, Field(ge=1)] = Field(
        default=1024, description="Most artifact references in one bundle (repeats included)."
    )
    max_tokenize_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=8 * 1024 * 1024,
        description="Most bytes of message text the gateway tokenizes for one request (a snapshot's "
        "compilation, a /v2 prompt with its snapshot); beyond it: 413.",
    )


class KvTiersSpec(_Frozen):
    """Zumik's KV tiers behind the engine (vLLM KV connector ``kvstore.connector``)."""

    enabled: bool = False
    host_capacity_bytes: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="Host-RAM tier (shared memory) per node: every engine process of the node "
        "counts into one budget, least recently used blocks go first; 0 for none.",
    )
    redis: bool = Field(
        default=False,
        description="Use a KV Redis as the region-shared tier: its own server, never the state "
        "Redis (``zumik serve`` starts one; else ZUMIK_KV_REDIS_URL or the Serve args' kv_redis_url).",
    )
    redis_max_memory_bytes: Annotated[int, Field(gt=0)] = Field(
        default=1 << 30,
        description="maxmemory of the KV Redis that ``zumik serve`` starts (volatile-lru: least "
        "recently used blocks are evicted); an external KV Redis sets its own.",
    )
    disk_root: str | None = Field(
        default=None,
        description="Folder of the disk tier ('$ZUMIK_HOME' expands to Zumik's data folder); None: none.",
    )
    disk_capacity_bytes: Annotated[int, Field(gt=0)] = Field(
        default=16 << 30,
        description="Byte budget of the disk tier's folder (least recently used blocks go first).",
    )
    write_behind_max_bytes: Annotated[int, Field(gt=0)] = Field(
        default=256 << 20,
        description="Bound of each engine worker's store queue: stores run behind the engine "
        "step, and a store that finds the queue full is dropped (counted; recomputed when needed).",
    )
    seal: bool = Field(
        default=True,
        description="Seal blocks in the persistent tiers (Redis, disk) with AES-GCM under a data key "
        "per isolation scope, so that a purge can crypto-erase them by destroying the key.",
    )


def group_served_names(group: ModelGroupSpec) -> tuple[str, ...]:
    """The group's model name, then its adapters' names."""
    return (group.model.served_name, *(adapter.name for adapter in group.model.adapters))


PurgeCeiling = Literal["revoked", "unindexed", "deleted", "compacted", "crypto_erased", "provider_expiry"]


class PurgeSpec(_Frozen):
    """What a purge can honestly promise on this deployment (DESIGN.md section 7)."""

    ceiling: PurgeCeiling = Field(
        default="crypto_erased",
        description="The strongest guarantee class a receipt of this profile may state; receipts "
        "state the weakest class over the stores that held the data, never above this. "
        "'provider_expiry' (ranked with 'revoked'): content may go to third-party providers, whose "
        "copy ends only when their retention does.",
    )
    max_per_minute: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=10,
        description="New purges a tenant may start in a minute (each rewrites Redis' AOF and "
        "sweeps every KV tier); past it, 429 with Retry-After. Resuming one, or asking again for a "
        "finished one's receipt, is not counted.",
    )


# OpenAI's API keeps inputs and outputs in abuse-monitoring logs "for up to 30 days" by default
# (OpenAI platform docs, "Your data": Data retention controls for abuse monitoring); most
# OpenAI-compatible managed APIs state the same or less. A route whose provider says otherwise
# (or has a zero-data-retention agreement) sets ``retention_days``.
DEFAULT_PROVIDER_RETENTION_DAYS = 30


class RouteKind(StrEnum):
    """Who runs the model behind a route and whose key pays for it."""

    MANAGED = "managed"  # an OpenAI-compatible provider, Zumik's key (api_key_env)
    BYOK = "byok"  # an OpenAI-compatible provider, the tenant's own key
    BYOC = "byoc"  # the tenant's own GPUs running vLLM: this profile's engine replicas


MAX_PRICE_DECIMALS = 6
_DECIMAL = Context(prec=40, rounding=ROUND_HALF_EVEN)  # explicit, so no thread's context can move a price
PICO_USD_PER_USD_PER_MTOK = 10**6  # 1 USD per million tokens is 10**6 pico-USD per token


def _decimal_string_only(value: object) -> object:
    if isinstance(value, bool | int | float):
        raise ValueError(f'give it as a quoted decimal string (e.g. "{value}"), never a YAML number')
    return value


def _valid_decimal_string(value: str) -> str:
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a decimal number") from None
    if not number.is_finite() or number < 0:
        raise ValueError(f"{value!r} must be a finite number >= 0")
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_PRICE_DECIMALS:
        raise ValueError(f"{value!r} has more than {MAX_PRICE_DECIMALS} decimal places")
    return value


DecimalString = Annotated[str, BeforeValidator(_decimal_string_only), AfterValidator(_valid_decimal_string)]
"""A non-negative decimal given as a string ("0.15"): money never passes through a float."""


def usd_per_mtok_to_pusd_per_token(usd_per_mtok: str) -> int:
    """USD per million tokens (a decimal string of at most 6 places) as integer pico-USD per token
    (exact: 1 USD/Mtok = 10**6 pUSD/token)."""
    return int(Decimal(usd_per_mtok).scaleb(6, context=_DECIMAL))


class PriceSpec(_Frozen):
    """A provider's list prices, each in USD per million tokens, as decimal strings."""

    input: DecimalString
    cached_input: DecimalString
    output: DecimalString


class RouteSpec(_Frozen):
    """One path a request can take: a managed provider, a BYOK provider, or this profile's engines.

    Field rules by kind (checked at load, the field named): ``base_url`` is required for managed and
    byok and forbidden for byoc (its engines are this profile's replicas); ``model`` is required for
    managed and byok; ``api_key_env`` is for managed only (a BYOK key is the tenant's, never the
    profile's); ``prices`` is required for managed and byok; byoc instead gives
    ``replica_hour_usd`` and ``tokens_per_replica_hour``.
    """

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    kind: RouteKind
    base_url: str | None = Field(
        default=None,
        description="OpenAI-compatible base URL ending before /chat/completions; "
        "'${VAR:-default}' expands at load (profiles/loader.py).",
    )
    model: str | None = Field(default=None, description="The provider's model name; byoc: optional.")
    api_key_env: str | None = Field(
        default=None, description="managed only: the environment variable holding Zumik's key."
    )
    prices: PriceSpec | None = None
    replica_hour_usd: DecimalString | None = Field(
        default=None, description="byoc only: what one engine replica costs per hour, in USD."
    )
    tokens_per_replica_hour: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="byoc only: tokens one replica processes per hour at load."
    )
    timeout_s: Annotated[int, Field(ge=1, le=3600)] = 30
    max_retries: Annotated[int, Field(ge=0, le=10)] = 1
    max_inflight: Annotated[int, Field(ge=1)] | None = Field(
        default=None,
        description="Most requests this gateway has at the route at once; beyond it the route is "
        "skipped for the next fallback, and with none left the request gets 429. None: no limit.",
    )
    retention_days: Annotated[int, Field(ge=0, le=3650)] | None = Field(
        default=None,
        description="managed and byok only: how many days the provider keeps what it is sent, as "
        "its terms state (0: a zero-data-retention agreement). None: "
        "DEFAULT_PROVIDER_RETENTION_DAYS. A purge receipt names it for every provider a target's "
        "content reached (provider_expiry).",
    )

    @model_validator(mode="after")
    def _fields_fit_the_kind(self) -> RouteSpec:
        kind = self.kind.value
        provider = self.kind is not RouteKind.BYOC
        rules: list[tuple[str, bool, bool]] = [  # field, required, allowed
            ("base_url", provider, provider),
            ("model", provider, True),
            ("api_key_env", False, self.kind is RouteKind.MANAGED),
            ("prices", provider, provider),
            ("retention_days", False, provider),
            ("replica_hour_usd", not provider, not provider),
            ("tokens_per_replica_hour", not provider, not provider),
        ]
        for field, required, allowed in rules:
            value = getattr(self, field)
            if value is None and required:
                raise ValueError(f"{field} is required for a {kind} route ({self.name!r})")
            if value is not None and not allowed:
                why = " (a byok key is the tenant's)" if field == "api_key_env" else ""
                raise ValueError(f"{field} is not allowed on a {kind} route ({self.name!r}){why}")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url of route {self.name!r} must start with http:// or https://")
        return self

    def provider_retention_days(self) -> int:
        """How long the provider keeps what it is sent: ``retention_days``, else the default."""
        return DEFAULT_PROVIDER_RETENTION_DAYS if self.retention_days is None else self.retention_days

    def token_prices_pusd(self) -> tuple[int, int, int]:
        """(input, cached_input, output) in integer pico-USD per token.

        byoc: the replica-hour price spread over the tokens a replica processes in that hour,
        rounded half-even to a whole pUSD, for input and output; cached input is 0, because a
        replica that holds the prefix does not process it again (its hour is paid either way).
        """
        if self.prices is not None:
            return (
                usd_per_mtok_to_pusd_per_token(self.prices.input),
                usd_per_mtok_to_pusd_per_token(self.prices.cached_input),
                usd_per_mtok_to_pusd_per_token(self.prices.output),
            )
        if self.replica_hour_usd is None or self.tokens_per_replica_hour is None:
            raise ValueError(f"route {self.name!r} has no prices")  # unreachable after validation
        hour_pusd = Decimal(self.replica_hour_usd).scaleb(12, context=_DECIMAL)
        per_token = int(
            _DECIMAL.divide(hour_pusd, self.tokens_per_replica_hour).to_integral_value(context=_DECIMAL)
        )
        return per_token, 0, per_token


EvidenceThreshold = Literal["reported", "observed"]


class EscalationSpec(_Frozen):
    """When a request may leave the managed default for BYOK or BYOC: only on recorded evidence
    that the tenant's traffic reuses enough prefix (DESIGN.md section 6 for the levels)."""

    to: Literal["byok", "byoc", "none"] = "none"
    min_evidence: EvidenceThreshold = Field(
        default="observed", description="The weakest evidence level that counts (levels are ordered)."
    )
    min_reused_tokens_in_window: Annotated[int, Field(ge=0)] = 0
    window_s: Annotated[int, Field(ge=1)] = 3600


class BreakerSpec(_Frozen):
    """Per-candidate circuit breaker and the retry budget (zumik_serve/routing)."""

    failure_threshold: Annotated[int, Field(ge=1)] = 3
    cooldown_s: Annotated[int, Field(ge=0)] = 10
    retry_budget_ratio: DecimalString = Field(
        default="0.2", description="At most this many retries per request, over a window."
    )


class RoutingSpec(_Frozen):
    """How the profile's scheduler chooses among its routes."""

    policy_version: Annotated[str, Field(min_length=1, max_length=64)] = "v1"
    default_route: str | None = Field(
        default=None, description="A route name; default: the first managed route, else the first route."
    )
    fallback_order: tuple[str, ...] = Field(
        default=(), description="Route names tried after the pick, in order; empty: all, as declared."
    )
    escalation: EscalationSpec = EscalationSpec()
    breaker: BreakerSpec = BreakerSpec()
    replica_choice: Literal["scheduler", "serve"] = Field(
        default="scheduler",
        description="'scheduler': Zumik picks the BYOC replica (prefix residency and load; one Serve "
        "deployment whose RequestRouter honours the pick). 'serve': one deployment of "
        "engine.num_replicas replicas and Ray Serve's own load balancing (the baseline of "
        "`zumik bench routing`).",
    )


LOCAL_ROUTE = RouteSpec(
    name="local", kind=RouteKind.BYOC, replica_hour_usd="0", tokens_per_replica_hour=1
)  # the implicit route of a profile without routes: its own engines, priced at zero


class QosClass(StrEnum):
    INTERACTIVE = "interactive"
    STANDARD = "standard"
    BATCH = "batch"


class QosClassSpec(_Frozen):
    """One QoS class's share of a gateway: its own admission limit and priority."""

    max_running: Annotated[int, Field(ge=1)] = Field(
        description="Requests of this class a gateway has at its routes at once."
    )
    max_queued: Annotated[int, Field(ge=0)] = Field(
        description="Requests of this class waiting for a running slot; beyond them: 429."
    )
    engine_priority: int = Field(
        default=0, description="vLLM request priority on this profile's engines (lower runs first)."
    )
    prefer_cheapest_route: bool = Field(
        default=False,
        description="Pick the cheapest healthy route (expected cost) instead of the default pool.",
    )
    max_per_tenant: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None,
        description="Most requests of this class one tenant has running plus queued in a gateway; "
        "beyond it that tenant gets 429 while others are still admitted. None: every running slot "
        "and half the queue (max_running + max_queued // 2).",
    )

    def tenant_share(self) -> int:
        """``max_per_tenant``, else every running slot and half the queue: a tenant alone uses
        the whole class, and a flood of one tenant leaves the other half of the queue to others."""
        if self.max_per_tenant is not None:
            return self.max_per_tenant
        return self.max_running + self.max_queued // 2


def _default_qos_classes() -> dict[QosClass, QosClassSpec]:
    return {
        QosClass.INTERACTIVE: QosClassSpec(max_running=16, max_queued=32, engine_priority=0),
        QosClass.STANDARD: QosClassSpec(max_running=16, max_queued=64, engine_priority=1),
        QosClass.BATCH: QosClassSpec(
            max_running=4, max_queued=128, engine_priority=2, prefer_cheapest_route=True
        ),
    }


class QosSpec(_Frozen):
    """QoS classes (``x-zumik-qos`` on /v1, ``qos`` on /v2), within each tenant's policy."""

    default_class: QosClass = QosClass.STANDARD
    classes: dict[QosClass, QosClassSpec] = Field(default_factory=_default_qos_classes)
    queue_timeout_s: Annotated[float, Field(gt=0, le=600)] = Field(
        default=30.0, description="Most a request waits for a running slot before it gets 429."
    )
    retry_after_s: Annotated[int, Field(ge=1, le=3600)] = Field(
        default=1, description="Retry-After of a 429 when the queue is full."
    )

    @model_validator(mode="after")
    def _every_class_defined(self) -> QosSpec:
        missing = [qos.value for qos in QosClass if qos not in self.classes]
        if missing:
            raise ValueError(f"qos.classes: define every class; missing: {', '.join(missing)}")
        return self


QuotaLimit = Annotated[StrictInt, Field(ge=0)] | None
"""A per-tenant limit: a JSON/YAML integer (a string or a bool is refused), or None for none."""


class QuotaSpec(_Frozen):
    """Per-tenant limits (every tenant's default; ``zumik tenant quota set`` overrides them per
    tenant). None: no limit. Storage counts what Zumik keeps for the tenant until a purge."""

    stored_bytes: QuotaLimit = Field(
        default=1024**3,
        description="Bytes of object records, artifact content (once per distinct content), session "
        "turns and stored responses.",
    )
    objects: QuotaLimit = Field(
        default=100_000, description="Artifacts, bundles, sessions, branches, snapshots and stored responses."
    )
    session_turns: QuotaLimit = Field(
        default=10_000, description="Most turns one session or branch holds (its head)."
    )
    kv_bytes: QuotaLimit = Field(
        default=None,
        description="Bytes of KV blocks one tenant's cache scope keeps in the Redis tier; past it, "
        "blocks are not stored there (the engine recomputes them).",
    )
    requests_per_minute: QuotaLimit = Field(
        default=None, description="Generation requests per minute (a sliding window shared by all gateways)."
    )
    tokens_per_minute: QuotaLimit = Field(
        default=None,
        description="Prompt plus max output tokens per minute, reserved at admission and corrected "
        "to the usage the engine reports.",
    )


class TelemetrySpec(_Frozen):
    traces: Literal["none", "otlp", "console"] = Field(
        default="none",
        description="OpenTelemetry spans per request: 'otlp' exports to "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; ZUMIK_TRACES overrides this.",
    )


class Profile(_Frozen):
    """One served model on one kind of hardware, in one region."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    description: str = ""
    region: Annotated[str, Field(min_length=1)] = "local"
    model: ModelSpec
    engine: EngineSpec
    models: tuple[ModelGroupSpec, ...] = Field(
        default=(),
        description="More models, each on an engine group of its own; clients pick one with "
        "`model` and GET /v1/models lists them all (with every adapter).",
    )
    gateway: GatewaySpec = GatewaySpec()
    kv_tiers: KvTiersSpec = KvTiersSpec()
    purge: PurgeSpec = PurgeSpec()
    routes: tuple[RouteSpec, ...] = Field(
        default=(), description="Where requests may go; none: one implicit byoc route 'local' (its engines)."
    )
    routing: RoutingSpec = RoutingSpec()
    qos: QosSpec = QosSpec()
    quota: QuotaSpec = QuotaSpec()
    telemetry: TelemetrySpec = TelemetrySpec()
    niceness: Annotated[int, Field(ge=0, le=19)] = Field(
        default=0,
        description="CPU priority (nice value) of the serving processes: engine replicas with "
        "vLLM's engine core, gateway, and, on a Ray head Zumik starts, Serve's proxy and HAProxy. "
        "0 is normal priority; Ray's own default for its workers is 15.",
    )

    @model_validator(mode="after")
    def _routing_names_existing_routes(self) -> Profile:
        names = [route.name for route in self.effective_routes()]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"routes: route names must be unique; repeated: {', '.join(duplicates)}")
        known = ", ".join(names)
        default = self.routing.default_route
        if default is not None and default not in names:
            raise ValueError(f"routing.default_route: {default!r} is not a route of this profile ({known})")
        for name in self.routing.fallback_order:
            if name not in names:
                raise ValueError(f"routing.fallback_order: {name!r} is not a route of this profile ({known})")
        if len(set(self.routing.fallback_order)) != len(self.routing.fallback_order):
            raise ValueError("routing.fallback_order: a route is named twice")
        byoc = [route.name for route in self.effective_routes() if route.kind is RouteKind.BYOC]
        if len(byoc) > 1:  # both would name the same replicas: the profile's own engines
            raise ValueError(
                f"routes: at most one byoc route, the profile's own engines; {', '.join(byoc)} are byoc. "
                "Serve another model as an entry of `models`, or another cluster as a second profile."
            )
        return self

    @model_validator(mode="after")
    def _served_names_are_unique(self) -> Profile:
        names = [name for group in self.model_groups() for name in group_served_names(group)]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"models: served names and adapter names must be unique; repeated: {', '.join(repeated)}"
            )
        return self

    def model_groups(self) -> tuple[ModelGroupSpec, ...]:
        """Every engine group: the profile's own model and engine first, then ``models``."""
        return (ModelGroupSpec(model=self.model, engine=self.engine), *self.models)

    def served_names(self) -> tuple[str, ...]:
        """Every name a request may give as ``model``, in listing order."""
        return tuple(name for group in self.model_groups() for name in group_served_names(group))

    def group_of(self, served_name: str) -> ModelGroupSpec | None:
        """The engine group serving ``served_name`` (a model or one of its adapters)."""
        return next((g for g in self.model_groups() if served_name in group_served_names(g)), None)

    def group_profile(self, group: ModelGroupSpec) -> Profile:
        """The profile as one more model group's engines see it: that model and engine, and its
        own engines as the only route (providers serve the first model only)."""
        routing = self.routing.model_copy(
            update={"default_route": None, "fallback_order": (), "escalation": EscalationSpec()}
        )
        return Profile.model_validate(
            {
                **self.model_dump(),
                "model": group.model.model_dump(),
                "engine": group.engine.model_dump(),
                "models": (),
                "routes": (),
                "routing": routing.model_dump(),
            }
        )

    def effective_routes(self) -> tuple[RouteSpec, ...]:
        """The declared routes, or the implicit byoc route 'local' over this profile's engines."""
        return self.routes or (LOCAL_ROUTE,)

    def effective_default_route(self) -> str:
        """routing.default_route, else the first managed route, else the first route."""
        if self.routing.default_route is not None:
            return self.routing.default_route
        routes = self.effective_routes()
        managed = [route.name for route in routes if route.kind is RouteKind.MANAGED]
        return managed[0] if managed else routes[0].name

    def effective_fallback_order(self) -> tuple[str, ...]:
        """routing.fallback_order, else every route in declaration order."""
        return self.routing.fallback_order or tuple(route.name for route in self.effective_routes())

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the whole profile (any change gives a new one)."""
        canonical = json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode()).hexdigest()
