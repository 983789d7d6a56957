"""The ``gpu`` tier: the real-model path on CUDA (skipped without a GPU; ``pytest -m gpu`` on a GPU host).

The Llama fixture of tests/real_models.py (ByteLevel BPE, ChatML, two end ids) samples with the
transformers sampler on CUDA in bfloat16 and trains under bf16 autocast; greedy completions on the
GPU equal what transformers alone gives there, and training lowers the loss.
"""

from __future__ import annotations

import pytest
import torch

from tests.real_models import build, sums, transformers_alone

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build(tmp_path_factory.mktemp("gpu") / "llama", "llama")


def test_bf16_sampling_on_cuda_stops_at_both_end_ids(llama):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from alignment.samplers import SamplingParams
    from alignment.samplers.hf import TransformersSampler

    prompts = [p for p, _ in sums(16, seed=3)]
    sampler = TransformersSampler(str(llama), device="cuda", dtype="bfloat16", progress=False)
    assert sampler.model.dtype == torch.bfloat16 and sampler.model.device.type == "cuda"
    out = sampler.generate(prompts, 4, SamplingParams(1.0, 1.0, 8, seed=0))
    assert {r for row in out.finish_reasons for r in row} <= {"stop", "length"}
    assert not any("<|" in t for row in out.completions for t in row)
    greedy = TransformersSampler(str(llama), device="cuda", progress=False).generate(prompts, 1, SamplingParams(0.0, 1.0, 8))
    assert [c[0] for c in greedy.completions] == transformers_alone(llama, prompts, 8)  # float32 on both sides


def test_bf16_training_on_cuda_lowers_the_loss(llama, tmp_path):
    from alignment.training import TrainConfig, sft

    data = sums(64, seed=4)
    steps: list[float] = []
    sft(llama, tmp_path / "out", [p for p, _ in data], [a for _, a in data],
        TrainConfig(epochs=3, lr=3e-3, batch_size=16, micro_batch_size=8, dtype="bfloat16", gradient_checkpointing=True),
        progress=False, on_step=lambda s, loss: steps.append(loss))
    assert steps[-1] < steps[0]
