"""MLflow, in one place: the run's tracking lifecycle, model registration and the champion gate.

- ``probe``: is the tracking URI reachable (the standard library only, so ``flywheel run`` checks it
  before any model library loads);
- ``registry``: the parent and per-iteration MLflow runs (``start_tracking``, ``tracked``,
  ``end_tracking``), the ``register`` task that logs a checkpoint as a model version, and the gate
  that moves the ``champion`` alias only on improvement;
- ``policy_model`` / ``policy_entry``: the pyfunc a registered version loads as (MLflow's
  models-from-code), so ``mlflow models serve`` answers prompts with the policy.

Import the submodules directly: this package's ``__init__`` loads nothing, so a check that needs only
the probe does not pay for importing MLflow.
"""
