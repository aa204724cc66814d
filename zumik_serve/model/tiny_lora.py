"""The tiny LoRA adapter: a PEFT-format adapter for the tiny model, seeded, built byte-identically.

Rule kept here: two builds with the same ``TinyLoraSpec`` and base ``TinyModelSpec`` produce the
same bytes in every file (``fingerprint_adapter_dir`` is stable). The adapter is written in the
layout PEFT saves and vLLM's LoRA loader reads; no ``peft`` install is needed to build it:

    adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, bias "none", ...
    adapter_model.safetensors   base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}
                                  .lora_A.weight  (r, in_features)
                                  .lora_B.weight  (out_features, r)

Unlike a freshly initialised PEFT adapter (whose B is zero), both A and B are random, so the
adapter really changes the model's outputs: each module's delta ``(lora_alpha / r) * B @ A`` is
a quarter to a third of the base weight's norm for the defaults, enough to change greedy
tokens while the base model's "bias channel" still keeps them printable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvstore.atomic_file import write_atomic
from zumik_serve.model.tiny import TinyModelSpec

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")

# PEFT's prefix: the PeftModel wraps the LoRA-injected model as ``base_model.model``.
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class TinyLoraSpec:
    """Shape of the tiny adapter. ``base_model`` is what ``base_model_name_or_path`` records."""

    rank: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ATTENTION_MODULES + MLP_MODULES
    base_model: str = "builtin:tiny"
    seed: int = 20261210
    b_init_std: float = 0.02  # A is drawn with std 1/sqrt(in_features), as Kaiming init does


@dataclass(frozen=True)
class LoraAdapterInfo:
    """What a served adapter's ``adapter_config.json`` says that the engine must be sized for.

    ``rank`` is the largest rank in the adapter (``r`` or any ``rank_pattern`` entry): an engine
    loads it only with ``max_lora_rank >= rank``. ``base_model`` is ``base_model_name_or_path``,
    or None when the config does not say.
    """

    path: Path
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    base_model: str | None


def build_tiny_lora(
    out_dir: Path, spec: TinyLoraSpec | None = None, base: TinyModelSpec | None = None
) -> Path:
    """Build the adapter for a tiny model of shape ``base`` into ``out_dir`` (files replaced
    atomically, one by one, as ``build_tiny_model`` does)."""
    spec = spec or TinyLoraSpec()
    base = base or TinyModelSpec()
    unknown = sorted(set(spec.target_modules) - set(ATTENTION_MODULES + MLP_MODULES))
    if unknown:
        raise ValueError(f"the tiny model has no modules named {unknown}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "adapter_config.json": _json_bytes(_adapter_config(spec)),
        "adapter_model.safetensors": _adapter_weights_bytes(spec, base),
    }
    for name, data in files.items():
        write_atomic(out_dir / name, data)
    return out_dir


def is_adapter_dir(path: Path) -> bool:
    """True when ``path`` holds a PEFT adapter config and safetensors weights."""
    return all((Path(path) / name).is_file() for name in ADAPTER_FILES)


def fingerprint_adapter_dir(path: Path) -> str:
    """sha256 over the names and bytes of the adapter's files."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update((Path(path) / name).read_bytes())
    return digest.hexdigest()


def read_adapter_info(path: Path) -> LoraAdapterInfo:
    """Read ``adapter_config.json`` of a LoRA adapter folder; ValueError names what is wrong."""
    config_path = Path(path) / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        raise ValueError(f"{config_path}: missing {missing}")
    ranks = [int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    targets = config["target_modules"]
    return LoraAdapterInfo(
        path=Path(path),
        rank=max(ranks),
        lora_alpha=float(config["lora_alpha"]),
        target_modules=(targets,) if isinstance(targets, str) else tuple(targets),
        base_model=config.get("base_model_name_or_path"),
    )


def lora_module_shapes(base: TinyModelSpec) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each LoRA-targetable linear module of one decoder layer."""
    head_dim = base.hidden_size // base.num_heads
    kv_width = base.num_kv_heads * head_dim
    hidden, inter = base.hidden_size, base.intermediate_size
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (kv_width, hidden),
        "v_proj": (kv_width, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def lora_tensor_name(layer: int, module: str, matrix: str) -> str:
    """PEFT's tensor name of ``matrix`` ("lora_A" or "lora_B") of ``module`` in ``layer``."""
    block = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"{PEFT_PREFIX}model.layers.{layer}.{block}.{module}.{matrix}.weight"


def _adapter_config(spec: TinyLoraSpec) -> dict[str, object]:
    # The fields PEFT writes for a plain LoRA that vLLM reads or checks (``PEFTHelper``).
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": spec.base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "target_modules": sorted(spec.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def _adapter_weights_bytes(spec: TinyLoraSpec, base: TinyModelSpec) -> bytes:
    from safetensors.numpy import save

    rng = np.random.Generator(np.random.PCG64(spec.seed))
    shapes = lora_module_shapes(base)
    tensors: dict[str, np.ndarray] = {}
    # Drawn in a fixed order (layer, then the spec's module order) so bytes depend on the spec only.
    for layer in range(base.num_layers):
        for module in spec.target_modules:
            out_features, in_features = shapes[module]
            a_std = 1.0 / float(np.sqrt(in_features))
            lora_a = rng.standard_normal((spec.rank, in_features), dtype=np.float32) * a_std
            lora_b = rng.standard_normal((out_features, spec.rank), dtype=np.float32) * spec.b_init_std
            tensors[lora_tensor_name(layer, module, "lora_A")] = lora_a.astype(np.float32)
            tensors[lora_tensor_name(layer, module, "lora_B")] = lora_b.astype(np.float32)
    return bytes(save(tensors, metadata={"format": "pt"}))


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
