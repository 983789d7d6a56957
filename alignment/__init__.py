"""The machine learning of flywheel: rewards, filters, samplers, training, the built-in task.

No orchestration and no storage lives here: pure functions and small classes over
tensors, lists and polars DataFrames. Heavy optional engines (vLLM) are imported
inside the functions that use them, so ``import alignment`` stays cheap.
"""
