"""Prefect tasks, one file per stage, plus the lake I/O.

Tasks take and return references — URIs, model versions, small config objects — never models,
engines, clients or DataFrames. Retries live here, on I/O only.
"""
