"""Where ``FlywheelPolicy`` lived before MLflow's code moved to ``tasks/tracking``.

A registered model version carries its entry file (``tasks/tracking/policy_entry.py`` as it was at
registration), and versions registered before the move import ``tasks.policy_model``; this keeps them
loading with ``mlflow.pyfunc.load_model``.
"""

from tasks.tracking.policy_model import FlywheelPolicy

__all__ = ["FlywheelPolicy"]
