"""LoRA adapters (peft) for SFT and preference training, merged back before saving.

A checkpoint written with LoRA is a plain Hugging Face model, so every later stage — and
``models:/NAME@champion`` — loads it without peft.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def add_lora(model, r: int, *, alpha: float = 16.0, dropout: float = 0.0, targets: Sequence[str] = ()):
    """Wrap ``model`` with rank-``r`` LoRA adapters (``c_attn`` for GPT-2, every linear layer otherwise)."""
    from peft import LoraConfig, get_peft_model

    gpt2 = model.config.model_type == "gpt2"
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets) or (["c_attn"] if gpt2 else "all-linear"),
        fan_in_fan_out=gpt2,  # GPT-2's Conv1D stores weights transposed
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_merged(model, tokenizer, out_dir: str | Path) -> None:
    """Save as a plain Hugging Face model: LoRA adapters are merged into the weights first."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
