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


def test_fsdp_bf16_training_on_cuda_through_the_stage_launcher(llama, tmp_path, monkeypatch):
    """FSDP2 with bf16 compute over float32 master weights (MixedPrecisionPolicy) on CUDA, as a training stage
    runs it: one rank per GPU (two where the node has two), NCCL, rank 0 saving a plain folder that loads."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from types import SimpleNamespace

    from alignment.models import load_policy
    from tasks.launch import run_ranks
    from tests import distributed_bodies as bodies
    from tests.flywheel_helpers import ROOT

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    processes = min(2, torch.cuda.device_count())
    world = SimpleNamespace(
        distributed=SimpleNamespace(strategy="fsdp", processes=processes, nodes=1, launcher="torchrun", timeout_s=300),
        orchestration=SimpleNamespace(ray_address=None),
    )
    pairs = sums(64, seed=5)
    settings = {"epochs": 3, "lr": 1e-3, "batch_size": 16, "micro_batch_size": 8, "warmup_steps": 0, "seed": 0,
                "dtype": "bfloat16", "strategy": "fsdp"}
    losses = run_ranks(world, "gpu", "train", bodies.sft_losses, str(llama), str(tmp_path / "out"),
                       [p for p, _ in pairs], [c for _, c in pairs], settings)
    assert losses[-1] < losses[0]
    model, _ = load_policy(tmp_path / "out", device="cuda")
    assert next(model.parameters()).dtype == torch.float32  # master weights saved in float32
