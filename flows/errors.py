"""The errors that are the user's to fix: the CLI prints their one sentence, not a traceback.

This module is imported by the CLI only once a command has been parsed; ``tasks.s3`` brings boto3
(about a tenth of a second), which every lake command needs anyway.
"""

from alignment.recipe import RecipeError
from alignment.rewards import RewardError
from tasks.inputs import InputError
from tasks.lake import StageNotFound
from tasks.s3 import LakeAccessError

USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError, RewardError, InputError, StageNotFound, LakeAccessError)
