"""The profile model: everything Zumik needs to serve one model on one kind of hardware.

Rules kept here: a profile is frozen and forbids unknown fields, so a typo fails at load with
the field named; every size carries its unit in its name; the fingerprint is a digest of the
canonical JSON of the whole profile, so any change to a profile gives a new fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TINY_MODEL_SOURCE = "builtin:tiny"


class Device(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Frozen):
    """Which weights and tokenizer to serve, and the name clients use for them."""

    source: str = Field(
        description=f"'{TINY_MODEL_SOURCE}' (built locally on first use) or a local Hugging "
        "Face model directory. Nothing is downloaded from a model hub."
    )
    served_name: Annotated[str, Field(min_length=1, max_length=128)] = Field(
        description="The `model` name clients send on /v1 and see in /v1/models."
    )
    tokenizer: str | None = Field(
        default=None, description="A tokenizer directory; defaults to the model directory."
    )


class EngineSpec(_Frozen):
    """How the vLLM engine replicas run."""

    device: Device = Device.CPU
    num_replicas: Annotated[int, Field(ge=1, le=64)] = 1
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


class KvTiersSpec(_Frozen):
    """Zumik's KV tiers behind the engine (vLLM KV connector ``kvstore.connector``)."""

    enabled: bool = False
    host_capacity_bytes: Annotated[int, Field(ge=0)] = Field(
        default=0, description="Host-RAM tier per engine process; 0 for none."
    )
    redis: bool = Field(default=False, description="Use Zumik's Redis as the region-shared tier.")
    disk_root: str | None = Field(
        default=None,
        description="Folder of the disk tier ('$ZUMIK_HOME' expands to Zumik's data folder); None: none.",
    )
    seal: bool = Field(
        default=True,
        description="Seal blocks in the persistent tiers (Redis, disk) with AES-GCM under a data key "
        "per isolation scope, so that a purge can crypto-erase them by destroying the key.",
    )


PurgeCeiling = Literal["revoked", "unindexed", "deleted", "compacted", "crypto_erased"]


class PurgeSpec(_Frozen):
    """What a purge can honestly promise on this deployment (DESIGN.md section 7)."""

    ceiling: PurgeCeiling = Field(
        default="crypto_erased",
        description="The strongest guarantee class a receipt of this profile may state; receipts "
        "state the weakest class over the stores that held the data, never above this.",
    )


class Profile(_Frozen):
    """One served model on one kind of hardware, in one region."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    description: str = ""
    region: Annotated[str, Field(min_length=1)] = "local"
    model: ModelSpec
    engine: EngineSpec
    gateway: GatewaySpec = GatewaySpec()
    kv_tiers: KvTiersSpec = KvTiersSpec()
    purge: PurgeSpec = PurgeSpec()

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the whole profile (any change gives a new one)."""
        canonical = json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode()).hexdigest()
