"""Preference pairs: exact rows for every strategy on a hand-built scored frame."""

from __future__ import annotations

import random

import polars as pl
import pytest

from alignment.pairs import PAIR_SCHEMA, PAIRINGS, kto_split, make_pairs
from alignment.samplers import row_seed

# (prompt_id, completion, reward) in sample_idx order per prompt.
SAMPLES = {
    # idx 2 repeats idx 0 ("2"): dropped; idx 1 and idx 4 tie for worst: idx 1 wins.
    1: [("2", 1.0), ("3", 0.0), ("2", 1.0), ("4", 0.25), ("5", 0.0)],
    # Every sample scores the same: no preference, no pair.
    2: [("4", 0.5), ("5", 0.5), ("6", 0.5)],
    # A stochastic reward scored the same text twice: "6" must never be paired against "6".
    3: [("6", 0.75), ("6", 0.25), ("7", 0.5)],
    # The best sample has the higher index, and the prompt comes last in the frame: output is sorted.
    0: [("1", 0.0), ("0", 1.0)],
    # Margins 0.1, 0.4 and 0.5 for min_margin tests.
    4: [("8", 1.0), ("9", 0.9), ("10", 0.5)],
}


def scored_frame() -> pl.DataFrame:
    rows = [
        {
            "prompt_id": pid,
            "prompt": f"p{pid}",
            "reference": f"r{pid}",
            "completion": text,
            "sample_idx": idx,
            "policy_version": "1",
            "reward": reward,
            "num_tokens": len(text) + 1,
        }
        for pid, samples in SAMPLES.items()
        for idx, (text, reward) in enumerate(samples)
    ]
    schema = {"prompt_id": pl.Int64, "sample_idx": pl.Int32, "reward": pl.Float64, "num_tokens": pl.Int32}
    return pl.DataFrame(rows, schema_overrides=schema)


def pair(pid: int, chosen_idx: int, rejected_idx: int) -> dict:
    """The expected output row for one pair, built from SAMPLES."""
    chosen, chosen_reward = SAMPLES[pid][chosen_idx]
    rejected, rejected_reward = SAMPLES[pid][rejected_idx]
    return {
        "prompt_id": pid,
        "prompt": f"p{pid}",
        "reference": f"r{pid}",
        "chosen": chosen,
        "rejected": rejected,
        "chosen_reward": chosen_reward,
        "rejected_reward": rejected_reward,
        "margin": chosen_reward - rejected_reward,
        "chosen_idx": chosen_idx,
        "rejected_idx": rejected_idx,
    }


def rows(frame: pl.DataFrame) -> list[dict]:
    assert frame.schema == pl.Schema(PAIR_SCHEMA)
    return frame.to_dicts()


def test_best_vs_worst_exact_rows():
    expected = [pair(0, 1, 0), pair(1, 0, 1), pair(3, 0, 2), pair(4, 0, 2)]
    assert rows(make_pairs(scored_frame())) == expected


def test_best_vs_worst_drops_prompts_under_the_margin():
    assert rows(make_pairs(scored_frame(), "best_vs_worst", min_margin=0.6)) == [pair(0, 1, 0), pair(1, 0, 1)]


def test_all_pairs_exact_rows():
    expected = [
        pair(0, 1, 0),
        pair(1, 0, 1),
        pair(1, 0, 3),
        pair(1, 0, 4),
        pair(1, 3, 1),
        pair(1, 3, 4),
        pair(3, 0, 2),
        pair(4, 0, 1),
        pair(4, 0, 2),
        pair(4, 1, 2),
    ]
    assert rows(make_pairs(scored_frame(), "all_pairs")) == expected


def test_all_pairs_with_a_margin():
    expected = [pair(0, 1, 0), pair(1, 0, 1), pair(1, 0, 3), pair(1, 0, 4), pair(4, 0, 2), pair(4, 1, 2)]
    assert rows(make_pairs(scored_frame(), "all_pairs", min_margin=0.4)) == expected


def test_best_vs_random_draws_by_row_seed():
    """The rejected sample is the candidate with the smallest ``row_seed(seed, prompt_id, sample_idx)``."""
    candidates = {0: [0], 1: [1, 3, 4], 3: [2], 4: [1, 2]}
    for seed in (0, 1, 7):
        expected = [
            pair(pid, 1 if pid == 0 else 0, min(idxs, key=lambda j, pid=pid: row_seed(seed, pid, j)))
            for pid, idxs in sorted(candidates.items())
        ]
        assert rows(make_pairs(scored_frame(), "best_vs_random", seed=seed)) == expected


def test_best_vs_random_respects_the_margin():
    # Prompt 1: only the 0.0 samples beat the margin of 0.8; prompt 4: only "10" (margin 0.5 < 0.8 drops it).
    out = make_pairs(scored_frame(), "best_vs_random", min_margin=0.8, seed=3)
    assert out.select("prompt_id", "chosen_idx").rows() == [(0, 1), (1, 0)]
    assert out["rejected_idx"][1] in (1, 4)


