"""``flywheel serve``: the recipes as Prefect deployments, scheduled and triggerable from the UI or API.

On a laptop (the local stack gives a Prefect server with its UI at http://127.0.0.1:4200)::

    flywheel stack up
    flywheel serve recipes/arithmetic-rest.yaml recipes/arithmetic-dpo.yaml

Each recipe becomes one deployment of the flow its ``algorithm`` names (``rest/arithmetic-rest``,
``iterative-dpo/arithmetic-dpo``). The deployment's one parameter is the recipe itself, typed as
the pydantic ``Recipe``: the UI renders it as a form with every field's description and bounds, the
server rejects a run whose recipe breaks the schema (an unknown key, ``grow.samples_per_prompt: 0``), and the
flow validates it again. The recipe file gives the defaults; a run started from the UI ("Custom
run") or the API may change any field (``run_deployment("rest/NAME", parameters={"recipe": {...}})``).
``orchestration.schedule`` (cron) becomes the deployment's schedule.

This process is the worker: flow runs execute here, each in a subprocess, with the task runner the
recipe file names (``orchestration.runner``; fixed when serving starts, so changing it in a run's
parameters has no effect). On GPU machines run the same command there, or use the work pools of
``infra/prefect.yaml`` (see infra/README.md). Likewise ``algorithm`` picks the deployment's flow
when it is built: to run the other loop, serve a recipe that names it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from alignment.recipe import Recipe, RecipeError, load_recipe


def build_deployments(recipes: Sequence[Recipe]):
    """One ``RunnerDeployment`` per recipe: its flow, the recipe as the default parameter, its cron schedule."""
    from prefect.types.entrypoint import EntrypointType

    from flows.run import flow_for

    check_deployable(recipes)
    deployments = []
    for recipe in recipes:
        flow = flow_for(recipe)
        deployments.append(flow.to_deployment(
            name=recipe.name,
            cron=recipe.orchestration.schedule,
            parameters={"recipe": recipe.model_dump(mode="json")},
            description=f"{flow.description}\n\nRecipe {recipe.name!r} ({recipe.algorithm}); edit any field for one run.",
            tags=["flywheel", recipe.algorithm],
            enforce_parameter_schema=True,
            # Import the flow by module (the package is installed), so runs work from any directory.
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return deployments


def check_deployable(recipes: Sequence[Recipe]) -> None:
    """What deploying the recipes needs, checked without a server or a model library: unique names, and
    schedules Prefect's ``CronSchedule`` (what ``to_deployment`` builds) accepts."""
    from prefect.client.schemas.schedules import CronSchedule

    seen: set[str] = set()
    for recipe in recipes:
        if recipe.name in seen:
            raise RecipeError(f"Two recipes are named {recipe.name!r}: deployment names must be unique; rename one.")
        seen.add(recipe.name)
        cron = recipe.orchestration.schedule
        try:
            if cron:
                CronSchedule(cron=cron)
        except ValueError:
            raise RecipeError(
                f"Recipe {recipe.name!r}: orchestration.schedule {cron!r} is not a valid cron expression; "
                "use five fields (minute hour day month weekday), e.g. '0 3 * * *'."
            ) from None


def default_recipe_files(directory: str | Path = "recipes") -> list[Path]:
    """Every ``*.yaml`` in ``recipes/``: what ``flywheel serve`` deploys when given no files."""
    files = sorted(Path(directory).glob("*.yaml"))
    if not files:
        raise RecipeError(f"No recipes to serve: {directory}/ has no *.yaml; pass recipe files to `flywheel serve`.")
    return files


def use_prefect_server() -> str:
    """The Prefect API this process talks to: ``PREFECT_API_URL``, else the local stack's (then its env is used too).

    A served deployment needs a server that outlives this process (the embedded one dies with it
    and has no UI), so without either this is an error that says what to start.
    """
    from prefect.settings import PREFECT_API_URL

    from infra.stack import client_env, http_ok

    url = PREFECT_API_URL.value()
    if url:
        if not http_ok(f"{url.rstrip('/')}/health", timeout=5.0):
            raise RecipeError(
                f"The Prefect server at PREFECT_API_URL={url} does not answer: start it (flywheel stack up, or "
                "prefect server start), or point PREFECT_API_URL at one that runs."
            )
        return url
    env = client_env(".")
    if not env:
        raise RecipeError(
            "flywheel serve needs a Prefect server: run `flywheel stack up` here, "
            "or export PREFECT_API_URL=http://HOST:4200/api for a server of your own."
        )
    for key, value in env.items():  # flow runs are subprocesses: they inherit these
        os.environ.setdefault(key, value)
    return env["PREFECT_API_URL"]


def load_recipes(recipe_files: Sequence[str | Path], overrides: Sequence[str]) -> list[Recipe]:
    """The recipes to serve (every ``recipes/*.yaml`` when none are named), each with the overrides."""
    return [load_recipe(path, list(overrides)) for path in list(recipe_files) or default_recipe_files()]


def serve(recipe_files: Sequence[str | Path] = (), overrides: Sequence[str] = (), *, limit: int | None = None) -> None:
    """Build the deployments and serve them until interrupted (Ctrl+C pauses their schedules)."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    recipes = load_recipes(recipe_files, overrides)
    check_deployable(recipes)  # cheap, before the server is looked for and the flows load
    url = use_prefect_server()
    with temporary_settings({PREFECT_API_URL: url}):
        deployments = build_deployments(recipes)
        print(f"serving {len(deployments)} deployment(s) on {url.removesuffix('/api')}:")
        for d, r in zip(deployments, recipes):
            print(f"  {d.flow_name}/{d.name}  schedule: {r.orchestration.schedule or 'none'}")
        prefect_serve(*deployments, limit=limit, print_starting_message=False)
