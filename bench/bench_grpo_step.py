"""One GRPO optimisation step, ours (``alignment.losses.grpo``) against TRL's GRPOTrainer loss step.

The step of DeepSeekMath's Algorithm 1 (arXiv 2402.03300) with μ = 1: 16 prompts, G = 8 completions
each, group-relative advantages, then one update of the clipped surrogate of Eq. 3 with the k3 KL
against a reference. Both sides start from the same policy, a Llama of ``bench/realistic.py``
(4 layers, 384 wide, BPE + ChatML: about 12.6M parameters by default), take the same batch (prompts of
32-128 tokens templated, left-padded, each repeated G times; completions of 32-64 tokens ending in
``<|im_end|>``, right-padded), the same advantages (``group_advantages`` of seeded rewards), the same
ε and β, a reference model's per-token log-probs precomputed once by each side (a second, differently
seeded model, so that the KL term is not zero), float32, dropout off and the same torch AdamW.

With μ = 1, π_old is the policy itself: both sides take ``old = logps.detach()`` (TRL does so when
``num_iterations == 1``), so ρ = 1 in value and only its gradient acts.

- ours: the policy's forward with ``logits_to_keep`` (logits only for the completion positions), a fused
  cross-entropy for the per-token log-probs (as ``alignment.logprobs`` does for summed ones), then
  ``grpo(..., loss_agg="sequence")``;
- TRL: ``GRPOTrainer._compute_loss`` with ``loss_type="grpo"``, ``use_bias_correction_kl=False`` (Eq. 3's
  KL; TRL's default multiplies it by ρ), its fused LM head and its own metrics, as its training step
  runs it after generation.

The script first checks that the loss and every gradient of step 1 agree to 1e-5, then times steps
(forward + loss + backward + AdamW update), alternating the sides so that machine noise hits both alike,
and prints the median step times and their ratio.

Run on a laptop:   .venv/bin/python bench/bench_grpo_step.py
Run on a GPU node: .venv/bin/python bench/bench_grpo_step.py --n-layer 8 --n-embd 512 --steps 10
A quick check that it runs: .venv/bin/python bench/bench_grpo_step.py --prompts 2 --group 2 --n-layer 1 --n-embd 64 --steps 1
Needs ``trl`` (the ``bench`` extra); without it the script says so and compares against a direct
transcription of Eq. 3 on full logits instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_sampler.py

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_dpo_step import Side, first_step_agreement, no_dropout, quiet, row, timed  # noqa: E402
from realistic import build_bench_model, completions, prompts  # noqa: E402

from alignment.losses import group_advantages, grpo  # noqa: E402
from alignment.models import load_policy, load_tokenizer  # noqa: E402

TOLERANCE = 1e-5


def make_batch(tokenizer, n_prompts: int, group: int, prompt_tokens: tuple[int, int],
               completion_tokens: tuple[int, int]) -> dict[str, torch.Tensor]:  # fmt: skip
    """TRL's layout: left-padded prompt ids (each prompt ``group`` times), right-padded completion ids,
    their masks, and the advantages of seeded rewards within each prompt's group."""
    lo, hi = prompt_tokens
    chat = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts(tokenizer, n_prompts, min_tokens=lo, max_tokens=hi)
    ]
    prompt_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chat for _ in range(group)]
    rows, (lo, hi) = n_prompts * group, completion_tokens
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    completion_ids = [
        tokenizer(completions(tokenizer, 1, lo + (hi - lo) * i // max(1, rows - 1), seed=10 + i)[0],
                  add_special_tokens=False)["input_ids"] + [end]
        for i in range(rows)
    ]  # fmt: skip
    pad = tokenizer.pad_token_id
    p_len, c_len = max(map(len, prompt_ids)), max(map(len, completion_ids))
    batch = {
        "prompt_ids": torch.tensor([[pad] * (p_len - len(p)) + p for p in prompt_ids]),
        "prompt_mask": torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) for p in prompt_ids]),
        "completion_ids": torch.tensor([c + [pad] * (c_len - len(c)) for c in completion_ids]),
        "completion_mask": torch.tensor([[1] * len(c) + [0] * (c_len - len(c)) for c in completion_ids]),
    }
    rewards = torch.rand(rows, generator=torch.Generator().manual_seed(0))
    batch["advantages"] = group_advantages(rewards, torch.arange(n_prompts).repeat_interleave(group))
    return batch


