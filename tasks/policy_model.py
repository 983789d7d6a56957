"""The MLflow pyfunc wrapper of a policy checkpoint: ``models:/NAME@champion`` loads and generates."""

from __future__ import annotations

import mlflow.pyfunc


class FlywheelPolicy(mlflow.pyfunc.PythonModel):
    """Greedy completions for a list (or one-column frame) of prompts; ``params`` may set ``max_new_tokens``."""

    def load_context(self, context):
        from alignment.samplers.hf import TransformersSampler

        self.sampler = TransformersSampler(context.artifacts["checkpoint"], progress=False)

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        from alignment.samplers import SamplingParams

        prompts = [str(p) for p in model_input]
        max_new = int((params or {}).get("max_new_tokens", 32))
        gen = self.sampler.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=max_new))
        return [c[0] for c in gen.completions]
