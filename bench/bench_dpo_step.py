"""One DPO training step, ours (alignment.losses + alignment.logprobs) against TRL's DPOTrainer.

Both sides start from the same tiny GPT-2 policy, use the same frozen reference model (a second tiny
GPT-2, so that the loss is not trivially log 2), the same batch of (prompt, chosen, rejected) pairs,
the same β, precomputed reference log-probs, dropout off, float32 and the same torch AdamW. The
script first checks that the loss and every gradient of step 1 agree to 1e-5, then times steps
(forward + DPO loss + backward + AdamW update), alternating between the two sides so that machine
noise hits both alike, and prints the median step times, their ratio and the loss after the updates.

Run on a laptop:   .venv/bin/python bench/bench_dpo_step.py
Run on a GPU node: .venv/bin/python bench/bench_dpo_step.py --pairs 64 --n-layer 4 --n-embd 256
Needs ``trl`` (``pip install trl --no-deps datasets``); without it the script says so and compares
against a direct transcription of the DPO loss (seed 004 l.877) instead.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from alignment.logprobs import batch_logps, sequence_logps
from alignment.losses import LossInputs, compute_loss
from alignment.models import build_tiny_gpt2, load_policy
from alignment.training import collate, encode_pairs

TOLERANCE = 1e-5


def make_pairs(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """Arithmetic prompts ``b+a=`` with the right answer as chosen and a wrong one as rejected."""
    rng = random.Random(seed)
    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        a, b = rng.randrange(100), rng.randrange(10)
        prompts.append(f"{a}+{b}=")
        chosen.append(str(a + b))
        rejected.append(str(a + b + rng.choice([-10, -1, 1, 10, 11])))
    return prompts, chosen, rejected


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@dataclass
class Side:
    """One implementation: ``forward_backward()`` leaves gradients on ``model`` and returns the loss."""

    name: str
    model: torch.nn.Module
    ref_logps: torch.Tensor  # [chosen..., rejected...] as precomputed by this side
    forward_backward: Callable[[], float]
    lr: float
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr)

    def step(self) -> float:
        loss = self.forward_backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def gradients(self) -> tuple[float, dict[str, torch.Tensor]]:
        """Loss and gradients of one forward/backward, without updating the weights."""
        loss = self.forward_backward()
        grads = {name: p.grad.detach().clone() for name, p in self.model.named_parameters()}
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grads


def ours_side(policy_path: Path, ref_model, pairs, beta: float, lr: float, workdir: Path) -> Side:
    """Our pieces: ``sequence_logps`` for the reference, then ``batch_logps`` + ``LOSSES["dpo"]``."""
    model, tok = load_policy(policy_path)
    no_dropout(model).train()
    prompts, chosen, rejected = pairs
    ref_c, _ = sequence_logps(ref_model, tok, prompts, chosen, batch_size=len(prompts))
    ref_r, _ = sequence_logps(ref_model, tok, prompts, rejected, batch_size=len(prompts))
    examples = encode_pairs(tok, prompts, chosen) + encode_pairs(tok, prompts, rejected)
    batch = {k: v.to(model.device) for k, v in collate(examples, tok.pad_token_id).items()}
    ref_c, ref_r = ref_c.to(model.device), ref_r.to(model.device)

    def forward_backward() -> float:
        logps, lengths = batch_logps(model, batch)
        inputs = LossInputs(*logps.chunk(2), ref_c, ref_r, *lengths.chunk(2))
        loss = compute_loss("dpo", inputs, beta=beta).mean()
        loss.backward()
        return loss.item()

    return Side("ours", model, torch.cat([ref_c, ref_r]).cpu(), forward_backward, lr)


def trl_side(policy_path: Path, ref_model, pairs, beta: float, lr: float, workdir: Path) -> Side:
    """TRL's path: ``DPOTrainer`` tokenizes and precomputes the reference; ``training_step`` does the rest."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, __version__

    model, tok = load_policy(policy_path)
    prompts, chosen, rejected = pairs
    args = DPOConfig(
        output_dir=str(workdir / "trl"), beta=beta, learning_rate=lr, loss_type=["sigmoid"],
        per_device_train_batch_size=len(prompts), precompute_ref_log_probs=True, disable_dropout=True,
        bf16=False,  # TRL defaults to bf16 autocast, on CPU too; compare in float32
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    data = Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected})
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this bench bypasses
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(prompts))])
    batch = {k: v.to(model.device) for k, v in batch.items()}
    ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).cpu()
    return Side(f"TRL {__version__} DPOTrainer", trainer.model, ref,
                lambda: trainer.training_step(trainer.model, batch).item(), lr)  # fmt: skip