def test_best_vs_random_is_roughly_uniform_and_order_free():
    n_prompts = 4000
    frame = pl.DataFrame(
        {
            "prompt_id": [p for p in range(n_prompts) for _ in range(5)],
            "prompt": "x",
            "reference": "y",
            "completion": [str(j) for _ in range(n_prompts) for j in range(5)],
            "sample_idx": [j for _ in range(n_prompts) for j in range(5)],
            "reward": [1.0, 0.0, 0.0, 0.0, 0.0] * n_prompts,
        }
    )
    out = make_pairs(frame, "best_vs_random", seed=11)
    counts = out["rejected_idx"].value_counts().sort("rejected_idx")["count"].to_list()
    assert len(counts) == 4 and all(abs(c - n_prompts / 4) < 150 for c in counts)  # ~5 sigma
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=5)
    assert make_pairs(shuffled, "best_vs_random", seed=11).equals(out)


def test_margin_comparison_forgives_float_rounding():
    frame = scored_frame().filter(pl.col("prompt_id") == 0).with_columns(reward=pl.Series([0.2, 0.3]))
    assert 0.3 - 0.2 < 0.1
    assert make_pairs(frame, min_margin=0.1).height == 1
    assert make_pairs(frame, min_margin=0.1000001).height == 0


def test_no_pairs_gives_an_empty_frame_with_the_schema():
    out = make_pairs(scored_frame().filter(pl.col("prompt_id") == 2), "all_pairs")
    assert out.height == 0 and out.schema == pl.Schema(PAIR_SCHEMA)


def test_every_strategy_is_in_pairings():
    assert set(PAIRINGS) == {"best_vs_worst", "best_vs_random", "all_pairs"}
    for strategy in PAIRINGS:
        out = make_pairs(scored_frame(), strategy)
        assert (out["chosen"] != out["rejected"]).all() and (out["margin"] > 0).all()


@pytest.mark.parametrize(
    ("frame", "kwargs", "message"),
    [
        (scored_frame(), {"strategy": "best_of_n"}, "Unknown pairing strategy 'best_of_n'"),
        (scored_frame(), {"min_margin": -1.0}, "min_margin must be a number >= 0"),
        (scored_frame().drop("reference"), {}, "lacks column(s) ['reference']"),
        (scored_frame().with_columns(reward=pl.lit(float("nan"))), {}, "null or NaN reward"),
        (pl.concat([scored_frame(), scored_frame().head(2)]), {}, "repeat a (prompt_id, sample_idx)"),
    ],
)
def test_bad_input_is_refused_with_a_reason(frame, kwargs, message):
    with pytest.raises(ValueError) as err:
        make_pairs(frame, **kwargs)
    assert message in str(err.value)


def reference_pairs(frame: pl.DataFrame, strategy: str, min_margin: float, seed: int) -> list[tuple]:
    """A plain-Python statement of the pairing rules, row by row, to check the vectorised one against."""
    by_prompt: dict[int, list[tuple[int, str, float]]] = {}
    for pid, idx, text, reward in sorted(frame.select("prompt_id", "sample_idx", "completion", "reward").rows()):
        if text not in {t for _, t, _ in by_prompt.get(pid, [])}:
            by_prompt.setdefault(pid, []).append((idx, text, reward))
    out = []
    for pid, samples in sorted(by_prompt.items()):
        best = max(samples, key=lambda s: (s[2], -s[0]))
        worst = min(samples, key=lambda s: (s[2], s[0]))
        beaten = beats(best, samples, min_margin)
        if strategy == "all_pairs":
            chosen_rejected = [(w, lo) for w in samples for lo in beats(w, samples, min_margin)]
        elif strategy == "best_vs_worst":
            chosen_rejected = [(best, worst)] if worst in beaten else []
        else:
            chosen_rejected = [(best, min(beaten, key=lambda s: row_seed(seed, pid, s[0])))] if beaten else []
        out += [(pid, w[0], lo[0], w[1], lo[1]) for w, lo in chosen_rejected]
    return sorted(out)


def beats(winner: tuple, samples: list[tuple], min_margin: float) -> list[tuple]:
    return [s for s in samples if winner[2] - s[2] > 0 and winner[2] - s[2] >= min_margin]


@pytest.mark.parametrize("samples_per_prompt", [3, 8, 24])  # 24 takes the hashing path for repeated texts
@pytest.mark.parametrize("strategy", sorted(PAIRINGS))
def test_matches_a_row_by_row_statement_of_the_rules(strategy, samples_per_prompt):
    rng = random.Random(samples_per_prompt)
    rows = [
        (pid, idx, str(rng.randrange(6)), rng.randrange(5) / 4)
        for pid in range(40)
        for idx in rng.sample(range(samples_per_prompt * 2), rng.randrange(1, samples_per_prompt + 1))
    ]
    rng.shuffle(rows)
    frame = pl.DataFrame(rows, schema=["prompt_id", "sample_idx", "completion", "reward"], orient="row").with_columns(
        prompt=pl.lit("p"), reference=pl.lit("r")
    )
    for min_margin in (0.0, 0.5):
        out = make_pairs(frame, strategy, min_margin=min_margin, seed=4)
        got = out.select("prompt_id", "chosen_idx", "rejected_idx", "chosen", "rejected").rows()
        assert got == reference_pairs(frame, strategy, min_margin, seed=4)


def test_kto_split_labels_distinct_samples():
    out = kto_split(scored_frame().filter(pl.col("prompt_id").is_in([1, 3])), threshold=0.5)
    assert out.select("prompt_id", "sample_idx", "completion", "desirable").rows() == [
        (1, 0, "2", True),
        (1, 1, "3", False),
        (1, 3, "4", False),
        (1, 4, "5", False),
        (3, 0, "6", True),
        (3, 2, "7", True),
    ]
