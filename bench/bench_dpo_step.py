"""One DPO training step, ours (alignment.losses + alignment.logprobs) against TRL's DPOTrainer.

Both sides start from the same policy — the bench Llama (``bench/realistic.py``: 8 layers, 512 wide,
BPE + ChatML, about 38M parameters) — with the same frozen reference model (a second one, differently
seeded, so that the loss is not trivially log 2), the same batch of (prompt, chosen, rejected) pairs
(prompts of 50-200 tokens templated, answers of 64-128 tokens), the same beta, precomputed reference
log-probs, dropout off, float32 and the same torch AdamW. Our step is ``train_preference``'s: the
chosen rows followed by the rejected rows, collated together, through ``batch_logps`` (which runs
them in groups of similar length, without their padding, and keeps only the logits that predict a
completion token), summed completion log-probs, ``compute_loss("dpo")``. The script first checks
that the loss and every gradient of step 1 agree to 1e-5, then times steps (forward + DPO loss +
backward + AdamW update), alternating between the two sides so that machine noise hits both alike,
and prints the median step times, their ratio and the loss after the updates.

Run on a laptop:   .venv/bin/python bench/bench_dpo_step.py
Run on a GPU node: .venv/bin/python bench/bench_dpo_step.py --pairs 64 --steps 12
Needs ``trl`` (the ``bench`` extra); without it the script says so and compares against a direct
transcription of the DPO loss (arXiv 2305.18290, Eq. 7) instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_sampler.py

import argparse  # noqa: E402
import json  # noqa: E402
import statistics
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from realistic import build_bench_model, completions, prompts  # noqa: E402

from alignment.logprobs import batch_logps, sequence_logps  # noqa: E402
from alignment.losses import LossInputs, compute_loss  # noqa: E402
from alignment.models import load_policy, load_tokenizer  # noqa: E402
from alignment.prompting import PromptFormat  # noqa: E402
from alignment.training import collate, encode_pairs  # noqa: E402

TOLERANCE = 1e-5
RAW = PromptFormat(format="raw")


def make_pairs(tokenizer, n: int) -> tuple[list[str], list[str], list[str]]:
    """``n`` prompts of 50-200 tokens, with two different answers of 64-128 tokens each.

    The prompts are rendered with the chat template here and both sides take them as raw text (ours:
    ``PromptFormat("raw")``; TRL: a standard, not conversational, data set, to which it appends EOS), so
    the two tokenise to the same ids: TRL's conversational path would also train the newline the
    ChatML template writes after ``<|im_end|>``.
    """
    lengths = [64 + 64 * i // max(1, n - 1) for i in range(n)]
    chosen = [completions(tokenizer, 1, k, seed=10 + i)[0] for i, k in enumerate(lengths)]
    rejected = [completions(tokenizer, 1, k, seed=1000 + i)[0] for i, k in enumerate(reversed(lengths))]
    chat = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts(tokenizer, n)
    ]
    return chat, chosen, rejected


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


def first_step_agreement(mine: Side, peer: Side) -> tuple[float, float, float, float]:
    """Both sides' loss on the same batch before any update, the largest gradient difference, and the
    largest gradient (the scale the difference is read against)."""
    (loss_a, grads_a), (loss_b, grads_b) = mine.gradients(), peer.gradients()
    grad_diff = max((grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a)
    return loss_a, loss_b, grad_diff, max(g.abs().max().item() for g in grads_a.values())


def ours_side(policy_path: Path, ref_model, pairs, beta: float, lr: float, workdir: Path) -> Side:
    """Our pieces: ``sequence_logps`` for the reference, then ``batch_logps`` + ``LOSSES["dpo"]``."""
    model, tok = load_policy(policy_path)
    no_dropout(model).train()
    prompts, chosen, rejected = pairs
    ref_c, _ = sequence_logps(ref_model, tok, prompts, chosen, batch_size=len(prompts), prompt=RAW)
    ref_r, _ = sequence_logps(ref_model, tok, prompts, rejected, batch_size=len(prompts), prompt=RAW)
    # As train_preference's step: chosen rows then rejected rows, collated into one batch.
    examples = encode_pairs(tok, prompts, chosen, RAW) + encode_pairs(tok, prompts, rejected, RAW)
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
    """Fallback peer: DPO written out with log_softmax + gather, as in the paper (arXiv 2305.18290, Eq. 7)."""
    model, tok = load_policy(policy_path)
    no_dropout(model).train()
    prompts, chosen, rejected = pairs
    examples = encode_pairs(tok, prompts, chosen, RAW) + encode_pairs(tok, prompts, rejected, RAW)
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
    parser.add_argument("--pairs", type=int, default=8, help="pairs in the batch")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side (after 2 warm-up steps)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=512)
    args = parser.parse_args()
    quiet()

    workdir = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    size = {"n_layer": args.n_layer, "n_embd": args.n_embd}
    bench_model = build_bench_model(workdir / "policy", seed=1, **size)
    policy_path = bench_model.path
    ref_model, _ = load_policy(build_bench_model(workdir / "ref", seed=0, **size).path)
    pairs = make_pairs(load_tokenizer(policy_path), args.pairs)
    no_dropout(ref_model).eval()
    setup = (policy_path, ref_model, pairs, args.beta, args.lr, workdir)

    mine = ours_side(*setup)
    try:
        peer = trl_side(*setup)
    except (ImportError, RuntimeError) as exc:  # TRL's lazy imports raise RuntimeError when a dependency is off
        print(f"TRL cannot run here ({exc}); comparing against a direct DPO transcription instead.")
        peer = direct_side(*setup)

    # The DPO step itself, before any update: same loss, same gradient.
    loss_a, loss_b, grad_diff, grad_scale = first_step_agreement(mine, peer)

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
    print(f"\nDPO step: {args.pairs} pairs, beta={args.beta}, {bench_model.shape} ({bench_model.params / 1e6:.1f}M params), {device}")
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
        "ours_ms": round(t_a * 1e3, 2), "peer_ms": round(t_b * 1e3, 2), "model_params": bench_model.params,
        "model": bench_model.shape, "pairs": args.pairs, "ours_step_ms": [round(t * 1e3, 1) for t in times_a],
        "peer_step_ms": [round(t * 1e3, 1) for t in times_b], "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }))


def row(label: str, ours: str, peer: str, diff: str) -> None:
    print(f"{label:26}{ours:>16}{peer:>14}{diff:>12}")


if __name__ == "__main__":
    main()
