"""Preference losses: hand-computed values, gradient directions, batch-sharding invariance, β→0 limits,
sequence log-probs against a token-by-token loop, and the trainer on a tiny model."""

from __future__ import annotations

import inspect
import math

import polars as pl
import pytest
import torch

from alignment import losses as L
from alignment.logprobs import batch_logps, sequence_logps
from alignment.loss_table import LOSSES, HParam, LossSpec
from alignment.losses import GroupInputs, LossInputs, compute_loss
from alignment.models import build_tiny_gpt2, load_policy
from alignment.preference import PreferenceConfig, train_preference, train_rloo
from alignment.train_settings import LossSettings
from alignment.training import collate, encode_pairs

PAIRWISE = sorted(name for name, spec in LOSSES.items() if spec.kind == "pairwise")


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Two pairs. Δ_w = [0.5, 0.5], Δ_l = [-1.0, -0.5], so h = Δ_w − Δ_l = [1.5, 1.0].
# Per-token means: chosen [-0.5, -0.5], rejected [-1.0, -1.5]; rewards r_w − r_l = [1.0, -0.25].
BATCH = LossInputs(
    policy_chosen_logps=t(-1.0, -2.0),
    policy_rejected_logps=t(-3.0, -1.5),
    ref_chosen_logps=t(-1.5, -2.5),
    ref_rejected_logps=t(-2.0, -1.0),
    chosen_lengths=t(2, 4),
    rejected_lengths=t(3, 1),
    chosen_rewards=t(1.0, 0.5),
    rejected_rewards=t(0.0, 0.75),
)


def _orpo(m_w: float, m_l: float, lam: float) -> float:
    log_odds = lambda m: m - math.log(1 - math.exp(m))  # noqa: E731
    return -m_w + lam * softplus(-(log_odds(m_w) - log_odds(m_l)))


