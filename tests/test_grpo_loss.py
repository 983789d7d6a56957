"""GRPO's maths: the loss against DeepSeekMath's Eq. 3 (arXiv 2402.03300) written out token by token in
float64, its invariants, the logged diagnostics, group-relative advantages, and, with the bench extra
installed, TRL 1.16's GRPOTrainer loss on the same tensors."""

from __future__ import annotations

import math

import pytest
import torch

from alignment.losses import GROUP_STD_EPS, group_advantages, grpo, grpo_stats

F64 = torch.float64
ATOL = 1e-12  # float64 throughout: the two computations differ by rounding only


def batch(seed: int = 0):
    """Six completions of 1-8 tokens, ratios on both sides of both clip bounds, every advantage sign.

    Padding holds large finite values, so a position the mask drops would show in the loss."""
    g = torch.Generator().manual_seed(seed)
    lengths = [8, 5, 1, 7, 3, 6]
    mask = (torch.arange(8) < torch.tensor(lengths).unsqueeze(1)).long()
    logps = -(0.05 + 3 * torch.rand(6, 8, generator=g, dtype=F64))
    old = logps + 0.35 * torch.randn(6, 8, generator=g, dtype=F64)
    ref = logps + 0.5 * torch.randn(6, 8, generator=g, dtype=F64)
    for x, pad in ((logps, 40.0), (old, -30.0), (ref, 25.0)):
        x[mask == 0] = pad
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.0, 0.9], dtype=F64)
    return logps, old, ref, advantages, mask


def formula(logps, old, ref, advantages, mask, *, epsilon, epsilon_high, beta, loss_agg):
    """``−J`` and ``∂(−J)/∂logps``, one token at a time in Python floats.

    ``−J = Σ_i Σ_t w_i (−min(ρ Â_i, clip(ρ, 1−ε, 1+ε_high) Â_i) + β (e^d − d − 1))``, ``ρ = e^(logp − old)``,
    ``d = ref − logp``, ``w_i = 1/(B |o_i|)`` (Eq. 3) or ``1/Σ_j |o_j|`` (token level). The surrogate's
    derivative is ``−Â ρ`` unless the clipped term is the smaller one (the clip is active, the ratio
    constant), and the KL's is ``β (1 − e^d)``.
    """
    lp, ol, rf, m, adv = logps.tolist(), old.tolist(), ref.tolist(), mask.tolist(), advantages.tolist()
    high = epsilon if epsilon_high is None else epsilon_high
    rows, tokens = len(lp), sum(map(sum, m))
    value, grad = 0.0, [[0.0] * len(lp[0]) for _ in lp]
    for i in range(rows):
        for t in range(len(lp[i])):
            if not m[i][t]:
                continue
            rho = math.exp(lp[i][t] - ol[i][t])
            unclipped, clipped = rho * adv[i], min(max(rho, 1 - epsilon), 1 + high) * adv[i]
            term = -min(unclipped, clipped)
            slope = 0.0 if clipped < unclipped else -adv[i] * rho
            if beta:
                d = rf[i][t] - lp[i][t]
                term += beta * (math.exp(d) - d - 1)
                slope += beta * (1 - math.exp(d))
            weight = 1 / (rows * sum(m[i])) if loss_agg == "sequence" else 1 / tokens
            value += weight * term
            grad[i][t] = weight * slope
    return value, torch.tensor(grad, dtype=F64)


def loss_and_grad(logps, *args, **hparams):
    leaf = logps.clone().requires_grad_()
    loss = grpo(leaf, *args, **hparams)
    loss.backward()
    return loss.item(), leaf.grad


CASES = [
    pytest.param(agg, high, beta, id=f"{agg}-eps_high={high}-beta={beta}")
    for agg in ("sequence", "token") for high in (None, 0.28) for beta in (0.0, 0.04)
]  # fmt: skip


