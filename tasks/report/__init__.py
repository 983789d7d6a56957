"""What a person reads about a run: the summary and console table, the HTML report, and the Prefect
artifacts and MLflow plots published after each iteration.

- ``summary``: ``summary.json`` as the run goes (``Summary``), the console table, the summary artifact;
- ``html``: ``flywheel report``, one self-contained HTML page from the lake alone;
- ``artifacts``: the per-iteration Prefect artifacts and MLflow plots;
- ``plots``: the figures both the report and the MLflow plots draw with.

Import the submodules directly: this package's ``__init__`` loads nothing (no matplotlib, no MLflow).
"""
