"""Run a recipe with the flow its ``algorithm`` names."""

from __future__ import annotations

from typing import Any

from alignment.recipe import Recipe


def run_recipe(recipe: Recipe, run_name: str | None = None) -> dict[str, Any]:
    from flows.common import default_run_name

    name = run_name or default_run_name(recipe)
    if recipe.algorithm == "rest":
        from flows.rest import rest as flow
    else:
        from flows.iterative_dpo import iterative_dpo as flow
    return flow.with_options(flow_run_name=name)(recipe=recipe, run_name=name)