def direct_side(policy_path: Path, ref_model, pairs, beta: float, lr: float, workdir: Path) -> Side:
    """Fallback peer: DPO written out with log_softmax + gather, as in the paper (seed 004 l.877)."""
    model, tok = load_policy(policy_path)
    no_dropout(model).train()
    prompts, chosen, rejected = pairs
    examples = encode_pairs(tok, prompts, chosen) + encode_pairs(tok, prompts, rejected)
    batch = {k: v.to(model.device) for k, v in collate(examples, tok.pad_token_id).items()}

    def logps(m):
        logp = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].log_softmax(-1)
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        return (logp.gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)

    with torch.no_grad():
        ref = logps(ref_model)

    def forward_backward() -> float:
        pol_c, pol_r = logps(model).chunk(2)
        ref_c, ref_r = ref.chunk(2)
        loss = -F.logsigmoid(beta * ((pol_c - ref_c) - (pol_r - ref_r))).mean()
        loss.backward()
        return loss.item()

    return Side("direct DPO transcription", model, ref.cpu(), forward_backward, lr)


def timed(step: Callable[[], float]) -> tuple[float, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = step()  # .item() synchronises the device
    return loss, time.perf_counter() - start


def quiet() -> None:
    """Silence progress bars and deprecation chatter so the table is readable."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16, help="pairs in the batch")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per side (after 2 warm-up steps)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=96)
    args = parser.parse_args()
    quiet()

    workdir = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    pairs = make_pairs(args.pairs, seed=0)
    size = {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": 4}
    texts = ["0123456789+="]
    policy_path = build_tiny_gpt2(texts, workdir / "policy", seed=1, **size)
    ref_model, _ = load_policy(build_tiny_gpt2(texts, workdir / "ref", seed=0, **size))
    no_dropout(ref_model).eval()
    setup = (policy_path, ref_model, pairs, args.beta, args.lr, workdir)

    mine = ours_side(*setup)
    try:
        peer = trl_side(*setup)
    except (ImportError, RuntimeError) as exc:  # TRL's lazy imports raise RuntimeError when a dependency is off
        print(f"TRL cannot run here ({exc}); comparing against a direct DPO transcription instead.")
        peer = direct_side(*setup)

    # The DPO step itself, before any update: same loss, same gradient.
    (loss_a, grads_a), (loss_b, grads_b) = mine.gradients(), peer.gradients()
    grad_diff = max((grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a)
    grad_scale = max(g.abs().max().item() for g in grads_a.values())

    losses_a, losses_b, times_a, times_b = [], [], [], []
    for i in range(args.steps + 2):
        (a, ta), (b, tb) = timed(mine.step), timed(peer.step)
        losses_a.append(a)
        losses_b.append(b)
        if i >= 2:  # warm-up steps are not timed
            times_a.append(ta)
            times_b.append(tb)

    t_a, t_b = statistics.median(times_a), statistics.median(times_b)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nDPO step: {args.pairs} pairs, beta={args.beta}, GPT-2 {args.n_layer}x{args.n_embd}, {device}")
    print(f"peer: {peer.name}; median of {args.steps} timed steps each\n")
    row("", "ours", "peer", "|diff|")
    row("reference logps (max)", "", "", f"{(mine.ref_logps - peer.ref_logps).abs().max().item():.2e}")
    row("loss, step 1", f"{loss_a:.7f}", f"{loss_b:.7f}", f"{abs(loss_a - loss_b):.2e}")
    row("gradient, step 1 (max)", f"|g|<={grad_scale:.2e}", "", f"{grad_diff:.2e}")
    n = len(losses_a)
    drift = abs(losses_a[-1] - losses_b[-1])
    row(f"loss after {n} updates", f"{losses_a[-1]:.7f}", f"{losses_b[-1]:.7f}", f"{drift:.2e}")
    row("step time (ms)", f"{t_a * 1e3:.2f}", f"{t_b * 1e3:.2f}", "")
    row("time ratio ours/peer", f"{t_a / t_b:.3f}", "", "")
    if abs(loss_a - loss_b) > TOLERANCE or grad_diff > TOLERANCE:
        raise SystemExit(f"FAIL: step 1 loss or gradient differs by more than {TOLERANCE}.")
    print(f"\nstep 1 loss and gradient agree within {TOLERANCE}; ours is {'no slower' if t_a <= t_b else 'slower'}.")
    print(json.dumps({
        "bench": "dpo_step", "ratio": round(t_a / t_b, 3), "ratio_means": "ours/peer seconds per DPO step",
        "target": "<=1", "peer": peer.name, "loss_diff_step1": abs(loss_a - loss_b), "grad_diff_step1": grad_diff,
        "ours_ms": round(t_a * 1e3, 2), "peer_ms": round(t_b * 1e3, 2),
    }))


def row(label: str, ours: str, peer: str, diff: str) -> None:
    print(f"{label:26}{ours:>16}{peer:>14}{diff:>12}")


if __name__ == "__main__":
    main()