def token_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, T]`` log-probs of the completion tokens: logits only for the positions that predict them,
    and a fused log-softmax + gather (``cross_entropy``), 0 on padding."""
    completion = batch["completion_ids"]
    width = completion.shape[1]
    logits = model(input_ids=torch.cat([batch["prompt_ids"], completion], dim=1),
                   attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
                   logits_to_keep=width + 1).logits[:, :-1]  # fmt: skip
    labels = completion.masked_fill(batch["completion_mask"] == 0, -100)
    return -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(completion)


def ours_side(policy_path: Path, ref_path: Path, batch, group: int, hp: dict, lr: float, workdir: Path) -> Side:
    """Our pieces: ``token_logps`` (no grad) for the reference, then ``token_logps`` + ``grpo``."""
    model, _ = load_policy(policy_path)
    no_dropout(model).train()
    ref_model, _ = load_policy(ref_path)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.no_grad():
        ref = token_logps(no_dropout(ref_model).eval(), batch)
    del ref_model

    def forward_backward() -> float:
        logps = token_logps(model, batch)
        loss = grpo(logps, logps.detach(), ref, batch["advantages"], batch["completion_mask"], **hp)
        loss.backward()
        return loss.item()

    return Side("ours", model, ref.cpu(), forward_backward, lr)


def trl_side(policy_path: Path, ref_path: Path, batch, group: int, hp: dict, lr: float, workdir: Path) -> Side:
    """TRL's loss step: ``GRPOTrainer._compute_loss`` on the batch its generation step would hand it."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, __version__
    from trl.trainer.utils import add_fused_lm_head

    model, tok = load_policy(policy_path)
    rows, width = batch["completion_ids"].shape
    args = GRPOConfig(
        output_dir=str(workdir / "trl"), loss_type="grpo", epsilon=hp["epsilon"], epsilon_high=hp["epsilon_high"],
        beta=hp["beta"], use_bias_correction_kl=False, num_generations=group, per_device_train_batch_size=rows,
        max_completion_length=width, learning_rate=lr, disable_dropout=True, bf16=False, report_to="none",
        save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    data = Dataset.from_dict({"prompt": ["-"] * rows})  # never sampled from: the batch is given
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=data, processing_class=tok)  # fmt: skip
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this bench bypasses
    trainer.model.train()
    ref_model, _ = load_policy(ref_path)
    add_fused_lm_head(no_dropout(ref_model).eval())  # as TRL patches its own reference model
    inputs = {k: v.to(trainer.model.device) for k, v in batch.items()}
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(ref_model, ids, mask, width)
    del ref_model
    trainer.ref_model = None  # TRL loaded one from the policy's path; the batch carries the reference's log-probs

    def forward_backward() -> float:
        loss = trainer.compute_loss(trainer.model, inputs)
        trainer.accelerator.backward(loss)
        return loss.item()

    ref = (inputs["ref_per_token_logps"] * inputs["completion_mask"]).cpu()
    return Side(f"TRL {__version__} GRPOTrainer", trainer.model, ref, forward_backward, lr)


