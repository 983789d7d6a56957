"""Prefect flows that read like the algorithms, the deployments, and the ``flywheel`` CLI."""
