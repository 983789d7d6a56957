"""Building and loading policies: the built-in tiny model and a user's own local model directory.

The built-in model has the shape of the instruct models people bring — Llama architecture, a chat
template, an end-of-turn id distinct from EOS and padding, both listed in ``generation_config`` —
with a character vocabulary so it learns the toy task in seconds. Every later stage loads a policy
with ``load_policy(path)`` exactly as it would load any Hugging Face checkpoint (safetensors).
"""

from __future__ import annotations

import os

from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from alignment.errors import ConfigError
from alignment.tokenizer import END, IM_END, build_bpe_tokenizer, build_char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_tiny_model(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    arch: str = "llama",
    tokenizer: str = "char",
    vocab_size: int = 512,
    n_layer: int = 2,
    n_embd: int = 96,
    n_head: int = 4,
    n_positions: int = 64,
    seed: int = 0,
) -> Path:
    """Build a randomly initialised ``llama`` (or ``gpt2``) over ``texts`` and save it.

    ``tokenizer="char"``: one token per character, a compact chat template; ``"bpe"``: byte-level BPE
    of ``vocab_size`` trained on ``texts``, with ChatML. Either way the end-of-turn token differs from
    EOS and padding, and ``generation_config`` lists both end ids.
    """
    if tokenizer == "char":
        tokenizer, end_token = build_char_tokenizer(texts), END
    elif tokenizer == "bpe":
        tokenizer, end_token = build_bpe_tokenizer(texts, vocab_size), IM_END
    else:
        raise ValueError(f"tokenizer must be 'char' or 'bpe', got {tokenizer!r}.")
    end, eos, pad = tokenizer.convert_tokens_to_ids(end_token), tokenizer.eos_token_id, tokenizer.pad_token_id
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=n_embd, intermediate_size=4 * n_embd, num_hidden_layers=n_layer,
            num_attention_heads=n_head, num_key_value_heads=n_head, max_position_embeddings=n_positions,
            tie_word_embeddings=True, bos_token_id=None, eos_token_id=[end, eos], pad_token_id=pad,
        )
        model_cls = LlamaForCausalLM
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
        )
        model_cls = GPT2LMHeadModel
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}.")
    tokenizer.model_max_length = n_positions
    torch.manual_seed(seed)
    model = model_cls(config)
    model.generation_config = GenerationConfig(eos_token_id=[end, eos], pad_token_id=pad)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_gpt2(texts: Iterable[str], out_dir: str | Path, **kwargs) -> Path:
    """The tiny model with GPT-2's architecture (learned positions) instead of Llama's."""
    return build_tiny_model(texts, out_dir, arch="gpt2", **kwargs)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer of a local model directory (pad = eos when it has none); never reaches a model hub."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ConfigError(
            f"No model at {path}: the directory needs a config.json (save the model with save_pretrained)."
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    path: str | Path, *, trust_remote_code: bool = False, device: str | None = None, dtype: str = "float32"
):
    """Load ``(model, tokenizer)`` from a local directory in ``dtype``; never reaches a model hub.

    The weights are loaded in the dtype asked for, whatever the checkpoint was saved in: a bf16
    checkpoint trains in float32 unless the recipe says bfloat16.
    """
    device = device or default_device()
    torch_dtype = check_dtype(dtype, device)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, local_files_only=True, dtype=torch_dtype
        )
    except OSError as exc:
        raise ConfigError(
            f"Could not load the model at {path} ({str(exc).splitlines()[0]}); point model.path at a "
            "save_pretrained directory with its weights (model.safetensors or pytorch_model.bin)."
        ) from None
    model.to(device)
    model.eval()
    return model, tokenizer


def check_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """The torch dtype named ``dtype``, or one sentence when this device cannot use it."""
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype is {dtype!r}; use one of {', '.join(DTYPES)}.")
    kind = torch.device(device).type
    if dtype == "float16" and kind == "cpu":
        raise ConfigError("model.dtype float16 needs a GPU; on the CPU use float32 or bfloat16.")
    if dtype == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("This GPU does not support bfloat16; set model.dtype to float16 or float32.")
    return DTYPES[dtype]


def default_device() -> str:
    """The GPU when there is one (a distributed rank's own, ``LOCAL_RANK``), else the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{rank}" if rank is not None else "cuda"
