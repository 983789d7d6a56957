"""The policy pyfunc as code: MLflow runs this file to build the model (``python_model=<this file>``)."""

from mlflow.models import set_model

from tasks.tracking.policy_model import FlywheelPolicy

set_model(FlywheelPolicy())
