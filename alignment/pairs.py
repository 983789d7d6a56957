"""Preference pairs from N scored samples per prompt: the data of iterative DPO's rejection sampling.

Iterative DPO (Xiong et al., arXiv 2312.11456; Dong et al., arXiv 2405.07863) samples several
responses per prompt, ranks them with a reward and trains on a (chosen, rejected) pair per prompt;
SLiC-HF-sample-rank (arXiv 2305.10425) pairs the top-ranked with the bottom-ranked decode. The DPO loss
(arXiv 2305.18290, Eq. 7: ``L = -sum log sigma(eta log pi/pi_0 (a^w|x) - eta log pi/pi_0 (a^l|x))``) only needs to
know which of two responses won, so every strategy here emits ``(x, a^w, a^l)`` with
``r(x, a^w) > r(x, a^l)``:

- ``best_vs_worst`` (default): the highest- against the lowest-reward sample (SLiC-HF-sample-rank).
- ``best_vs_random``: the highest-reward sample against one drawn uniformly from those it beats.
- ``all_pairs``: every ordered pair with ``r_w - r_l >= min_margin`` (``n (n - 1) / 2`` at most).

Rules common to all strategies:

- Identical completions of one prompt count once (the first by ``sample_idx``, as ``filters.dedupe``),
  so a completion is never paired with itself and ``all_pairs`` never repeats a pair of texts.
- A pair needs ``margin = r_w - r_l > 0`` and ``margin >= min_margin``: ties carry no preference, and a
  prompt whose samples all score the same yields no pair.
- Ties in reward are broken by the lower ``sample_idx``; ``best_vs_random`` draws with a key that
  depends only on ``(seed, prompt_id, sample_idx)`` (the same mix as ``samplers.row_seed``), so a pair
  does not depend on row order, batching or sharding.

Everything is whole-column polars, with no Python loop over rows. Samples are put in
``(prompt_id, sample_idx)`` order once (a no-op when they already are), so per-prompt work runs over
contiguous runs: a sorted group-by for best and worst, neighbour comparisons for repeated texts, and
texts gathered by row number instead of joined. ``bench/bench_pairing.py`` times it on 1M rows.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

SCORED_COLUMNS = {
    "prompt_id": pl.Int64,
    "prompt": pl.Utf8,
    "reference": pl.Utf8,
    "completion": pl.Utf8,
    "sample_idx": pl.Int32,
    "reward": pl.Float64,
}

PAIR_SCHEMA = {
    "prompt_id": pl.Int64,
    "prompt": pl.Utf8,
    "reference": pl.Utf8,
    "chosen": pl.Utf8,
    "rejected": pl.Utf8,
    "chosen_reward": pl.Float64,
    "rejected_reward": pl.Float64,
    "margin": pl.Float64,
    "chosen_idx": pl.Int32,
    "rejected_idx": pl.Int32,
}

# A strategy maps the distinct samples (prompt_id, _row, sample_idx, reward), sorted by
# (prompt_id, sample_idx) and numbered by ``_row`` in that order, to the pairs it keeps:
# (chosen_row, rejected_row, chosen_reward, rejected_reward).
Pairing = Callable[[pl.LazyFrame, float, int], pl.LazyFrame]

_PROMPT = pl.col("prompt_id").set_sorted()  # samples are sorted by prompt: grouping takes contiguous runs
_ROUNDING = 4 * 2.0**-52  # a few float64 ulps, relative
_SHIFT_LIMIT = 16  # up to this many samples per prompt, duplicates are found by comparing neighbours
_MASK64 = 2**64 - 1


def best_vs_worst(samples: pl.LazyFrame, min_margin: float, seed: int) -> pl.LazyFrame:
    """The best sample against the worst one of each prompt (SLiC-HF-sample-rank, arXiv 2305.10425); ``seed`` unused."""
    # Rows run in sample order within a prompt, so arg_max/arg_min (first extreme) pick the lower sample_idx.
    reward = pl.col("reward")
    return (
        samples.group_by(_PROMPT, maintain_order=True)
        .agg(
            chosen_row=pl.col("_row").get(reward.arg_max()),
            rejected_row=pl.col("_row").get(reward.arg_min()),
            chosen_reward=reward.max(),
            rejected_reward=reward.min(),
        )
        .filter(_kept(min_margin))
    )


def best_vs_random(samples: pl.LazyFrame, min_margin: float, seed: int) -> pl.LazyFrame:
    """The best sample against one drawn uniformly, with ``seed``, from the samples it beats by ``min_margin``."""
    reward = pl.col("reward")
    candidates = samples.with_columns(
        chosen_row=pl.col("_row").get(reward.arg_max()).over(_PROMPT),
        chosen_reward=reward.max().over(_PROMPT),
    ).rename({"_row": "rejected_row", "reward": "rejected_reward"})
    # The candidate with the smallest hash key is a uniform draw; a 63-bit tie goes to the lower sample_idx.
    key = _row_key(seed, pl.col("prompt_id"), pl.col("sample_idx"))
    draw = key.arg_min()
    return (
        candidates.filter(_kept(min_margin))
        .group_by(_PROMPT, maintain_order=True)
        .agg(
            pl.col("chosen_row", "chosen_reward").first(),
            pl.col("rejected_row").get(draw),
            pl.col("rejected_reward").get(draw),
        )
    )


def all_pairs(samples: pl.LazyFrame, min_margin: float, seed: int) -> pl.LazyFrame:
    """Every pair of one prompt's samples whose rewards differ by at least ``min_margin``; ``seed`` unused."""
    chosen = samples.select("prompt_id", chosen_row="_row", chosen_reward="reward")
    rejected = samples.select("prompt_id", rejected_row="_row", rejected_reward="reward")
    return chosen.join(rejected, on="prompt_id", maintain_order="left_right").filter(_kept(min_margin))


