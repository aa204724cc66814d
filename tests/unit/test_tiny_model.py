"""The tiny model: byte-identical builds, a working byte-level tokenizer and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from zumik_serve.model.tiny import (
    BOS_TOKEN,
    MODEL_FILES,
    SPECIAL_TOKENS,
    TINY_B_SPEC,
    TINY_WIDE_SPEC,
    TinyModelSpec,
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


def test_a_folder_built_by_an_older_zumik_is_brought_up_to_date_file_by_file(tmp_path: Path) -> None:
    out = build_tiny_model(tmp_path / "m")
    current = fingerprint_model_dir(out)
    (out / "model.safetensors").write_bytes(b"weights of an older build")
    kept = {name: (out / name).stat().st_ino for name in MODEL_FILES if name != "model.safetensors"}
    build_tiny_model(out)
    assert fingerprint_model_dir(out) == current
    assert {name: (out / name).stat().st_ino for name in kept} == kept  # the current files stay


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


@pytest.mark.parametrize(
    "spec", [TinyModelSpec(), TINY_B_SPEC, TINY_WIDE_SPEC], ids=["tiny", "tiny-b", "tiny-wide"]
)
def test_sampling_at_temperature_2_never_reaches_a_banned_token(tmp_path: Path, spec: TinyModelSpec) -> None:
    """Special tokens (end-of-turn included) and unprintable ones stay out of reach at every
    position of a long answer, sampled at the API's highest temperature: long answers in the
    tests run to ``max_tokens`` and are still running when a test cuts them."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    folder = build_tiny_model(tmp_path / "m", spec)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    printable = set("\t\n") | {chr(c) for c in range(32, 127)}
    allowed = np.array(
        [
            i
            for i in range(vocab)
            if tokenizer.id_to_token(i) not in SPECIAL_TOKENS
            and (text := tokenizer.decode([i], skip_special_tokens=False))
            and set(text) <= printable
        ]
    )
    banned = np.setdiff1d(np.arange(vocab), allowed)
    assert tokenizer.token_to_id("<|end|>") in banned and len(banned) > 100
    # A long answer of allowed tokens after a chat prompt, as a sampled answer would be.
    prompt = tokenizer.encode("<|bos|><|user|>\nWrite a very long story.<|end|>\n<|assistant|>\n").ids
    answer = np.random.default_rng(7).choice(allowed, size=1500).tolist()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer])).logits[0] / 2.0  # temperature 2
    log_probs = torch.log_softmax(logits, dim=-1)
    worst = torch.logsumexp(log_probs[:, torch.from_numpy(banned)], dim=-1).max().item()
    assert worst < np.log(1e-12), f"a banned token has probability {np.exp(worst):.2e} at some position"


def test_the_cli_says_whether_it_built_updated_or_left_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from zumik_serve.cli import main

    def run() -> dict[str, object]:
        assert main(["model", "tiny", "--out", str(tmp_path / "m"), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    first = run()
    assert first["changed"] is True
    assert run() == first | {"changed": False}  # current: nothing written
    (tmp_path / "m" / "model.safetensors").write_bytes(b"an older build")
    assert run() == first  # replaced
