"""The errors that are the user's to fix: the CLI prints their one sentence, not a traceback."""

from alignment.recipe import RecipeError
from alignment.rewards import RewardError
from tasks.inputs import InputError
from tasks.lake import StageNotFound

USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError, RewardError, InputError, StageNotFound)