EXPECTED = {
    "dpo": ({"beta": 0.1}, [softplus(-0.15), softplus(-0.1)]),
    "hinge": ({"beta": 0.5}, [0.25, 0.5]),
    "ipo": ({"beta": 0.1}, [(1.5 - 5) ** 2, (1.0 - 5) ** 2]),
    # Length-normalised: h = 0.5/2 + 1/3 and 0.5/4 + 0.5/1.
    "ipo_mean": ({"beta": 0.1}, [(0.25 + 1 / 3 - 5) ** 2, (0.125 + 0.5 - 5) ** 2]),
    "exponential": ({"beta": 0.5}, [math.exp(-0.75), math.exp(-0.5)]),
    "truncated_quadratic": ({"beta": 0.5}, [0.25**2, 0.5**2]),
    "savage": ({"beta": 0.5}, [1 / (1 + math.exp(0.75)) ** 2, 1 / (1 + math.exp(0.5)) ** 2]),
    # β·(−0.5 − (−1.0)) − γ = 0 and β·(−0.5 − (−1.5)) − γ = 1.
    "simpo": ({"beta": 2.0, "gamma": 1.0}, [math.log(2), softplus(-1.0)]),
    "orpo": ({"lam": 0.1}, [_orpo(-0.5, -1.0, 0.1), _orpo(-0.5, -1.5, 0.1)]),
    # mean Δ over all four completions is −0.125 < 0, so z0 = 0.
    "kto": (
        {"beta": 0.1, "lambda_d": 2.0, "lambda_u": 1.0},
        [(2 * (1 - sig(0.05)) + (1 - sig(0.1))) / 2, (2 * (1 - sig(0.05)) + (1 - sig(0.05))) / 2],
    ),
    "rebel": ({"eta": 2.0}, [(1.5 / 2 - 1.0) ** 2, (1.0 / 2 + 0.25) ** 2]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loss_values_match_hand_computation(name):
    hparams, expected = EXPECTED[name]
    assert torch.allclose(LOSSES[name].fn(BATCH, **hparams), t(*expected), rtol=0, atol=1e-12)


def test_every_loss_has_a_numeric_test():
    assert set(EXPECTED) | {"rloo", "grpo"} == set(LOSSES)  # grpo's are in test_grpo_loss.py


def test_kto_reference_point_is_the_clamped_detached_mean_logratio():
    # Δ_w = [2, 2], Δ_l = [0, 0]: z0 = mean = 1.
    chosen, rejected = t(2.0, 2.0).requires_grad_(), t(0.0, 0.0).requires_grad_()
    batch = LossInputs(chosen, rejected, t(0.0, 0.0), t(0.0, 0.0))
    loss = LOSSES["kto"].fn(batch, beta=0.1, lambda_d=1.0, lambda_u=1.0)
    assert torch.allclose(loss, t(1 - sig(0.1), 1 - sig(0.1)), atol=1e-12)
    loss.mean().backward()
    # z0 is a constant: d/dΔ_w of (1 − σ(β(Δ_w − z0)))/2/B is −β·σ(0.1)·(1 − σ(0.1))/4.
    slope = 0.1 * sig(0.1) * (1 - sig(0.1)) / 4
    assert torch.allclose(chosen.grad, t(-slope, -slope), atol=1e-12)
    assert torch.allclose(rejected.grad, t(slope, slope), atol=1e-12)


def test_rloo_uses_the_leave_one_out_baseline_within_each_prompt():
    # Groups 7 and 3, interleaved. Group 7: r = [1, 0, 0.5] → A = [0.75, −0.75, 0].
    # Group 3: r = [2, 0] → A = [2, −2]. The loss is −A·log π.
    group = GroupInputs(logps=t(-1.0, -0.5, -2.0, -3.0, -1.5), rewards=t(1.0, 2.0, 0.0, 0.5, 0.0),
                        group_ids=torch.tensor([7, 3, 7, 7, 3]))  # fmt: skip
    assert torch.allclose(LOSSES["rloo"].fn(group), t(0.75, 1.0, -1.5, 0.0, -3.0), atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 samples"):
        LOSSES["rloo"].fn(GroupInputs(t(-1.0, -2.0, -3.0), t(1.0, 0.0, 1.0), torch.tensor([0, 0, 1])))


def test_nll_term_adds_the_chosen_per_token_nll():
    dpo = LOSSES["dpo"].fn(BATCH, beta=0.1)
    # −log π(y_w)/|y_w| = [1/2, 2/4].
    assert torch.allclose(compute_loss("dpo", BATCH, nll_alpha=0.3, beta=0.1), dpo + 0.3 * t(0.5, 0.5), atol=1e-12)
    assert torch.allclose(L.with_nll(dpo, BATCH, 0.3), dpo + 0.3 * t(0.5, 0.5), atol=1e-12)


def test_ipo_mean_is_ipo_when_every_completion_is_one_token():
    ones = LossInputs(**{**BATCH.__dict__, "chosen_lengths": t(1, 1), "rejected_lengths": t(1, 1)})
    assert torch.allclose(LOSSES["ipo_mean"].fn(ones, beta=0.3), LOSSES["ipo"].fn(ones, beta=0.3))


def test_orpo_is_finite_when_a_probability_rounds_to_one_or_zero():
    for avg in (-1e-9, 0.0, -80.0, -1e4):
        chosen = torch.tensor([avg, -0.3], requires_grad=True)
        ones = torch.ones(2)
        batch = LossInputs(chosen, torch.tensor([-2.0, avg]), chosen_lengths=ones, rejected_lengths=ones)
        loss = compute_loss("orpo", batch)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(chosen.grad).all(), avg


def _leaf_batch(chosen, rejected, ref_chosen, ref_rejected, lengths_w, lengths_l, r_w, r_l) -> LossInputs:
    return LossInputs(t(*chosen).requires_grad_(), t(*rejected).requires_grad_(), t(*ref_chosen), t(*ref_rejected),
                      t(*lengths_w), t(*lengths_l), t(*r_w), t(*r_l))  # fmt: skip


@pytest.mark.parametrize("name", PAIRWISE)
def test_one_gradient_step_raises_chosen_and_lowers_rejected(name):
    # Policy = reference (h = 0), r_w > r_l: no loss is saturated here.
    batch = _leaf_batch([-2.0, -3.0], [-2.5, -1.0], [-2.0, -3.0], [-2.5, -1.0], [2, 3], [2, 1], [1.0, 1.0], [0.0, 0.0])
    before_w, before_l = batch.policy_chosen_logps.detach().clone(), batch.policy_rejected_logps.detach().clone()
    optimizer = torch.optim.SGD([batch.policy_chosen_logps, batch.policy_rejected_logps], lr=0.1)
    compute_loss(name, batch).mean().backward()
    optimizer.step()
    assert (batch.policy_chosen_logps > before_w).all()
    assert (batch.policy_rejected_logps < before_l).all()


def test_rloo_step_raises_samples_above_their_baseline_and_lowers_the_rest():
    logps = t(-1.0, -2.0, -3.0, -1.5).requires_grad_()
    group = GroupInputs(logps, rewards=t(1.0, 0.0, 0.2, 0.9), group_ids=torch.tensor([0, 0, 1, 1]))
    before = logps.detach().clone()
    compute_loss("rloo", group).mean().backward()
    torch.optim.SGD([logps], lr=0.1).step()
    assert (logps[[0, 3]] > before[[0, 3]]).all() and (logps[[1, 2]] < before[[1, 2]]).all()


# Four pairs; every mean Δ is negative so KTO's z0 = 0 in the full batch and in each half.
SHARD_DATA = (
    [-2.0, -3.0, -1.0, -4.0], [-2.5, -1.0, -3.0, -2.0],  # policy chosen, rejected
    [-1.5, -2.0, -1.5, -3.0], [-2.0, -0.5, -2.0, -2.5],  # reference chosen, rejected
    [2, 3, 1, 4], [2, 1, 3, 2],  # lengths
    [1.0, 0.0, 0.5, 0.2], [0.0, 0.5, 0.1, 0.3],  # rewards
)  # fmt: skip


def _grads(name: str, shards: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
    """Accumulate gradients of each shard's mean loss / number of shards into one set of leaves."""
    full = _leaf_batch(*SHARD_DATA)
    for s in shards:
        part = LossInputs(**{k: v[s] for k, v in full.__dict__.items()})
        (compute_loss(name, part).mean() / len(shards)).backward()
    return full.policy_chosen_logps.grad, full.policy_rejected_logps.grad


@pytest.mark.parametrize("name", PAIRWISE)
def test_two_half_batches_accumulate_to_the_full_batch_gradient(name):
    whole = _grads(name, [slice(0, 4)])
    halves = _grads(name, [slice(0, 2), slice(2, 4)])
    for g_full, g_half in zip(whole, halves, strict=True):
        assert torch.allclose(g_full, g_half, rtol=1e-12, atol=1e-12)
    full = _leaf_batch(*SHARD_DATA)
    mean_of_halves = sum(compute_loss(name, LossInputs(**{k: v[s] for k, v in full.__dict__.items()})).mean()
                         for s in (slice(0, 2), slice(2, 4))) / 2  # fmt: skip
    assert torch.allclose(compute_loss(name, full).mean(), mean_of_halves, atol=1e-12)


def test_rloo_sharded_by_prompt_accumulates_to_the_full_batch_gradient():
    def grad(shards):
        logps = t(-1.0, -2.0, -3.0, -1.5, -0.5, -2.5).requires_grad_()
        rewards, ids = t(1.0, 0.0, 0.2, 0.9, 0.4, 0.4), torch.tensor([0, 0, 1, 1, 2, 2])
        for s in shards:
            (compute_loss("rloo", GroupInputs(logps[s], rewards[s], ids[s])).mean() / len(shards)).backward()
        return logps.grad

    assert torch.allclose(grad([slice(0, 6)]), grad([slice(0, 2), slice(2, 4), slice(4, 6)]), atol=1e-12)


SMALL = 1e-7
LIMITS = {  # loss at β → 0 (h ≠ 0 does not matter): f(0) of each GPO loss, and the like.
    "dpo": ({"beta": SMALL}, math.log(2)),
    "hinge": ({"beta": SMALL}, 1.0),
    "exponential": ({"beta": SMALL}, 1.0),
    "truncated_quadratic": ({"beta": SMALL}, 1.0),
    "savage": ({"beta": SMALL}, 0.25),
    "simpo": ({"beta": SMALL, "gamma": 0.0}, math.log(2)),
    "kto": ({"beta": SMALL, "lambda_d": 1.0, "lambda_u": 3.0}, (1.0 / 2 + 3.0 / 2) / 2),
    # REBEL with η → ∞ regresses 0 onto the reward gap: (r_w − r_l)².
    "rebel": ({"eta": 1 / SMALL}, None),
}


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_beta_to_zero_limits(name):
    hparams, limit = LIMITS[name]
    expected = t(1.0**2, 0.25**2) if limit is None else t(limit, limit)
    assert torch.allclose(LOSSES[name].fn(BATCH, **hparams), expected, atol=1e-6)


def test_dpo_gradient_at_small_beta_is_half_beta_times_the_logratio_gradient():
    batch = _leaf_batch([-1.0, -2.0], [-3.0, -1.5], [-1.5, -2.5], [-2.0, -1.0], [1, 1], [1, 1], [0, 0], [0, 0])
    LOSSES["dpo"].fn(batch, beta=SMALL).mean().backward()
    # d/dΔ_w of −log σ(βh) = −β·σ(−βh) → −β/2; the batch mean divides by B = 2.
    assert torch.allclose(batch.policy_chosen_logps.grad / SMALL, t(-0.25, -0.25), atol=1e-6)
    assert torch.allclose(batch.policy_rejected_logps.grad / SMALL, t(0.25, 0.25), atol=1e-6)


def test_ipo_squared_target_dominates_as_beta_goes_to_zero():
    assert torch.allclose(LOSSES["ipo"].fn(BATCH, beta=SMALL) * SMALL**2, t(0.25, 0.25), atol=1e-6)


def test_hparam_table_matches_the_maths_defaults_and_bad_names_are_loud():
    for name, spec in LOSSES.items():
        maths = getattr(L, spec.function)
        defaults = {p.name: p.default for p in inspect.signature(maths).parameters.values() if p.default is not p.empty}
        assert defaults == spec.defaults(), name
    with pytest.raises(ValueError, match="choose one of"):
        compute_loss("dpo2", BATCH)
    with pytest.raises(ValueError, match="its hyperparameters: beta"):
        compute_loss("dpo", BATCH, gamma=1.0)
    with pytest.raises(ValueError, match="nll_alpha"):
        compute_loss("orpo", BATCH, nll_alpha=1.0)
    with pytest.raises(TypeError, match="takes GroupInputs"):
        compute_loss("rloo", BATCH)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        compute_loss("dpo", LossInputs(t(-1.0), t(-2.0)))
    with pytest.raises(ValueError, match="no hyperparameter beta"):
        LossSettings(loss="orpo", hparams={"beta": 0.1})


def test_every_loss_function_is_declared_once_and_every_declaration_has_a_function():
    """A maths function in alignment.losses or alignment.grpo_loss (public, tensors in, a Tensor out) needs a
    LossSpec, and back."""
    helpers = {"nll", "with_nll", "compute_loss", "entry_point", "group_advantages"}
    maths = {
        name for name, f in vars(L).items()
        if inspect.isfunction(f) and f.__module__ in (L.__name__, "alignment.grpo_loss") and not name.startswith("_")
        and name not in helpers
        and inspect.signature(f).return_annotation == "Tensor"
    }  # fmt: skip
    assert maths == {spec.function for spec in LOSSES.values()} == set(L._MATHS)
    assert all(name == spec.name for name, spec in LOSSES.items())
    for spec in LOSSES.values():
        assert spec.kind == ("group" if spec.reads in ("group", "tokens") else "pairwise")
        assert spec.fn is not None and (spec.kind == "group" or spec.reads in L._READERS)


def test_the_table_answers_what_the_code_asks():
    assert [n for n, s in LOSSES.items() if s.kind == "group"] == ["rloo", "grpo"]
    assert sorted(n for n, s in LOSSES.items() if not s.needs_reference) == ["orpo", "rloo", "simpo"]
    assert sorted(n for n, s in LOSSES.items() if s.needs_rewards) == ["rebel", "rloo"]
    assert sorted(n for n, s in LOSSES.items() if not s.takes_nll) == ["grpo", "orpo", "rloo"]
    assert LOSSES["simpo"].defaults() == {"beta": 2.0, "gamma": 1.0}
    assert HParam(0.1, gt=0).problem(0.0) == "must be > 0" and HParam(1.0, ge=0).problem(0.0) is None
    assert isinstance(LOSSES["dpo"], LossSpec)
    with pytest.raises(ValueError, match="beta must be > 0"):
        compute_loss("dpo", BATCH, beta=0.0)
    with pytest.raises(ValueError, match="eta must be > 0"):
        LossSettings(loss="rebel", hparams={"eta": -1.0})


def test_beta_and_the_nll_term_reach_only_the_losses_that_take_them():
    """One rule, applied where the settings are checked and where the loss is called: a recipe's ``beta``
    and ``nll_alpha`` are left out for a loss without them, so switching ``preference.loss`` needs no other edit."""
    dpo = LossSettings(loss="dpo", beta=0.3, nll_alpha=1.0, hparams={})
    assert (dpo.loss_hparams(), dpo.nll_weight) == ({"beta": 0.3}, 1.0)
    orpo = LossSettings(loss="orpo", beta=0.3, nll_alpha=1.0, hparams={"lam": 0.2})
    assert (orpo.loss_hparams(), orpo.nll_weight) == ({"lam": 0.2}, 0.0)
    assert LossSettings(loss="rloo", beta=0.3).loss_hparams() == {}
    assert LossSettings(loss="simpo").loss_hparams() == {}  # the declared defaults apply


def test_a_recipe_loads_and_validates_its_loss_without_importing_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from alignment.recipe import PreferenceSettings, load_recipe\n"
        "load_recipe('recipes/arithmetic-dpo.yaml', ['preference.loss=simpo', 'preference.hparams.gamma=0.5'])\n"
        "try:\n"
        "    PreferenceSettings(loss='kto', hparams={'gamma': 1.0})\n"
        "except ValueError as exc:\n"
        "    assert 'its hyperparameters: beta, lambda_d, lambda_u' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('kto accepted gamma')\n"
        "assert 'torch' not in sys.modules, 'loading a recipe imported torch'\n"
    )
    root = inspect.getfile(L).rsplit("/alignment/", 1)[0]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --- Sequence log-probs and the trainer on a tiny model ---------------------------------------

PAIRS = pl.DataFrame({"prompt": ["1+2=", "3+4=", "2+2=", "5+1="], "chosen": ["3", "7", "4", "6"],
                      "rejected": ["9", "12", "8", "2"]})  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_gpt2(["0123456789+="], tmp_path_factory.mktemp("tiny"), n_layer=1, n_embd=32, n_head=2)


def test_sequence_logps_match_a_token_by_token_loop(tiny):
    model, tok = load_policy(tiny)
    prompts, completions = ["1+2=", "13+4=", "2="], ["3", "17", "100"]
    logps, lengths = sequence_logps(model, tok, prompts, completions, batch_size=2)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        p_ids = tok(text, add_special_tokens=False)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|end|>")]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logprobs = model(ids).logits[0].log_softmax(-1)
        manual = sum(logprobs[len(p_ids) + k - 1, token].item() for k, token in enumerate(c_ids))
        assert math.isclose(logps[i].item(), manual, abs_tol=1e-5)
        assert lengths[i].item() == len(c) + 1
    batch = collate(encode_pairs(tok, prompts, completions), tok.pad_token_id)
    grad_logps, _ = batch_logps(model, batch)
    assert grad_logps.requires_grad and torch.allclose(grad_logps.detach(), logps, atol=1e-5)


def _margins(path) -> torch.Tensor:
    model, tok = load_policy(path)
    chosen, _ = sequence_logps(model, tok, PAIRS["prompt"].to_list(), PAIRS["chosen"].to_list())
    rejected, _ = sequence_logps(model, tok, PAIRS["prompt"].to_list(), PAIRS["rejected"].to_list())
    return chosen - rejected


@pytest.mark.parametrize("lora_r", [0, 4])
def test_train_preference_raises_the_chosen_vs_rejected_margin(tiny, tmp_path, lora_r):
    first: list[float] = []
    cfg = PreferenceConfig(objective=LossSettings(loss="dpo", beta=0.5), lr=1e-2, epochs=3, batch_size=4, warmup_steps=0,
                           lora_r=lora_r)
    metrics = train_preference(tiny, tmp_path, PAIRS, cfg, progress=False, on_step=lambda s, v: first.append(v))
    # Policy = reference at the first step (dropout off): the DPO loss is exactly log 2.
    assert math.isclose(first[0], math.log(2), abs_tol=1e-5)
    gain = _margins(tmp_path) - _margins(tiny)
    assert (gain > 0).all()
    assert math.isclose(metrics["margin"], gain.mean().item(), abs_tol=1e-4)
    assert metrics["reward_accuracy"] == 1.0
    model, _ = load_policy(tmp_path)
    assert type(model).__name__ == "GPT2LMHeadModel" and not (tmp_path / "adapter_config.json").exists()


def test_train_rloo_raises_samples_above_their_baseline(tiny, tmp_path):
    samples = pl.DataFrame({"prompt_id": [0, 0, 1, 1], "prompt": ["1+2=", "1+2=", "3+4=", "3+4="],
                            "completion": ["3", "5", "7", "1"], "reward": [1.0, 0.0, 1.0, 0.0]})  # fmt: skip
    cfg = PreferenceConfig(objective=LossSettings(loss="rloo"), lr=1e-2, epochs=3, batch_size=2, warmup_steps=0)
    metrics = train_rloo(tiny, tmp_path, samples, cfg, progress=False)
    assert metrics["logp_change_above_baseline"] > 0 > metrics["logp_change_below_baseline"]


def test_no_code_outside_the_loss_table_branches_on_a_loss_name():
    """A loss's facts live in its declaration: ``loss == "rloo"`` (or ``in ("kto", ...)``) anywhere else is a
    second table that the next loss would silently miss."""
    import ast
    from pathlib import Path

    root = Path(inspect.getfile(L)).resolve().parents[1]
    found = []
    for path in sorted(p for d in ("alignment", "tasks", "flows") for p in (root / d).rglob("*.py")):
        if path.name in ("loss_table.py", "losses.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for side in (node.left, *node.comparators):
                names = [side] if isinstance(side, ast.Constant) else getattr(side, "elts", [])
                found += [f"{path.relative_to(root)}:{node.lineno} {c.value!r}" for c in names
                          if isinstance(c, ast.Constant) and c.value in LOSSES]
    assert found == []