def test_the_batch_reaches_every_side_of_the_clip():
    logps, old, _, adv, mask = batch()
    rho, a, on = torch.exp(logps - old), adv.unsqueeze(1), mask.bool()
    assert bool((on & (a > 0) & (rho > 1.28)).any()) and bool((on & (a > 0) & (rho > 1.2) & (rho < 1.28)).any())
    assert bool((on & (a < 0) & (rho < 0.8)).any()) and bool((on & (a < 0) & (rho > 1.2)).any())
    assert bool((on & (a > 0) & (rho < 0.8)).any())


@pytest.mark.parametrize(("loss_agg", "epsilon_high", "beta"), CASES)
def test_grpo_matches_eq3_token_by_token(loss_agg, epsilon_high, beta):
    logps, old, ref, adv, mask = batch()
    hp = {"epsilon": 0.2, "epsilon_high": epsilon_high, "beta": beta, "loss_agg": loss_agg}
    value, grad = loss_and_grad(logps, old, ref, adv, mask, **hp)
    want_value, want_grad = formula(logps, old, ref, adv, mask, **hp)
    assert value == pytest.approx(want_value, abs=ATOL, rel=0)
    assert torch.allclose(grad, want_grad, rtol=0, atol=ATOL)
    assert grad.abs().max() > 1e-3  # a loss that ignored logps would not pass by accident


def test_ratio_one_without_kl_is_minus_the_mean_advantage():
    logps, _, _, adv, mask = batch()
    value, grad = loss_and_grad(logps, logps.clone(), None, adv, mask, beta=0.0)
    assert value == pytest.approx(-adv.mean().item(), abs=ATOL, rel=0)
    lengths = mask.sum(1, keepdim=True).to(F64)
    assert torch.allclose(grad, -adv.unsqueeze(1) / (len(adv) * lengths) * mask, rtol=0, atol=ATOL)
    token_value, _ = loss_and_grad(logps, logps.clone(), None, adv, mask, beta=0.0, loss_agg="token")
    assert token_value == pytest.approx(-(adv * lengths.squeeze(1)).sum().item() / mask.sum().item(), abs=ATOL)


@pytest.mark.parametrize("loss_agg", ["sequence", "token"])
def test_masked_tokens_do_not_matter_even_when_infinite_or_nan(loss_agg):
    logps, old, ref, adv, mask = batch()
    clean = [x.masked_fill(mask == 0, 0.0) for x in (logps, old, ref)]
    dirty = [x.clone() for x in clean]
    for x, pad in zip(dirty, (float("-inf"), float("nan"), float("inf"))):
        x[mask == 0] = pad
    want_value, want_grad = loss_and_grad(*clean[:1], *clean[1:], adv, mask, loss_agg=loss_agg)
    value, grad = loss_and_grad(*dirty[:1], *dirty[1:], adv, mask, loss_agg=loss_agg)
    assert value == want_value and torch.equal(grad, want_grad)
    assert bool((grad[mask == 0] == 0).all())


# One token per sequence, advantages [1, 1, −1, −1] and ratios [1.5, 0.5, 0.5, 1.5], ε = 0.2:
# token 0 (Â > 0, ρ > 1+ε) and token 2 (Â < 0, ρ < 1−ε) are clipped, tokens 1 and 3 are not.
CLIP = {
    "logps": torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]], dtype=F64)),
    "old_logps": torch.zeros(4, 1, dtype=F64),
    "advantages": torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=F64),
    "mask": torch.ones(4, 1, dtype=torch.long),
}


def test_clipping_stops_the_gradient_exactly_where_the_ratio_left_the_trust_region():
    # J = (min(1.5, 1.2) + min(0.5, 0.8) + min(−0.5, −0.8) + min(−1.5, −1.2)) / 4 = −0.15;
    # ∂(−J)/∂logp = −Â ρ / 4 where unclipped: [0, −0.125, 0, 0.375].
    leaf = CLIP["logps"].clone().requires_grad_()
    loss = grpo(leaf, CLIP["old_logps"], None, CLIP["advantages"], CLIP["mask"], beta=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.15, abs=ATOL)
    assert torch.allclose(leaf.grad.squeeze(1), torch.tensor([0.0, -0.125, 0.0, 0.375], dtype=F64), atol=ATOL)
    # Clip-higher, ε_high = 0.6: token 0 (ρ = 1.5 < 1.6) is back in the region; the low side is unchanged.
    leaf.grad = None
    loss = grpo(leaf, CLIP["old_logps"], None, CLIP["advantages"], CLIP["mask"], epsilon_high=0.6, beta=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.075, abs=ATOL)
    assert torch.allclose(leaf.grad.squeeze(1), torch.tensor([-0.375, -0.125, 0.0, 0.375], dtype=F64), atol=ATOL)


