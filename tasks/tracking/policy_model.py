"""The MLflow pyfunc wrapper of a policy checkpoint: ``models:/NAME@champion`` loads and generates.

Logged as code (``tasks/tracking/policy_entry.py``, MLflow's models-from-code), not as a pickled object: the
run's prompt format and dtype travel in the model's ``model_config``.

It formats prompts and stops exactly as the flywheel run did (``alignment.prompting``: the chat
template, every end id, the recipe's stop strings), so the served model answers like the evaluated
one. ``params`` may set ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p`` and ``seed``.
"""

from __future__ import annotations

import mlflow.pyfunc

PARAMS = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "seed": 0}


class FlywheelPolicy(mlflow.pyfunc.PythonModel):
    """Completions for a list (or one-column frame) of prompts."""

    def load_context(self, context):
        from alignment.samplers.hf import TransformersSampler

        config = dict(getattr(context, "model_config", None) or {})
        self.sampler = TransformersSampler(
            context.artifacts["checkpoint"], prompt=config.get("prompt"), dtype=config.get("dtype", "float32"),
            progress=False,
        )

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        from alignment.samplers import SamplingParams

        if hasattr(model_input, "iloc"):  # a DataFrame: its first column holds the prompts
            model_input = model_input.iloc[:, 0].tolist()
        prompts = [str(p) for p in model_input]
        p = {**PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        sampling = SamplingParams(
            temperature=float(p["temperature"]), top_p=float(p["top_p"]),
            max_new_tokens=int(p["max_new_tokens"]), seed=int(p["seed"]),
        )
        gen = self.sampler.generate(prompts, 1, sampling)
        return [c[0] for c in gen.completions]
