"""GRPO below the flow: the loss table's declaration and the recipe's grpo section, the step's batch, groups and
advantages, per-token log-probs, and the μ epochs of updates on a tiny model (alignment/grpo.py).

Run: ``.venv/bin/python -m pytest tests/test_grpo_train.py -q``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import polars as pl
import pytest
import torch

from alignment import grpo as G
from alignment.logprobs import sequence_logps, token_logps
from alignment.loss_table import LOSSES, HParam
from alignment.losses import GroupInputs, TokenInputs, compute_loss, grpo
from alignment.models import build_tiny_gpt2, load_policy
from alignment.recipe import load_recipe
from alignment.train_settings import GRPOSettings, PreferenceConfig, trainer_config
from tests.flywheel_helpers import one_torch_thread  # noqa: F401  (autouse: one intra-op thread for this module)




# -- the declaration -----------------------------------------------------------------------------


def test_the_table_declares_grpo_with_string_optional_and_related_hyperparameters():
    spec = LOSSES["grpo"]
    assert (spec.kind, spec.trains_on, spec.needs_reference, spec.needs_rewards) == ("group", "groups", True, False)
    assert spec.defaults() == {"epsilon": 0.2, "epsilon_high": None, "beta": 0.04, "loss_agg": "sequence"}
    assert spec.uses_reference({}) and not spec.uses_reference({"beta": 0.0})
    assert HParam("a", choices=("a", "b")).problem("c") == "must be one of a, b"
    assert HParam(None, gt=0).problem(None) is None and HParam(0.2, gt=0).problem(None) == "must be a number"
    assert HParam(0.2, gt=0).problem("0.3") == "must be a number"
    spec.check({"epsilon": 0.1, "epsilon_high": 0.1})
    for hparams, why in [({"epsilon": 0.0}, "epsilon must be > 0"), ({"beta": -1.0}, "beta must be >= 0"),
                         ({"epsilon_high": 0.1}, r"epsilon_high must be >= epsilon \(0.2\), got 0.1"),
                         ({"epsilon": 0.3, "epsilon_high": 0.25}, "epsilon_high must be >= epsilon"),
                         ({"loss_agg": "mean"}, "loss_agg must be one of sequence, token, got 'mean'"),
                         ({"gamma": 1.0}, "no hyperparameter gamma")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            spec.check(hparams)
    # The other losses' ranges answer as before.
    assert HParam(0.1, gt=0).problem(0.0) == "must be > 0" and HParam(1.0, ge=0).problem(float("nan")) == "must be a finite number"


def test_the_entry_point_is_the_maths_on_token_inputs():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 3, generator=g, dtype=torch.float64)
    inputs = TokenInputs(logps, logps + 0.1, logps - 0.2, torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64),
                         torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]))  # fmt: skip
    hp = {"epsilon": 0.1, "epsilon_high": 0.3, "beta": 0.5, "loss_agg": "token"}
    want = grpo(inputs.logps, inputs.old_logps, inputs.ref_logps, inputs.advantages, inputs.mask, **hp)
    assert LOSSES["grpo"].fn(inputs, **hp).item() == want.item()
    assert compute_loss("grpo", inputs, **hp).item() == want.item()
    assert compute_loss("grpo", inputs).item() == grpo(*inputs.__dict__.values()).item()
    with pytest.raises(TypeError, match="'rloo' takes GroupInputs, got TokenInputs"):
        compute_loss("rloo", inputs)
    with pytest.raises(TypeError, match="'grpo' takes TokenInputs, got GroupInputs"):
        compute_loss("grpo", GroupInputs(logps[:, 0], logps[:, 1], torch.zeros(4)))


def test_the_recipe_section_is_checked_by_the_table_and_converted_once():
    recipe = load_recipe("recipes/arithmetic-grpo.yaml", ["grpo.beta=0", "grpo.epsilon_high=0.28", "grpo.loss_agg=token"])
    assert recipe.grpo.loss_hparams() == {"epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.0, "loss_agg": "token"}
    assert not recipe.grpo.uses_reference
    cfg = trainer_config(recipe, "grpo", seed=5)
    assert type(cfg) is PreferenceConfig and cfg.objective is recipe.grpo and cfg.spec.name == "grpo"
    assert (cfg.seed, cfg.lr, cfg.epochs, cfg.batch_size) == (5, recipe.grpo.lr, recipe.grpo.epochs, recipe.grpo.batch_size)
    with pytest.raises(ValueError, match="not grpo.hparams"):
        GRPOSettings(hparams={"beta": 0.1})
    # Every (iteration, step) of a run gets its own seed.
    assert len({recipe.seed_for("grpo", g, i) for g in range(1, 30) for i in range(1, 200)}) == 29 * 199


# -- a step's batch, groups and advantages ---------------------------------------------------------


def test_a_steps_batch_is_a_seeded_sample_of_the_prompts():
    ids = list(range(100, 0, -1))
    batch = G.prompt_batch(ids, 10, seed=7)
    assert batch == G.prompt_batch(list(reversed(ids)), 10, seed=7) == sorted(set(batch)) and len(batch) == 10
    assert batch != G.prompt_batch(ids, 10, seed=8)
    assert G.prompt_batch(ids, 500, seed=7) == sorted(ids)


SCORED = pl.DataFrame({
    "prompt_id": [1, 1, 1, 2, 2, 2, 3, 3, 4],
    "sample_idx": [0, 1, 2, 0, 1, 2, 0, 1, 0],
    "reward": [1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.0, 1.0, 1.0],
    "num_tokens": [2, 3, 2, 4, 4, 4, 5, 2, 2],
    "finish_reason": ["stop", "stop", "stop", "stop", "stop", "stop", "length", "stop", "stop"],
})  # fmt: skip


def test_groups_whose_rewards_differ_are_kept_with_group_relative_advantages():
    kept = G.with_advantages(G.informative(SCORED), "group")
    assert kept["prompt_id"].to_list() == [1, 1, 1, 3, 3]  # 2: all equal; 4: a group of one
    s = 1 / 3 / (math.sqrt(1 / 3) + 1e-4)  # group 1: mean 2/3, unbiased std √(1/3); group 3: mean 1/2, std √(1/2)
    assert kept["advantage"].to_list() == pytest.approx([s, -2 * s, s, -0.5 / (math.sqrt(0.5) + 1e-4), 0.5 / (math.sqrt(0.5) + 1e-4)])
    assert G.with_advantages(G.informative(SCORED), "none")["advantage"].to_list() == pytest.approx([1 / 3, -2 / 3, 1 / 3, -0.5, 0.5])
    figures = G.sample_figures(SCORED)
    assert figures == pytest.approx({"reward_mean": 5.5 / 9, "reward_std": float(SCORED["reward"].std()),
                                     "frac_reward_zero_std": 0.5, "completion_length": 28 / 9, "truncated_fraction": 1 / 9})


# -- per-token log-probs and the updates --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_gpt2(["0123456789+="], tmp_path_factory.mktemp("tiny"), n_layer=1, n_embd=32, n_head=2)


def test_per_token_log_probs_sum_to_the_sequence_log_prob(tiny):
    model, tok = load_policy(tiny)
    prompts, completions = ["1+2=", "13+4=", "2="], ["3", "17", "100"]
    tokens = token_logps(model, tok, prompts, completions, batch_size=2)
    summed, lengths = sequence_logps(model, tok, prompts, completions)
    assert [len(t) for t in tokens] == lengths.tolist() == [2, 3, 4]  # the digits and the end id
    assert [sum(t) for t in tokens] == pytest.approx(summed.tolist(), abs=1e-5)
    cut = token_logps(model, tok, prompts, completions, [True, False, True])
    assert [len(t) for t in cut] == [2, 2, 4] and cut[1] == pytest.approx(tokens[1][:2], abs=1e-6)  # no end id when truncated


GROUPS = pl.DataFrame({
    "prompt_id": [0, 0, 0, 0, 1, 1, 1, 1],
    "prompt": ["1+2="] * 4 + ["3+4="] * 4,
    "completion": ["3", "5", "3", "9", "7", "1", "12", "7"],
    "reward": [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0],
})  # fmt: skip


def _groups(path, beta: float) -> pl.DataFrame:
    model, tok = load_policy(path)
    frame = G.with_advantages(GROUPS, "group")
    old = token_logps(model, tok, frame["prompt"].to_list(), frame["completion"].to_list())
    return frame.with_columns(pl.Series("old_logps", old), pl.Series("ref_logps", old if beta else [None] * frame.height,
                                                                       dtype=pl.List(pl.Float64)))  # fmt: skip


def _cfg(**settings) -> PreferenceConfig:
    hp = {k: settings.pop(k) for k in ("beta", "epsilon", "epsilon_high", "loss_agg") if k in settings}
    objective = GRPOSettings(epochs=settings.pop("epochs", 2), lr=settings.pop("lr", 1e-2), batch_size=settings.pop("batch_size", 1),
                             warmup_steps=0, **hp)  # fmt: skip
    return PreferenceConfig(objective=objective, **objective.model_dump(include={"epochs", "lr", "batch_size", "warmup_steps"}),
                            **settings)  # fmt: skip


def test_updates_raise_what_beat_its_group_and_lower_the_rest(tiny, tmp_path):
    groups = _groups(tiny, beta=0.04)
    metrics, updates = G.train_grpo(tiny, tmp_path, groups, _cfg(beta=0.04), progress=False)
    # Two groups, one per update, two epochs; π_θ = π_old = π_ref at the first update: ratio 1, nothing clipped, no KL.
    assert [(u["update"], u["epoch"]) for u in updates] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    first = updates[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-9) and first["clip_ratio_region"] == 0.0
    assert abs(first["pg_loss"]) < 1e-6 and first["grad_norm"] > 0 and first["entropy"] > 0  # Σ Â = 0 in a group
    assert updates[-1]["kl"] > 0 and metrics["train_groups"] == 2 and metrics["train_steps"] == 4
    model, tok = load_policy(tmp_path)
    after = token_logps(model, tok, groups["prompt"].to_list(), groups["completion"].to_list())
    change = [sum(a) - sum(b) for a, b in zip(after, groups["old_logps"].to_list())]
    for delta, advantage in zip(change, groups["advantage"].to_list(), strict=True):
        assert (delta > 0) == (advantage > 0), (change, groups["advantage"].to_list())


def test_micro_batches_and_the_reference_weight_change_nothing_they_should_not(tiny, tmp_path):
    """Gradient accumulation gives the same updates as whole batches (groups of equal size, sequence means), and
    with beta 0 no reference is read: its column may be null."""
    whole, _ = G.train_grpo(tiny, tmp_path / "a", _groups(tiny, 0.0), _cfg(beta=0.0, batch_size=2), progress=False)
    micro, updates = G.train_grpo(tiny, tmp_path / "b", _groups(tiny, 0.0), _cfg(beta=0.0, batch_size=2, micro_batch_size=1),
                                  progress=False)  # fmt: skip
    assert micro["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-6)
    assert micro["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5) and "kl" not in updates[0]
    with pytest.raises(ValueError, match="no reference log-probs"):
        G.train_grpo(tiny, tmp_path / "c", _groups(tiny, 0.0), _cfg(beta=0.04), progress=False)


def test_stored_log_probs_of_other_tokens_are_refused(tiny, tmp_path):
    groups = _groups(tiny, 0.0).with_columns(pl.col("old_logps").list.slice(0, 1))
    with pytest.raises(ValueError, match="Row 0 of the groups has 1 stored log-probs for a completion of 2 tokens"):
        G.train_grpo(tiny, tmp_path, groups, _cfg(beta=0.0), progress=False)


# -- on two ranks ---------------------------------------------------------------------------------

WIDE = pl.DataFrame({
    "prompt_id": [p for p in range(4) for _ in range(4)],
    "prompt": [p for p in ("1+2=", "3+4=", "2+2=", "5+1=") for _ in range(4)],
    "completion": ["3", "5", "3", "9", "7", "1", "12", "7", "4", "4", "22", "5", "6", "6", "6", "15"],
    "reward": [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0],
})  # fmt: skip
RANK_SETTINGS = {"beta": 0.04, "epochs": 2, "batch_size": 2, "lr": 1e-2}


def grpo_updates(model_dir: str, out_root: str, groups_path: str, settings: dict) -> dict[str, list[dict[str, float]]]:
    """A rank body (``tasks.launch.run_ranks`` imports it by name): GRPO's updates under DDP, then FSDP."""
    groups = pl.read_parquet(groups_path)
    return {strategy: G.train_grpo(model_dir, f"{out_root}/{strategy}", groups, _cfg(**settings, strategy=strategy),
                                   progress=False)[1] for strategy in ("ddp", "fsdp")}  # fmt: skip


