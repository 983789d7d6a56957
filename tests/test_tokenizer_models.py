"""The character tokenizer round-trips text exactly; the tiny model saves as safetensors and reloads."""

from __future__ import annotations

import json

import pytest
import torch

from alignment.errors import UserError
from alignment.models import build_tiny_gpt2, build_tiny_model, load_policy
from alignment.prompting import Formatter
from alignment.tokenizer import ASSISTANT, END, EOS, PAD, SYSTEM, UNK, USER, build_char_tokenizer

SPECIALS = [PAD, EOS, UNK, SYSTEM, USER, ASSISTANT, END]

CORPUS = ["12+3=", "15", "hello world", "two\nlines", "tab\there", "  lead and trail  ", "a=b>c"]

ROUND_TRIP = [
    "12+3=15",
    "hello world",
    " ",
    "   ",
    "\n",
    "two\nlines\n",
    "\n\nhello\n world \n",
    "tab\there\t",
    "  lead and trail  ",
    "a b=c>d",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(CORPUS)


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_decode_encode_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text), "one token per character"
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocabulary_is_special_tokens_then_sorted_characters(tokenizer):
    chars = sorted({c for text in CORPUS for c in text})
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in SPECIALS] == list(range(len(SPECIALS)))
    assert [vocab[c] for c in chars] == list(range(len(SPECIALS), len(SPECIALS) + len(chars)))
    assert len(tokenizer) == len(SPECIALS) + len(chars)
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert tokenizer.padding_side == "left"


def test_special_tokens_are_dropped_on_decode_and_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer("12", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode([tokenizer.pad_token_id, *ids, tokenizer.eos_token_id], skip_special_tokens=True) == "12"
    assert tokenizer("1Z2", add_special_tokens=False)["input_ids"] == [ids[0], tokenizer.unk_token_id, ids[1]]


def test_left_padding_puts_pads_before_the_text(tokenizer):
    enc = tokenizer(["1", "123"], padding=True)
    assert enc["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2
    assert enc["attention_mask"] == [[0, 0, 1], [1, 1, 1]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_gpt2(CORPUS, tmp_path_factory.mktemp("tiny"), n_layer=1, n_embd=16, n_head=2, n_positions=32)


def test_tiny_model_saves_as_safetensors(tiny_dir):
    names = {p.name for p in tiny_dir.iterdir()}
    assert "model.safetensors" in names
    assert "config.json" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"], config["n_positions"]) == (1, 16, 2, 32)
    assert config["vocab_size"] == len(SPECIALS) + len({c for text in CORPUS for c in text})


def test_load_policy_reloads_weights_and_tokenizer(tiny_dir):
    model, tok = load_policy(tiny_dir, device="cpu")
    again, _ = load_policy(tiny_dir, device="cpu")
    assert not model.training
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # The tokenizer's decoder survives save_pretrained: the reloaded one still round-trips exactly.
    for text in ROUND_TRIP:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.padding_side == "left"
    ids = torch.tensor([tok("12+3=", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_same_seed_same_weights_different_seed_different(tmp_path):
    a = build_tiny_gpt2(CORPUS, tmp_path / "a", n_layer=1, n_embd=16, n_head=2, seed=3)
    b = build_tiny_gpt2(CORPUS, tmp_path / "b", n_layer=1, n_embd=16, n_head=2, seed=3)
    c = build_tiny_gpt2(CORPUS, tmp_path / "c", n_layer=1, n_embd=16, n_head=2, seed=4)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_model_dir_without_config_json_is_a_clear_error(tiny_dir, tmp_path):
    user_dir = tmp_path / "my-model"
    user_dir.mkdir()
    (user_dir / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(UserError) as err:
        load_policy(user_dir)
    message = str(err.value)
    assert str(user_dir) in message and "config.json" in message and "save_pretrained" in message
    assert message.count(". ") == 0 and message.endswith(".")
    with pytest.raises(UserError, match="config.json"):
        load_policy(tmp_path / "does-not-exist")


def test_built_in_model_has_the_shape_of_an_instruct_model(tmp_path):
    """Llama, a chat template, an end-of-turn id that is neither EOS nor pad, both end ids in generation_config."""
    path = build_tiny_model(CORPUS, tmp_path / "llama", n_layer=1, n_embd=16, n_head=2, n_positions=32)
    model, tok = load_policy(path, device="cpu")
    assert model.config.model_type == "llama"
    end = tok.convert_tokens_to_ids(END)
    assert end not in (tok.eos_token_id, tok.pad_token_id)
    assert list(model.generation_config.eos_token_id) == [end, tok.eos_token_id]
    assert tok.apply_chat_template([{"role": "user", "content": "12+3="}], add_generation_prompt=True, tokenize=False) == (
        f"{USER}12+3={END}{ASSISTANT}"
    )
    f = Formatter(tok, None, model_config=model.config, generation_config=model.generation_config)
    assert f.chat and f.end_id == end and set(f.end_ids) == {end, tok.eos_token_id} and f.max_length == 32
    ids, labels = f.example("12+3=", "15")
    assert tok.decode(ids) == f"{USER}12+3={END}{ASSISTANT}15{END}"
    assert tok.decode([t for t in labels if t != -100]) == f"15{END}"


def test_model_dir_without_weights_is_a_clear_error(tiny_dir, tmp_path):
    user_dir = tmp_path / "no-weights"
    user_dir.mkdir()
    (user_dir / "config.json").write_text((tiny_dir / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (user_dir / name).write_text((tiny_dir / name).read_text())
    with pytest.raises(UserError, match="weights"):
        load_policy(user_dir)
