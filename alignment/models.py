"""Building and loading policies: the built-in tiny GPT-2 and a user's own local model directory.

Every later stage loads a policy with ``load_policy(path)`` exactly as it would load any
Hugging Face checkpoint: the tiny model is saved with ``save_pretrained`` (safetensors).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from alignment.tokenizer import build_char_tokenizer


def build_tiny_gpt2(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    n_layer: int = 2,
    n_embd: int = 96,
    n_head: int = 4,
    n_positions: int = 64,
    seed: int = 0,
) -> Path:
    """Build a randomly initialised GPT-2 with a character tokenizer over ``texts`` and save it."""
    tokenizer = build_char_tokenizer(texts)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer of a local model directory (pad = eos when it has none); never reaches a model hub."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"No model at {path}: the directory needs a config.json (save the model with save_pretrained)."
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path: str | Path, *, trust_remote_code: bool = False, device: str | None = None):
    """Load ``(model, tokenizer)`` from a local directory; never reaches a model hub."""
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    model.to(device or default_device())
    model.eval()
    return model, tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
