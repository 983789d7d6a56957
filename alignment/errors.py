"""The one error hierarchy for mistakes that are the user's to fix.

Anything raised as a ``UserError`` is final: no task retries it, and the CLI prints its message
as one ``flywheel:`` sentence with exit code 2 and no traceback, whether it was raised before the
flow started or inside a task. This module imports no model library, so the CLI can catch these
errors without paying for torch.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's recipe, data, reward, model, lake or names; the message says what to do."""


class ConfigError(UserError):
    """A recipe value that passed validation but cannot work with what it points at (a model, a tokenizer)."""


class RunFailure(RuntimeError):
    """Something failed while the run was working that the user can act on (a training rank that died, a
    service that went away): the CLI prints its message as one ``flywheel:`` sentence with exit code 1
    and no traceback, and the run stays resumable."""
