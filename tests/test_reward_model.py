"""Bradley–Terry reward models, ensembles and reward specs, on the tiny model and the arithmetic task."""

from __future__ import annotations

import math
import random

import polars as pl
import pytest
import torch

from alignment import filters
from alignment.arithmetic import arithmetic_task
from alignment.models import build_tiny_gpt2
from alignment.pairs import make_pairs
from alignment.reward_model import RewardModel, RewardModelConfig, bradley_terry_loss, pairwise_accuracy, train_reward_model
from alignment.rewards import (
    REWARDS,
    Ensemble,
    RewardError,
    contains_reference,
    exact_match,
    resolve_reward,
    resolve_reward_spec,
)

WRONG_PER_PROMPT = 4


@pytest.fixture(scope="module")
def one_thread():
    # Two CPU cores shared with other jobs: one intra-op thread avoids oversubscription (5-10x faster here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def candidates(task_frame: pl.DataFrame, seed: int) -> pl.DataFrame:
    """A scored frame per prompt: sample 0 is the right answer, then wrong answers drawn from 0..108."""
    rng = random.Random(seed)
    rows = []
    for pid, prompt, ref in task_frame.select("prompt_id", "prompt", "reference").iter_rows():
        wrong = [str(w) for w in rng.sample(range(109), WRONG_PER_PROMPT + 1) if str(w) != ref][:WRONG_PER_PROMPT]
        rows += [(pid, prompt, ref, text, idx) for idx, text in enumerate([ref, *wrong])]
    frame = pl.DataFrame(rows, schema=["prompt_id", "prompt", "reference", "completion", "sample_idx"], orient="row")
    rewards = exact_match(frame["prompt"], frame["completion"], frame["reference"])
    return frame.with_columns(pl.col("sample_idx").cast(pl.Int32), reward=pl.Series(rewards))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A one-layer tiny GPT-2 base and a reward model fitted on 800 prompts x 4 (right, wrong) pairs."""
    task = arithmetic_task()
    root = tmp_path_factory.mktemp("rm")
    texts = [p + r for p, r in zip(task.prompts["prompt"], task.prompts["reference"])] + ["0123456789+="]
    base = build_tiny_gpt2(texts, root / "base", n_layer=1, n_embd=64, n_head=4, n_positions=32)
    train_prompts = pl.concat([task.labelled.drop("completion"), task.prompts])
    pairs = make_pairs(candidates(train_prompts, seed=0), "all_pairs")
    cfg = RewardModelConfig(epochs=2, batch_size=16, lr=1e-3, seed=0)
    metrics = train_reward_model(base, root / "rm", pairs, cfg, progress=False)
    held_out = make_pairs(candidates(task.eval, seed=1), "best_vs_random", seed=0)
    return {"base": base, "rm": root / "rm", "metrics": metrics, "pairs": pairs, "held_out": held_out}


def test_reward_model_ranks_held_out_pairs(trained):
    assert trained["pairs"].height == 800 * WRONG_PER_PROMPT
    assert trained["metrics"]["train_steps"] == 2 * 800 * WRONG_PER_PROMPT / 16
    accuracy = pairwise_accuracy(RewardModel(trained["rm"]), trained["held_out"])
    print(f"held-out pairwise accuracy: {accuracy:.3f} on {trained['held_out'].height} pairs; {trained['metrics']}")
    assert accuracy >= 0.8


def test_training_is_seeded(trained, tmp_path):
    pairs = trained["pairs"].head(48)
    cfg = RewardModelConfig(epochs=1, batch_size=16, seed=3)
    scores = []
    for run in ("a", "b"):
        train_reward_model(trained["base"], tmp_path / run, pairs, cfg, progress=False)
        scores.append(RewardModel(tmp_path / run)(pairs["prompt"], pairs["chosen"], pairs["reference"]))
    assert scores[0] == scores[1]


def test_length_sorted_batches_return_the_caller_order(trained):
    rng = random.Random(0)
    prompts = [f"{rng.randrange(100)}+{rng.randrange(10)}=" for _ in range(37)]
    completions = [str(rng.randrange(10 ** rng.randrange(1, 6))) for _ in prompts]
    references = [""] * len(prompts)
    one_at_a_time = RewardModel(trained["rm"], batch_size=1)(prompts, completions, references)
    batched = RewardModel(trained["rm"], batch_size=8)(prompts, completions, references)
    assert torch.allclose(torch.tensor(batched), torch.tensor(one_at_a_time), atol=1e-5)


def test_scoring_reports_its_progress_also_under_a_timeout(trained):
    """A reward model over a large Grow says how far it is in a stage's progress block, also when the recipe's
    reward_timeout_s runs it in a worker thread (which carries the caller's context)."""
    from alignment.progress import reporting
    from alignment.rewards import with_timeout

    pairs = trained["pairs"].head(20)
    for reward in (RewardModel(trained["rm"], batch_size=8), with_timeout(RewardModel(trained["rm"], batch_size=8), 60)):
        reports = []
        with reporting(lambda *args: reports.append(args), every=0):
            reward(pairs["prompt"], pairs["chosen"], pairs["reference"])
        assert [(done, total, unit) for done, total, unit, _, _ in reports] == [(8, 20, "completions scored"),
                                                                              (16, 20, "completions scored")]


def test_quantile_filter_over_reward_model_scores_keeps_the_expected_fraction(trained):
    scored = candidates(arithmetic_task().eval.head(8), seed=2)  # 8 prompts x 5 samples = 40 rows
    rm_scores = RewardModel(trained["rm"])(scored["prompt"], scored["completion"], scored["reference"])
    q, n = 0.75, scored.height
    expected = n - math.ceil(q * (n - 1))  # rows at or above the linear-interpolated q-quantile
    top = set(sorted(range(n), key=lambda i: rm_scores[i])[n - expected :])
    for a, b in ((1.0, 0.0), (0.01, 0.0), (250.0, -3e3)):  # an RM's scale is arbitrary: any a*r + b with a > 0
        frame = scored.with_columns(reward=pl.Series([a * r + b for r in rm_scores]))
        kept = filters.at_least(frame.with_row_index("row"), filters.quantile_threshold(frame, q))
        assert kept.height == expected == 10
        assert set(kept["row"].to_list()) == top


def test_bradley_terry_loss_values():
    loss = bradley_terry_loss(torch.tensor([0.0, 2.0, 0.0, 5.0]), torch.tensor([0.0, 0.0, 2.0, 3.0]))
    # -log sigma(d) = log(1 + e^-d); rows 2 and 4 share d = 2: only the difference of rewards matters.
    log2, d2, d_minus2 = math.log(2.0), math.log1p(math.exp(-2.0)), math.log1p(math.exp(2.0))
    expected = torch.tensor([log2, d2, d_minus2, d2])
    assert torch.allclose(loss, expected)


def test_ensemble_min_and_mean_exact_values():
    prompts, references = ["40+2="] * 3, ["42"] * 3
    completions = ["42", "142", "7"]  # exact_match: 1, 0, 0; contains_reference: 1, 1, 0
    members = [exact_match, contains_reference]
    assert Ensemble(members, "min")(prompts, completions, references) == [1.0, 0.0, 0.0]
    assert Ensemble(members, "mean")(prompts, completions, references) == [1.0, 0.5, 0.0]


def test_ensemble_refuses_bad_members_and_reduce():
    with pytest.raises(RewardError, match="at least one member"):
        Ensemble([])
    with pytest.raises(RewardError, match="Unknown ensemble reduce 'max'"):
        Ensemble([exact_match], "max")
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        Ensemble([exact_match, lambda p, c, r: [0.0]])(["a", "b"], ["a", "b"], ["a", "b"])


def test_pairwise_accuracy_counts_ties_as_misses():
    pairs = pl.DataFrame(
        {"prompt": ["1+1="] * 3, "reference": ["2"] * 3, "chosen": ["2", "3", "4"], "rejected": ["3", "2", "5"]}
    )
    assert pairwise_accuracy(exact_match, pairs) == pytest.approx(1 / 3)


def test_resolve_reward_spec(trained):
    assert resolve_reward_spec("exact_match") is exact_match
    assert resolve_reward_spec("alignment.rewards:contains_reference") is contains_reference
    rm = resolve_reward_spec(f"rm:{trained['rm']}")
    assert isinstance(rm, RewardModel) and rm.path == trained["rm"]
    listed = resolve_reward_spec(["exact_match", "contains_reference"])
    assert isinstance(listed, Ensemble) and listed.reduce == "min"
    assert listed.members == [exact_match, contains_reference]
    nested = resolve_reward_spec({"ensemble": [f"rm:{trained['rm']}", ["exact_match"]], "reduce": "mean"})
    assert nested.reduce == "mean" and isinstance(nested.members[0], RewardModel)
    assert isinstance(nested.members[1], Ensemble)
    assert nested(["1+1="], ["2"], ["2"])[0] == pytest.approx((rm(["1+1="], ["2"], ["2"])[0] + 1.0) / 2)
    assert resolve_reward is not resolve_reward_spec and {"exact_match", "contains_reference"} <= set(REWARDS)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rm:/no/such/model", "no reward model there"),
        ({"ensemble": ["exact_match"], "weights": [1]}, "got keys ['ensemble', 'weights']"),
        ({"ensemble": "exact_match"}, "must be a list of reward specs"),
        ({"ensemble": ["exact_match"], "reduce": "median"}, "Unknown ensemble reduce 'median'"),
        ("no_such_reward", "Unknown reward 'no_such_reward'"),
        (3, "got int"),
    ],
)
def test_resolve_reward_spec_errors(spec, message):
    with pytest.raises(RewardError) as err:
        resolve_reward_spec(spec)
    assert message in str(err.value)