def test_two_ranks_give_one_process_updates(tiny, tmp_path, monkeypatch):
    """Each update's loss, figures and grad norm on 2 ranks (a group each) are one process's with one group per
    micro-batch: the ranks' share-weighted figures are summed, not taken from rank 0 alone."""
    from types import SimpleNamespace

    from tasks.launch import run_ranks

    model, tok = load_policy(tiny)
    frame = G.with_advantages(WIDE, "group")
    old = token_logps(model, tok, frame["prompt"].to_list(), frame["completion"].to_list())
    frame.with_columns(pl.Series("old_logps", old), pl.Series("ref_logps", old)).write_parquet(tmp_path / "groups.parquet")
    _, one = G.train_grpo(tiny, tmp_path / "one", pl.read_parquet(tmp_path / "groups.parquet"),
                          _cfg(**RANK_SETTINGS, micro_batch_size=1), progress=False)  # fmt: skip
    monkeypatch.chdir(tmp_path)  # the ranks' logs go under ./.flywheel
    here = Path(__file__).resolve().parent  # a rank imports grpo_updates by its module's name, as pytest imported it
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(here.parent), str(here), os.environ.get("PYTHONPATH")])))
    world = SimpleNamespace(distributed=SimpleNamespace(strategy="ddp", processes=2, nodes=1, launcher="torchrun", timeout_s=60.0),
                            orchestration=SimpleNamespace(ray_address=None))  # fmt: skip
    two = run_ranks(world, "grpo", "train", grpo_updates, str(tiny), str(tmp_path / "two"), str(tmp_path / "groups.parquet"),
                    RANK_SETTINGS)  # fmt: skip
    assert len(one) == 4 and one[1]["kl"] > 0
    for strategy, updates in two.items():
        assert [u.keys() for u in updates] == [u.keys() for u in one], strategy
        for mine, theirs in zip(updates, one, strict=True):
            assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-7), strategy