PAIRINGS: dict[str, Pairing] = {
    "best_vs_worst": best_vs_worst,
    "best_vs_random": best_vs_random,
    "all_pairs": all_pairs,
}


def make_pairs(
    scored: pl.DataFrame, strategy: str = "best_vs_worst", min_margin: float = 0.0, seed: int = 0
) -> pl.DataFrame:
    """Preference pairs from a scored frame, sorted by ``(prompt_id, chosen_idx, rejected_idx)``.

    Returns the columns of ``PAIR_SCHEMA``; ``margin = chosen_reward - rejected_reward`` is always
    ``> 0`` and ``>= min_margin`` up to float rounding (see ``_kept``). An empty result (every prompt tied) is an empty frame with that
    schema: whether that is an error is the caller's decision.
    """
    pairing = _pairing(strategy)
    if not min_margin >= 0.0:
        raise ValueError(f"min_margin must be a number >= 0, got {min_margin!r}.")
    samples = _distinct_samples(scored)
    slim = samples.lazy().select("prompt_id", "_row", "sample_idx", "reward")
    index = pairing(slim, float(min_margin), seed).select(
        "chosen_row", "rejected_row", "chosen_reward", "rejected_reward"
    )
    return _with_text(_in_row_order(index.collect()), samples)


def kto_split(scored: pl.DataFrame, threshold: float) -> pl.DataFrame:
    """Unpaired KTO data: each distinct sample labelled ``desirable`` when ``reward >= threshold``.

    KTO (arXiv 2402.01306) weighs desirable samples by ``lambda_D sigma(beta (r_theta - z_0))`` and
    undesirable ones by ``lambda_U sigma(beta (z_0 - r_theta))``, so it needs no pairs: every distinct
    sample is kept, with its label. Sorted by ``(prompt_id, sample_idx)``.
    """
    samples = _distinct_samples(scored).drop("_row")
    return samples.with_columns(desirable=pl.col("reward") >= float(threshold))


def _pairing(strategy: str) -> Pairing:
    if strategy not in PAIRINGS:
        raise ValueError(f"Unknown pairing strategy {strategy!r}: use one of {sorted(PAIRINGS)}.")
    return PAIRINGS[strategy]


def _distinct_samples(scored: pl.DataFrame) -> pl.DataFrame:
    """Checked samples in ``(prompt_id, sample_idx)`` order, one per distinct text, numbered by ``_row``."""
    missing = [c for c in SCORED_COLUMNS if c not in scored.columns]
    if missing:
        raise ValueError(
            f"The scored frame lacks column(s) {missing}; pairing needs {list(SCORED_COLUMNS)} "
            "(score the samples first)."
        )
    # One chunk: a frame read from Parquet arrives in many, and shifts and gathers are ~2x slower across them.
    frame = _in_sample_order(scored.select(list(SCORED_COLUMNS)).cast(SCORED_COLUMNS).rechunk())
    bad = frame.select(
        rewards=(pl.col("reward").is_null() | pl.col("reward").is_nan()).sum(),
        texts=pl.col("completion").is_null().sum(),
    ).row(0, named=True)
    if bad["rewards"]:
        raise ValueError(f"{bad['rewards']} scored row(s) have a null or NaN reward; rescore them before pairing.")
    if bad["texts"]:
        raise ValueError(f"{bad['texts']} scored row(s) have a null completion; regenerate or drop them.")
    return _first_of_each_text(frame).with_row_index("_row")