def test_grpo_stats_use_trls_definitions():
    # ref = logp + log 2 on token 0, = logp elsewhere: k3 = 2 − log 2 − 1 there, 0 elsewhere.
    ref = CLIP["logps"] + torch.tensor([[math.log(2)], [0.0], [0.0], [0.0]], dtype=F64)
    args = (CLIP["logps"], CLIP["old_logps"], ref, CLIP["advantages"], CLIP["mask"])
    stats = grpo_stats(*args, beta=0.1)
    kl = (1 - math.log(2)) / 4
    assert stats == pytest.approx({
        "pg_loss": 0.15, "loss": 0.15 + 0.1 * kl, "kl": kl,
        "clip_ratio/low_mean": 0.25, "clip_ratio/high_mean": 0.25, "clip_ratio/region_mean": 0.5,
    }, abs=ATOL)  # fmt: skip
    assert grpo_stats(*args, epsilon_high=0.6, beta=0.0)["clip_ratio/high_mean"] == 0.0
    assert "kl" not in grpo_stats(*args[:2], None, *args[3:], beta=0.0)


@pytest.mark.parametrize(("loss_agg", "epsilon_high", "beta"), CASES)
def test_grpo_stats_loss_is_the_loss(loss_agg, epsilon_high, beta):
    logps, old, ref, adv, mask = batch(1)
    hp = {"epsilon_high": epsilon_high, "beta": beta, "loss_agg": loss_agg}
    stats = grpo_stats(logps, old, ref, adv, mask, **hp)
    assert stats["loss"] == pytest.approx(grpo(logps, old, ref, adv, mask, **hp).item(), abs=ATOL)
    if loss_agg == "token":
        assert stats["loss"] == pytest.approx(stats["pg_loss"] + beta * stats["kl"], abs=ATOL)


def test_bad_arguments_are_one_sentence():
    logps, old, ref, adv, mask = batch()
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo(logps, old, None, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_stats(logps, old, None, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match="loss_agg must be one of sequence, token, got 'seq'"):
        grpo(logps, old, ref, adv, mask, loss_agg="seq")
    with pytest.raises(ValueError, match="scale_rewards must be one of group, none, got 'batch'"):
        group_advantages(adv, torch.zeros(6), scale_rewards="batch")


# --- Group-relative advantages -----------------------------------------------------------------


def test_group_advantages_by_hand():
    # Group 7: r = [1, 0, 0, 1], mean 0.5, unbiased std √(1/3). Group 3: r = [2, 0, 1], mean 1, std 1.
    rewards = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=F64)
    ids = torch.tensor([7, 3, 7, 3, 7, 7, 3])
    s7, s3 = 0.5 / (math.sqrt(1 / 3) + GROUP_STD_EPS), 1 / (1 + GROUP_STD_EPS)
    want = torch.tensor([s7, s3, -s7, -s3, -s7, s7, 0.0], dtype=F64)
    assert torch.allclose(group_advantages(rewards, ids), want, rtol=0, atol=ATOL)
    # Dr. GRPO: no std.
    want = torch.tensor([0.5, 1.0, -0.5, -1.0, -0.5, 0.5, 0.0], dtype=F64)
    assert torch.allclose(group_advantages(rewards, ids, scale_rewards="none"), want, rtol=0, atol=ATOL)


