"""A run's identity as dotted recipe keys: ``tasks.lake.flatten`` and the keys a refused resume names.

Fast and in-process on a ``file://`` lake; the end-to-end refusal through the CLI is in test_run_guard.py.
"""

from __future__ import annotations

import polars as pl
import pytest

from alignment.recipe import load_recipe
from tasks.lake import Lake, RunChanged, flatten
from tasks.lake.runs import check_identity

RECIPE = "recipes/arithmetic-rest.yaml"


def test_flatten_gives_the_dotted_keys_with_empty_sections_as_leaves():
    doc = {"seed": 0, "grow": {"n": 4, "sampler_options": {}, "stop": ["\n"], "deep": {"er": {"key": None}}}}
    assert flatten(doc) == {"seed": 0, "grow.n": 4, "grow.sampler_options": {}, "grow.stop": ["\n"], "grow.deep.er.key": None}
    assert flatten({}) == {}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["filter.threshold=0.75"], "filter.threshold"),
        (["task.n_prompts=12", "reward=contains_reference"], "reward, task.n_prompts"),
        (["grow.sampler_options={top_k: 5}"], "grow.sampler_options, grow.sampler_options.top_k"),
    ],
)
def test_a_changed_recipe_is_refused_naming_its_dotted_keys(tmp_path, change, named):
    lake = Lake(f"file://{tmp_path}/lake")
    check_identity(lake, "r", load_recipe(RECIPE))
    lake.write_stage(lake.stage_uri("r", 0, "prompts"), [pl.DataFrame({"prompt_id": [0], "prompt": ["1+1="]})])
    check_identity(lake, "r", load_recipe(RECIPE, ["grow.batch_size=3"]))  # a resumable key: accepted
    with pytest.raises(RunChanged, match=rf"\(changed: {named}\);"):
        check_identity(lake, "r", load_recipe(RECIPE, change))
