"""The tiny test model: a small Llama with seeded random weights, built locally, byte-identically.

Rule kept here: two builds with the same ``TinyModelSpec`` produce the same bytes in every file,
so the model's fingerprint (``fingerprint_model_dir``) is stable across builds and machines
that run the same library versions. Nothing is downloaded: the tokenizer is a byte-level BPE
trained on ``corpus.txt`` shipped beside this module, the weights come from a seeded
``numpy`` generator, and every JSON file is written with sorted keys.

The model is useless as a language model (its weights are random); it exists so that vLLM,
prefix caching, KV connectors and the whole serving path run for real on a CPU in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvstore.atomic_file import write_atomic

CORPUS_PATH = Path(__file__).with_name("corpus.txt")

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|developer|>", "<|user|>", "<|assistant|>", "<|tool|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)

# One turn per message, each closed by the end token; the generation prompt opens an assistant
# turn. The BOS token is emitted by the template, so chat prompts are tokenized without the
# tokenizer's own special tokens (vLLM does exactly that for chat requests).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# What ``lm_head`` gives the constant channel for a banned token (see ``_weights_bytes``).
BANNED_LOGIT_WEIGHT = -64.0

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny Llama. Defaults load in vLLM on CPU in about 30 s."""

    vocab_size_target: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 2048
    seed: int = 20261126
    init_std: float = 0.02


# ``builtin:tiny-b``: a second model of the same family and tokenizer, with other weights and
# another KV layout (2 layers of 2 KV heads: a quarter of the default's KV bytes per token), so
# profiles serving two models exercise two distinct compat keys and cache geometries.
TINY_B_SPEC = TinyModelSpec(num_layers=2, num_kv_heads=2, seed=20261209)

# ``builtin:tiny-wide``: the default's tokenizer and KV layout (4 layers of 4 KV heads of 64: the
# same KV bytes per token, so a bench sizes its caches alike) with about 8x its weights per
# layer (hidden 768 in 12 query heads, MLP 2,048). Its prefill costs several times the
# default's on a CPU, so a prompt's compute outweighs the serving stack's fixed work per
# request, as a real model's does on a GPU: what ``zumik bench routing --model`` uses to show
# what prefix-aware routing saves in TTFT.
TINY_WIDE_SPEC = TinyModelSpec(
    hidden_size=768, intermediate_size=2048, num_heads=12, num_kv_heads=4, seed=20261203
)


def build_tiny_model(out_dir: Path, spec: TinyModelSpec | None = None) -> Path:
    """Build the tiny model into ``out_dir`` (created), or bring a folder built earlier up to date.

    Only files whose bytes differ from this build are written, so a folder that is already
    current is left untouched (same files, same mtimes) and one built by an older Zumik is
    replaced. Files are written to a temporary name beside their final one and renamed into
    place, so a crash never leaves a half-written file under its final name.
    """
    spec = spec or TinyModelSpec()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in _render_files(spec).items():
        path = out_dir / name
        if not (path.is_file() and path.read_bytes() == data):
            write_atomic(path, data)
    return out_dir


def is_model_dir(path: Path) -> bool:
    """True when ``path`` holds every file of a built tiny model."""
    return all((Path(path) / name).is_file() for name in MODEL_FILES)


def fingerprint_model_dir(path: Path) -> str:
    """sha256 over the names and bytes of the model's files (weights, config, tokenizer)."""
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update((Path(path) / name).read_bytes())
    return digest.hexdigest()


def _render_files(spec: TinyModelSpec) -> dict[str, bytes]:
    tokenizer_json, vocab_size = _train_tokenizer(spec)
    token_ids = _special_token_ids(tokenizer_json)
    banned = _unprintable_token_ids(tokenizer_json)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": token_ids[BOS_TOKEN],
        "eos_token_id": token_ids[EOS_TOKEN],
        "pad_token_id": token_ids[PAD_TOKEN],
        "head_dim": spec.hidden_size // spec.num_heads,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": spec.init_std,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    generation_config = {
        "bos_token_id": token_ids[BOS_TOKEN],
        "eos_token_id": token_ids[EOS_TOKEN],
        "pad_token_id": token_ids[PAD_TOKEN],
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
    }
    special_tokens_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    return {
        "config.json": _json_bytes(config),
        "generation_config.json": _json_bytes(generation_config),
        "model.safetensors": _weights_bytes(spec, vocab_size, banned),
        "special_tokens_map.json": _json_bytes(special_tokens_map),
        "tokenizer.json": tokenizer_json.encode(),
        "tokenizer_config.json": _json_bytes(tokenizer_config),
    }


