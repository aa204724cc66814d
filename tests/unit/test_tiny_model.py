"""The tiny model: byte-identical builds, a working byte-level tokenizer and chat template."""

from __future__ import annotations

import json
from pathlib import Path

from zumik_serve.model.tiny import (
    BOS_TOKEN,
    MODEL_FILES,
    build_tiny_model,
    fingerprint_model_dir,
    is_model_dir,
)


def test_two_builds_are_byte_identical(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a")
    second = build_tiny_model(tmp_path / "b")
    for name in MODEL_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert fingerprint_model_dir(first) == fingerprint_model_dir(second)


def test_rebuild_in_place_keeps_fingerprint(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "m")
    before = fingerprint_model_dir(out)
    build_tiny_model(out)
    assert fingerprint_model_dir(out) == before
    assert is_model_dir(out)
    assert not any(path.name.startswith(".") for path in out.iterdir())  # no temp files left


def test_config_matches_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    out = build_tiny_model(tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert config["vocab_size"] == tokenizer.get_vocab_size()
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_tokenizer_round_trips_any_text(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(build_tiny_model(tmp_path / "m") / "tokenizer.json"))
    text = 'Zumik façade — 東京 ✓ {"json": [1, 2]}\n\ttabs'
    encoding = tokenizer.encode(text)
    assert encoding.tokens[0] == BOS_TOKEN
    assert tokenizer.decode(encoding.ids) == text


def test_chat_template_renders_roles_and_generation_prompt(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(build_tiny_model(tmp_path / "m")))
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
