"""Recipes: every file in recipes/ loads, --set overrides are typed, and mistakes name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from alignment.recipe import Recipe, RecipeError, apply_overrides, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.y*ml"))
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "arithmetic-rest.yaml"


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and re.search(r"[.!?]\s+[A-Z]", message) is None


def test_there_are_recipes():
    assert DEMO in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_parses_and_round_trips(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    raw = yaml.safe_load(path.read_text())
    assert raw["name"] == recipe.name
    # Everything the file says survives validation (nothing silently dropped or renamed).
    dumped = recipe.model_dump(mode="json")
    for section, value in raw.items():
        if isinstance(value, dict):
            for key, v in value.items():
                assert dumped[section][key] == v, f"{section}.{key}"
        else:
            assert dumped[section] == value, section
    assert Recipe.model_validate(dumped) == recipe


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_accepts_overrides_of_its_own_keys(path):
    recipe = load_recipe(path, ["seed=123", "name=renamed"])
    assert (recipe.seed, recipe.name) == (123, "renamed")


def _models(model: type[BaseModel], seen: set) -> list[type[BaseModel]]:
    if model in seen:
        return []
    seen.add(model)
    out = [model]
    for field in model.model_fields.values():
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out += _models(arg, seen)
    return out


def test_every_field_has_a_description_and_every_section_forbids_extra_keys():
    models = _models(Recipe, set())
    assert len(models) >= 8
    for model in models:
        assert model.model_config.get("extra") == "forbid", model.__name__
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


# -- --set overrides ---------------------------------------------------------------------------


def test_overrides_are_parsed_as_yaml_scalars():
    recipe = load_recipe(
        DEMO,
        [
            "grow.samples_per_prompt=4",  # int
            "improve.lr=1e-4",  # a float YAML reads as a string: pydantic still takes it
            "grow.temperature=0.5",
            "warm_start.enabled=false",  # bool
            "improve.restart_from_base=true",
            "mlflow.model_name=null",  # null
            "filter.kind=top_k",
            "filter.k=2",
            "grow_steps=5",  # top level
            "reward=my_pkg.rewards:fraction",  # a colon in a value
        ],
    )
    assert recipe.grow.samples_per_prompt == 4 and isinstance(recipe.grow.samples_per_prompt, int)
    assert recipe.improve.lr == 1e-4
    assert recipe.grow.temperature == 0.5
    assert recipe.warm_start.enabled is False and recipe.improve.restart_from_base is True
    assert recipe.mlflow.model_name is None and recipe.model_name == "arithmetic-rest"
    assert (recipe.filter.kind, recipe.filter.k) == ("top_k", 2)
    assert recipe.grow_steps == 5
    assert recipe.reward == "my_pkg.rewards:fraction"
    # Untouched keys keep the file's values.
    assert recipe.warm_start.epochs == 30 and recipe.grow.max_new_tokens == 5


def test_overrides_create_nested_sections_and_keep_everything_after_the_first_equals_sign():
    recipe = load_recipe(
        DEMO,
        [
            "grow.sampler_options.base_url=http://127.0.0.1:8000/v1",
            "grow.sampler_options.extra.headers.x=1",
            "s3.endpoint_url=http://127.0.0.1:8333",
            "task.builtin=null",
            "task.prompts=data/a=b.jsonl",
            "task.eval=data/eval.jsonl",
            "mlflow.model_name=my-model",
        ],
    )
    assert recipe.grow.sampler_options == {"base_url": "http://127.0.0.1:8000/v1", "extra": {"headers": {"x": 1}}}
    assert recipe.s3.endpoint_url == "http://127.0.0.1:8333"
    assert recipe.task.builtin is None and recipe.task.prompts == "data/a=b.jsonl"
    assert recipe.model_name == "my-model"


def test_later_overrides_win_and_the_input_dict_is_the_one_changed():
    data = {"grow": {"samples_per_prompt": 8}}
    out = apply_overrides(data, ["grow.samples_per_prompt=2", "grow.samples_per_prompt=3", "seed=1"])
    assert out is data and data == {"grow": {"samples_per_prompt": 3}, "seed": 1}
    assert apply_overrides({}, ["name="]) == {"name": ""}


def test_a_recipe_of_only_a_name_takes_the_defaults(tmp_path):
    path = tmp_path / "minimal.yaml"
    path.write_text("name: minimal\n")
    recipe = load_recipe(path)
    assert recipe == Recipe(name="minimal")
    assert recipe.algorithm == "rest" and recipe.task.builtin == "arithmetic" and recipe.reward == "exact_match"


# -- mistakes name the key ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("grow.samples=4", "unknown key 'grow.samples'"),
        ("bogus=1", "unknown key 'bogus'"),
        ("warm_start.epoch=3", "unknown key 'warm_start.epoch'"),
        ("mlflow.tracking.uri=x", "unknown key 'mlflow.tracking'"),
    ],
)
def test_unknown_key_is_named(override, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(DEMO, [override])
    assert expected in str(err.value)
    assert one_sentence(str(err.value)), str(err.value)


def test_unknown_key_in_the_file_is_named(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(DEMO.read_text().replace("  samples_per_prompt: 8", "  samples_per_promt: 8"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "unknown key 'grow.samples_per_promt'" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("grow.samples_per_prompt=many", "grow.samples_per_prompt: expected a whole number"),
        ("grow.samples_per_prompt=2.5", "grow.samples_per_prompt: expected a whole number"),
        ("grow.samples_per_prompt=true", "grow.samples_per_prompt: expected a whole number, not true or false"),
        ("improve.epochs=2.0", "improve.epochs: expected a whole number"),
        ("improve.lr=true", "improve.lr: expected a number, not true or false"),
        ("grow.temperature=.nan", "grow.temperature: expected a finite number"),
        ("filter.dedupe=1", "filter.dedupe: expected true or false"),
        ("task.prompt_column=[a, b]", "task.prompt_column: Input should be a valid string"),
        ("lake=gs://bucket/lake", "lake: use file://PATH or s3://BUCKET/PREFIX; gs:// is not supported"),
        ("grow.samples_per_prompt=0", "grow.samples_per_prompt: Input should be greater than or equal to 1"),
        ("warm_start.enabled=maybe", "warm_start.enabled: expected true or false"),
        ("filter.kind=best", "filter.kind: Input should be 'rest', 'fixed', 'quantile' or 'top_k'"),
        ("grow.top_p=1.5", "grow.top_p: Input should be less than or equal to 1"),
        ("improve.lr=fast", "improve.lr: expected a number"),
        ("grow=3", "grow: Input should be a valid dictionary"),
        ("name=has space", "name: String should match pattern"),
        ("seed=null", "seed: Input should be a valid integer"),
    ],
)
def test_wrong_type_names_the_key_and_the_value(override, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(DEMO, [override])
    message = str(err.value)
    assert expected in message, message
    assert f"(got {yaml.safe_load(override.partition('=')[2])!r})" in message
    assert one_sentence(message), message


def test_numbers_written_the_yaml_way_still_load(tmp_path):
    """PyYAML reads ``1e-3`` (no dot) as a string: number fields take numeric strings, counts do not."""
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nimprove:\n  lr: 1e-3\ngrow:\n  temperature: '0.5'\n")
    recipe = load_recipe(path)
    assert recipe.improve.lr == 0.001 and recipe.grow.temperature == 0.5
    path.write_text("name: r\ngrow:\n  samples_per_prompt: '4'\n")
    with pytest.raises(RecipeError, match=re.escape("grow.samples_per_prompt: expected a whole number (got '4')")):
        load_recipe(path)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["filter.kind=fixed"], "filter.kind='fixed' needs filter.threshold"),
        (["filter.kind=quantile"], "filter.kind='quantile' needs filter.quantile"),
        (["filter.kind=top_k"], "filter.kind='top_k' needs filter.k"),
        (["task.builtin=null"], "task needs either `builtin` or both `prompts` and `eval` files"),
    ],
)
def test_incomplete_sections_say_what_is_missing(overrides, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(DEMO, overrides)
    assert expected in str(err.value)
    assert one_sentence(str(err.value)), str(err.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("grow.samples_per_prompt", "is not of the form dotted.key=value"),
        ("=3", "is not of the form dotted.key=value"),
        ("seed.x=1", "'seed' is not a section"),
    ],
)
def test_malformed_overrides(override, expected):
    with pytest.raises(RecipeError, match=re.escape(expected)):
        load_recipe(DEMO, [override])


def test_missing_unreadable_or_non_mapping_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="is not valid YAML"):
        load_recipe(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- name: x\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping"):
        load_recipe(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RecipeError, match=re.escape("name: Field required")):
        load_recipe(empty)


def test_every_seed_comes_from_the_recipe_s_one_derivation():
    """``Recipe.seed_for`` makes every stage's seed; the formulas are the first runs' (same data for the same seed)."""
    r = load_recipe(DEMO, ["seed=7"])
    assert [r.seed_for(s) for s in ("task", "base", "warm_start")] == [7, 7, 7]
    assert r.seed_for("grow", 2) == 7002 and r.seed_for("preference", 2) == 7002
    assert r.seed_for("improve", 2, 3) == 7023 and r.seed_for("pair", 2) == 9
    # Within a stream, iterations (and Improve steps, up to nine) never share a seed.
    assert len({r.seed_for("improve", g, i) for g in range(1, 20) for i in range(1, 10)}) == 19 * 9
    # Nothing else derives a seed from the recipe's.
    lines = [line for d in ("alignment", "tasks", "flows") for p in sorted((ROOT / d).rglob("*.py")) if p.name != "recipe.py"
             for line in p.read_text().splitlines() if re.search(r"recipe\.seed\b(?!_for)", line)]
    assert all('"seed": ref.recipe.seed,' in line for line in lines), lines  # the samples' manifest records it


# -- training sections -------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["warm_start", "improve", "preference"])
def test_each_training_section_becomes_its_trainer_config_in_one_conversion(stage):
    """``trainer_config`` carries every setting of a stage's section by name, adds what every stage takes from
    the rest of the recipe, and hands a loss section's checked loss settings on as they are."""
    from alignment.prompting import PromptFormat
    from alignment.train_settings import PreferenceConfig, TrainConfig, TrainSettings, trainer_config

    path = ROOT / "recipes" / ("arithmetic-dpo.yaml" if stage == "preference" else "arithmetic-rest.yaml")
    recipe = load_recipe(path, [f"{stage}.micro_batch_size=4", f"{stage}.lora_r=2", f"{stage}.group_by_length=true",
                                "model.dtype=bfloat16", "prompt.system=Add.", "prompt.stop=[';']"])
    section = getattr(recipe, stage)
    cfg = trainer_config(recipe, stage, seed=41)
    assert type(cfg) is (PreferenceConfig if stage == "preference" else TrainConfig)
    assert {name: getattr(cfg, name) for name in TrainSettings.model_fields} == section.model_dump(include=set(TrainSettings.model_fields))
    assert (cfg.seed, cfg.dtype, cfg.prompt) == (41, "bfloat16", PromptFormat(system="Add.", stop=(";",)))
    if stage == "preference":
        assert cfg.objective is recipe.preference and cfg.spec.name == "dpo"
    with pytest.raises(ValueError, match="frozen"):
        cfg.lr = 1.0


def test_lr_is_declared_once_for_every_trainer():
    """The recipe's sections and the trainers' configs are one hierarchy: a setting is declared once."""
    from alignment.reward_model import RewardModelConfig
    from alignment.train_settings import ImproveConfig, PreferenceConfig, PreferenceSettings, TrainSettings, WarmStart
    from alignment.training import TrainConfig

    for cls in (WarmStart, ImproveConfig, PreferenceSettings, TrainConfig, PreferenceConfig, RewardModelConfig):
        assert issubclass(cls, TrainSettings), cls
    declared = [p for d in ("alignment", "tasks", "flows") for p in sorted((ROOT / d).rglob("*.py"))
                if re.search(r"^\s+lr\s*:", p.read_text(), re.M)]
    assert [p.relative_to(ROOT).as_posix() for p in declared] == ["alignment/train_settings.py"]