def _in_sample_order(frame: pl.DataFrame) -> pl.DataFrame:
    """Sort by ``(prompt_id, sample_idx)`` unless already sorted; refuse a sample that appears twice."""
    pid, idx = pl.col("prompt_id"), pl.col("sample_idx")
    later = ((pid.diff() > 0) | ((pid.diff() == 0) & (idx.diff() > 0))).fill_null(True)
    if frame.select(later.all()).item():
        return frame
    frame = frame.sort("prompt_id", "sample_idx")
    repeats = frame.select(((pid.diff() == 0) & (idx.diff() == 0)).sum()).item()
    if repeats:
        raise ValueError(
            f"{repeats} scored row(s) repeat a (prompt_id, sample_idx) of another row; each sample must "
            "appear once (was a scored partition read twice?)."
        )
    return frame


def _first_of_each_text(frame: pl.DataFrame) -> pl.DataFrame:
    """Keep the first (lowest ``sample_idx``) of identical completions of one prompt; exact, no hashing risk."""
    longest = frame.select(pl.col("prompt_id").rle().struct.field("len").max()).item() or 0
    if longest <= 1:
        return frame
    if longest > _SHIFT_LIMIT:
        return frame.filter(pl.struct("prompt_id", "completion").is_first_distinct())
    # Rows are in sample order, so a repeat is a row equal to one of the (longest - 1) rows before it.
    pid, text = pl.col("prompt_id"), pl.col("completion")
    seen = [((pid.shift(j) == pid) & (text.shift(j) == text)).fill_null(False) for j in range(1, longest)]
    return frame.filter(~pl.any_horizontal(seen))


def _kept(min_margin: float) -> pl.Expr:
    """A pair is kept when the chosen sample strictly wins by at least ``min_margin``, up to float rounding.

    Rewards such as 0.3 and 0.2 are inexact in binary (``0.3 - 0.2 < 0.1``); the slack is a few ulps of
    the operands, far below any meaningful margin, so ``min_margin=0.1`` keeps that pair as a person expects.
    """
    chosen, rejected = pl.col("chosen_reward"), pl.col("rejected_reward")
    slack = _ROUNDING * (chosen.abs() + rejected.abs() + min_margin)
    margin = chosen - rejected
    return (margin > 0.0) & (margin + slack >= min_margin)


def _in_row_order(index: pl.DataFrame) -> pl.DataFrame:
    """Pairs sorted by ``(chosen_row, rejected_row)``, i.e. by prompt and sample indices; usually already so."""
    order = pl.col("chosen_row").cast(pl.UInt64) * 2**32 + pl.col("rejected_row").cast(pl.UInt64)
    if index.select((order.diff() >= 0).all()).item():
        return index
    return index.sort("chosen_row", "rejected_row")


def _with_text(index: pl.DataFrame, samples: pl.DataFrame) -> pl.DataFrame:
    """Gather prompt, reference, texts and sample indices of both sides by row number: no join needed."""
    chosen = samples.select(pl.all().gather(index["chosen_row"]))
    rejected = samples.select(pl.all().gather(index["rejected_row"]))
    return pl.DataFrame(
        {
            "prompt_id": chosen["prompt_id"],
            "prompt": chosen["prompt"],
            "reference": chosen["reference"],
            "chosen": chosen["completion"],
            "rejected": rejected["completion"],
            "chosen_reward": index["chosen_reward"],
            "rejected_reward": index["rejected_reward"],
            "margin": index["chosen_reward"] - index["rejected_reward"],
            "chosen_idx": chosen["sample_idx"],
            "rejected_idx": rejected["sample_idx"],
        },
        schema=PAIR_SCHEMA,
    )


def _row_key(seed: int, prompt_id: pl.Expr, sample_idx: pl.Expr) -> pl.Expr:
    """``samplers.row_seed(seed, prompt_id, sample_idx)`` as a column expression (splitmix64 finaliser)."""
    u64 = pl.UInt64
    x = (
        pl.lit((seed * 0x9E3779B97F4A7C15) & _MASK64, dtype=u64)
        + prompt_id.cast(pl.Int64).cast(u64, wrap_numerical=True) * pl.lit(0xBF58476D1CE4E5B9, dtype=u64)
        + sample_idx.cast(pl.Int64).cast(u64, wrap_numerical=True) * pl.lit(0x94D049BB133111EB, dtype=u64)
    )
    x = x.xor(x // (1 << 31))
    x = x * pl.lit(0xD6E8FEB86659FD93, dtype=u64)
    x = x.xor(x // (1 << 32))
    return x & pl.lit(2**63 - 1, dtype=u64)
