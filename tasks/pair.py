"""Pair: preference pairs from the scored samples, with the reference policy's log-probabilities.

The reference log-probs are computed once per iteration and stored with the pairs (the ``pairs``
stage), so preference training holds a single model in memory.
"""

from __future__ import annotations

import polars as pl

from alignment import distributed
from alignment.filters import pair_decisions
from alignment.pairs import make_pairs
from alignment.preference import reference_logps_for
from alignment.train_settings import trainer_config
from tasks.context import RunRef, flywheel_task, log, progress_lines
from tasks.placement import run_once
from tasks.results import Selection


@flywheel_task(name="pair", retries=1, retry_delay_seconds=[5])
def pair(ref: RunRef, scored_uri: str, iteration: int, reference_uri: str) -> Selection:
    """Commit the ``pairs`` stage (best vs worst by default) and return its uri and counts."""
    lake = ref.open_lake()
    with progress_lines():  # the reference policy's pass over every pair says how far it is
        uri = run_once(ref, ref.stage_uri(iteration, "pairs"), "pair", write_pairs, scored_uri, iteration, reference_uri,
                       label=f"t={iteration}")
    m, scored_rows = lake.manifest(uri), lake.manifest(scored_uri).rows
    log().info("pair t=%d: %d pairs from %d scored samples", iteration, m.rows, scored_rows)
    return Selection(uri=uri, kept=m.rows, samples=scored_rows)


def write_pairs(ref: RunRef, scored_uri: str, iteration: int, reference_uri: str) -> str:
    """The body of ``pair`` (a GPU stage: the reference policy scores every pair)."""
    cfg = ref.recipe.preference
    lake, uri = ref.open_lake(), ref.stage_uri(iteration, "pairs")
    everything = lake.read(scored_uri)
    rewarded = everything.filter(pl.col("reward").is_not_null())  # demonstrations carry no reward
    scored = rewarded
    if not ref.recipe.filter.keep_truncated and "finish_reason" in scored.columns:
        scored = scored.filter(pl.col("finish_reason") != "length")  # a cut-off answer is never a chosen one
    pairs = make_pairs(scored, cfg.pairing, cfg.min_margin, seed=ref.recipe.seed_for("pair", iteration))
    train_cfg = trainer_config(ref.recipe, "preference", ref.recipe.seed_for("preference", iteration))
    pairs = reference_logps_for(pairs, train_cfg, lambda: ref.local_model(reference_uri),
                                trust_remote_code=ref.recipe.model.trust_remote_code)
    if not distributed.world(train_cfg.strategy).main:
        return uri  # rank 0 writes the stage
    config = {"pairing": cfg.pairing, "min_margin": cfg.min_margin, "reference": reference_uri,
              "reference_logps": "ref_chosen_logp" in pairs.columns}
    # Why each scored row was or was not used, committed before the pairs that mark the step done.
    fates = pair_decisions(everything, rewarded, scored, pairs)
    dropped = {reason: int(n) for reason, n in fates.filter(pl.col("decision") == "dropped")["reason"].value_counts().iter_rows()}
    lake.write_stage(ref.stage_uri(iteration, "decisions", 1), [fates], config=config, parents=[scored_uri])
    lake.write_stage(uri, [pairs], config=config, parents=[scored_uri, reference_uri],
                     extra={"scored_rows": everything.height, "dropped": dropped})
    return uri