def test_group_advantages_are_trls_formula_on_contiguous_groups():
    """TRL's layout: G consecutive samples per prompt, ``(r − mean) / (std + 1e-4)`` with torch's unbiased std."""
    rewards = torch.rand(5 * 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    grouped = rewards.view(5, 8)
    want = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
    assert torch.allclose(group_advantages(rewards, torch.arange(5).repeat_interleave(8)), want, rtol=0, atol=ATOL)


def test_a_group_of_equal_rewards_has_zero_advantage_not_nan():
    # Three rewards of 0.1 have a mean that is not 0.1 in float64; a group of one has no std at all.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.7], dtype=F64)
    ids = torch.tensor([0, 0, 0, 1, 1, 2])
    for scale in ("group", "none"):
        adv = group_advantages(rewards, ids, scale_rewards=scale)
        assert torch.equal(adv[[0, 1, 2, 5]], torch.zeros(4, dtype=F64)), scale
        assert bool(adv[3] > 0) and bool(adv[4] < 0)
    assert group_advantages(torch.tensor([1, 0, 1]), torch.tensor([0, 0, 0])).dtype == torch.get_default_dtype()


# --- TRL's GRPOTrainer on the same tensors -----------------------------------------------------


@pytest.fixture(scope="module")
def trl_loss(tiny_model_dir, tmp_path_factory):
    """TRL 1.16's own ``GRPOTrainer._compute_loss``, on given per-token log-probs.

    A real trainer is built over the tiny model with the settings under test; only its per-token
    forward (``_get_per_token_logps_and_entropies``) is replaced by the tensors, so that both sides
    see the same ``logps`` and the gradients are taken with respect to them.
    """
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from alignment.models import load_policy

    out = tmp_path_factory.mktemp("trl-grpo")

    def run(logps, old, ref, advantages, mask, *, loss_type, epsilon, epsilon_high, beta):
        model, tok = load_policy(tiny_model_dir)
        args = GRPOConfig(
            output_dir=str(out), loss_type=loss_type, epsilon=epsilon, epsilon_high=epsilon_high, beta=beta,
            use_bias_correction_kl=False,  # TRL 1.16's default weights the KL by ρ (DeepSeek-V3.2); Eq. 3 does not
            num_generations=2, per_device_train_batch_size=2, bf16=False, use_cpu=True, report_to="none",
            save_strategy="no", disable_tqdm=True,
        )  # fmt: skip
        trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                              train_dataset=Dataset.from_dict({"prompt": ["1+2="] * 2}), processing_class=tok)  # fmt: skip
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this bypasses
        leaf = logps.clone().requires_grad_()
        trainer._get_per_token_logps_and_entropies = lambda *_, **__: (leaf, torch.zeros_like(leaf), None)
        rows, width = mask.shape
        inputs = {
            "prompt_ids": torch.zeros(rows, 1, dtype=torch.long), "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
            "completion_ids": torch.zeros(rows, width, dtype=torch.long), "completion_mask": mask,
            "advantages": advantages, "old_per_token_logps": old, "num_items_in_batch": mask.sum(),
        }  # fmt: skip
        if beta:
            inputs["ref_per_token_logps"] = ref
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        return loss.item(), leaf.grad

    return run


@pytest.mark.parametrize(("loss_type", "loss_agg"), [("grpo", "sequence"), ("bnpo", "token"), ("dapo", "token")])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_equals_trls_grpo_loss(trl_loss, loss_type, loss_agg, epsilon_high, beta):
    """TRL ``loss_type="grpo"`` is ``loss_agg="sequence"``; ``"bnpo"``, and ``"dapo"`` on one process without
    gradient accumulation, are ``"token"``; ``epsilon``, ``epsilon_high`` and ``beta`` are the same numbers, with
    ``use_bias_correction_kl=False``."""
    logps, old, ref, adv, mask = batch(2)
    want_value, want_grad = trl_loss(logps, old, ref, adv, mask, loss_type=loss_type, epsilon=0.2,
                                     epsilon_high=epsilon_high, beta=beta)  # fmt: skip
    value, grad = loss_and_grad(logps, old, ref, adv, mask, epsilon=0.2, epsilon_high=epsilon_high, beta=beta,
                                loss_agg=loss_agg)  # fmt: skip
    assert value == pytest.approx(want_value, abs=ATOL, rel=0)
    assert torch.allclose(grad, want_grad, rtol=0, atol=ATOL)
