"""Prefect tasks, one module per stage, with the stage runner (``placement``, ``gpu``) and the run reference (``context``).

Tasks take and return references — URIs, model versions, small config objects — never models,
engines, clients or DataFrames. Retries live here, on I/O only. Beside the stages: ``tasks.lake``
(the lake library, no Prefect, no MLflow), ``tasks.tracking`` (MLflow) and ``tasks.report`` (what a
person reads about a run).
"""