def direct_side(policy_path: Path, ref_path: Path, batch, group: int, hp: dict, lr: float, workdir: Path) -> Side:
    """Fallback peer: Eq. 3 written out on full logits with log_softmax + gather, sequence means by hand."""
    model, _ = load_policy(policy_path)
    no_dropout(model).train()
    ref_model, _ = load_policy(ref_path)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width, mask = batch["completion_ids"].shape[1], batch["completion_mask"].float()

    def logps(m):
        logp = m(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1].float().log_softmax(-1)
        return logp.gather(2, batch["completion_ids"].unsqueeze(-1)).squeeze(-1) * mask

    with torch.no_grad():
        ref = logps(no_dropout(ref_model).eval())
    del ref_model
    adv, eps = batch["advantages"].unsqueeze(1), hp["epsilon"]
    high = eps if hp["epsilon_high"] is None else hp["epsilon_high"]

    def forward_backward() -> float:
        lp = logps(model)
        ratio = torch.exp(lp - lp.detach())
        surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + high) * adv)
        kl = torch.exp(ref - lp) - (ref - lp) - 1
        loss = -(((surrogate - hp["beta"] * kl) * mask).sum(1) / mask.sum(1)).mean()
        loss.backward()
        return loss.item()

    return Side("direct Eq. 3 transcription", model, ref.cpu(), forward_backward, lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="prompts in the step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side (after 1 warm-up step)")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--epsilon", type=float, default=0.2)
    parser.add_argument("--epsilon-high", type=float, default=None)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=384)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(32, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--completion-tokens", type=int, nargs=2, default=(32, 64), metavar=("MIN", "MAX"))
    args = parser.parse_args()
    quiet()

    workdir = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    size = {"n_layer": args.n_layer, "n_embd": args.n_embd}
    bench_model = build_bench_model(workdir / "policy", seed=1, **size)
    ref_path = build_bench_model(workdir / "ref", seed=0, **size).path
    batch = make_batch(load_tokenizer(bench_model.path), args.prompts, args.group, tuple(args.prompt_tokens),
                       tuple(args.completion_tokens))  # fmt: skip
    hp = {"epsilon": args.epsilon, "epsilon_high": args.epsilon_high, "beta": args.beta}
    setup = (bench_model.path, ref_path, batch, args.group, hp, args.lr, workdir)

    mine = ours_side(*setup)
    peer: Side
    try:
        peer = trl_side(*setup)
    except (ImportError, RuntimeError) as exc:  # TRL's lazy imports raise RuntimeError when a dependency is off
        print(f"TRL cannot run here ({exc}); comparing against a direct transcription of Eq. 3 instead.")
        peer = direct_side(*setup)

    # The GRPO step itself, before any update: same loss, same gradient.
    loss_a, loss_b, grad_diff, grad_scale = first_step_agreement(mine, peer)

    times_a, times_b = [], []
    for i in range(args.steps + 1):
        (_, ta), (_, tb) = timed(mine.step), timed(peer.step)
        if i >= 1:  # the warm-up step is not timed
            times_a.append(ta)
            times_b.append(tb)

    t_a, t_b = statistics.median(times_a), statistics.median(times_b)
    rows, width = batch["completion_ids"].shape
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nGRPO step (μ=1): {args.prompts} prompts x G={args.group}, completions up to {width} tokens, "
          f"beta={args.beta}, epsilon={args.epsilon}, {bench_model.shape} ({bench_model.params / 1e6:.1f}M params), {device}")  # fmt: skip
    print(f"peer: {peer.name}; median of {args.steps} timed steps each\n")
    row("", "ours", "peer", "|diff|")
    row("reference logps (max)", "", "", f"{(mine.ref_logps - peer.ref_logps).abs().max().item():.2e}")
    row("loss, step 1", f"{loss_a:.7f}", f"{loss_b:.7f}", f"{abs(loss_a - loss_b):.2e}")
    row("gradient, step 1 (max)", f"|g|<={grad_scale:.2e}", "", f"{grad_diff:.2e}")
    row("step time (ms)", f"{t_a * 1e3:.2f}", f"{t_b * 1e3:.2f}", "")
    row("time ratio ours/peer", f"{t_a / t_b:.3f}", "", "")
    if abs(loss_a - loss_b) > TOLERANCE or grad_diff > TOLERANCE:
        raise SystemExit(f"FAIL: step 1 loss or gradient differs by more than {TOLERANCE}.")
    print(f"\nstep 1 loss and gradient agree within {TOLERANCE}; ours is {'no slower' if t_a <= t_b else 'slower'}.")
    print(json.dumps({
        "bench": "grpo_step", "ratio": round(t_a / t_b, 3), "ratio_means": "ours/peer seconds per GRPO step (mu=1)",
        "target": "<=1", "peer": peer.name, "loss_diff_step1": abs(loss_a - loss_b), "grad_diff_step1": grad_diff,
        "ours_ms": round(t_a * 1e3, 2), "peer_ms": round(t_b * 1e3, 2), "model_params": bench_model.params,
        "model": bench_model.shape, "prompts": args.prompts, "group": args.group, "completion_tokens_max": width,
        "ours_step_ms": [round(t * 1e3, 1) for t in times_a], "peer_step_ms": [round(t * 1e3, 1) for t in times_b],
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