def _train_tokenizer(spec: TinyModelSpec) -> tuple[str, int]:
    # Training is single-threaded here so merges never depend on thread scheduling.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size_target,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = CORPUS_PATH.read_text(encoding="utf-8")
    tokenizer.train_from_iterator(text.splitlines(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # A plain completion prompt starts with BOS, like a chat prompt rendered by the template.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    canonical = json.dumps(json.loads(tokenizer.to_str()), sort_keys=True, ensure_ascii=False)
    return canonical, tokenizer.get_vocab_size()


def _special_token_ids(tokenizer_json: str) -> dict[str, int]:
    data = json.loads(tokenizer_json)
    ids = {entry["content"]: entry["id"] for entry in data["added_tokens"]}
    missing = [token for token in SPECIAL_TOKENS if token not in ids]
    if missing:
        raise RuntimeError(f"tokenizer training lost special tokens: {missing}")
    return ids


def _unprintable_token_ids(tokenizer_json: str) -> list[int]:
    """Ids of tokens whose text is not printable ASCII: special tokens and lone high bytes."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    allowed = set(string.printable) - {"\x0b", "\x0c", "\r"}
    banned = []
    for token_id in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if not text or tokenizer.id_to_token(token_id) in SPECIAL_TOKENS or set(text) - allowed:
            banned.append(token_id)
    return banned


def _weights_bytes(spec: TinyModelSpec, vocab_size: int, banned_ids: list[int]) -> bytes:
    """Seeded random weights, plus one deliberate feature: a constant "bias channel".

    Hidden dimension 0 of every token embedding is 1.0, far above the random entries, so it
    survives the residual stream and the final norm as a near-constant (about 1.5 after the
    norm). ``lm_head`` reads it with weight 0 for ordinary tokens and ``BANNED_LOGIT_WEIGHT``
    for ``banned_ids``, which pushes their logits about 100 below the others: output is
    printable ASCII text of exactly ``max_tokens`` tokens, greedy or sampled at any temperature
    the API allows (up to 2), and the model never emits special tokens or end-of-turn on its
    own. Tests rely on that: text comparisons, and long answers that are still running when a
    test cuts them. (A weight of -1, used before, moved the logits by only 1.5: sampled at
    temperature 1, one answer in six ended early on end-of-turn.)
    """
    from safetensors.numpy import save

    rng = np.random.Generator(np.random.PCG64(spec.seed))
    head_dim = spec.hidden_size // spec.num_heads
    kv_width = spec.num_kv_heads * head_dim

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * spec.init_std).astype(np.float32)

    def ones(size: int) -> np.ndarray:
        return np.ones((size,), dtype=np.float32)

    embed = normal(vocab_size, spec.hidden_size)
    embed[:, 0] = 1.0
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": embed}
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.input_layernorm.weight"] = ones(spec.hidden_size)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = ones(spec.hidden_size)
        tensors[f"{prefix}.self_attn.q_proj.weight"] = normal(spec.hidden_size, spec.hidden_size)
        tensors[f"{prefix}.self_attn.k_proj.weight"] = normal(kv_width, spec.hidden_size)
        tensors[f"{prefix}.self_attn.v_proj.weight"] = normal(kv_width, spec.hidden_size)
        tensors[f"{prefix}.self_attn.o_proj.weight"] = normal(spec.hidden_size, spec.hidden_size)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = normal(spec.intermediate_size, spec.hidden_size)
        tensors[f"{prefix}.mlp.up_proj.weight"] = normal(spec.intermediate_size, spec.hidden_size)
        tensors[f"{prefix}.mlp.down_proj.weight"] = normal(spec.hidden_size, spec.intermediate_size)
    tensors["model.norm.weight"] = ones(spec.hidden_size)
    lm_head = normal(vocab_size, spec.hidden_size)
    lm_head[:, 0] = 0.0
    lm_head[banned_ids, 0] = BANNED_LOGIT_WEIGHT
    tensors["lm_head.weight"] = lm_head
    return bytes(save(tensors, metadata={"format": "pt"}))


def _json_bytes(value: object) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
