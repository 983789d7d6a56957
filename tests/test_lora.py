"""LoRA for SFT: adapters train, are merged, and the checkpoint loads as a plain model."""

from __future__ import annotations

import torch

from alignment.models import load_policy
from alignment.training import TrainConfig, sft


def test_lora_sft_changes_only_adapted_weights_and_saves_a_plain_model(tiny_model_dir, tmp_path):
    prompts, completions = ["1+2=", "3+4=", "5+1="] * 4, ["3", "7", "6"] * 4
    out = tmp_path / "lora"
    sft(tiny_model_dir, out, prompts, completions, TrainConfig(epochs=2, lr=1e-2, batch_size=4, lora_r=4), progress=False)
    base, _ = load_policy(tiny_model_dir)
    tuned, _ = load_policy(out)
    assert type(tuned).__name__ == "LlamaForCausalLM"  # merged: no peft wrapper, no adapter weights
    before, after = dict(base.named_parameters()), dict(tuned.named_parameters())
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # Only the linear projections LoRA targets move; embeddings and norms stay frozen.
    assert changed and all(name.endswith("_proj.weight") for name in changed), changed
