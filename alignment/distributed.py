"""Data parallelism inside one training stage: the ranks, each rank's share of a step, the model's wrapping.

A training stage run with ``distributed.strategy: ddp`` or ``fsdp`` runs the same body in every rank
(``tasks.launch`` starts the ranks with torchrun or Ray Train and sets up the process group; NCCL on
CUDA, gloo on CPU). ``alignment.training.train_loop`` stays the one loop: it asks this module which
units of each optimiser step are this rank's and how to weight them, so the *global* batch is the
recipe's ``batch_size`` whatever the world size:

- the seeded order is the same in every rank; a step's units are split into contiguous blocks, one
  per rank (the first ``n % world`` ranks take one more), and each block into micro-batches;
- a micro-batch's loss is weighted by its share of the whole step times the world size, and the
  gradients are averaged over the ranks, so the step's gradient is the same weighted sum a single
  process computes (a rank with fewer units, or none, contributes its share, or nothing);
- ``ddp``: every rank holds the whole model, and after the step's backward passes the gradients are
  averaged in one all-reduce of a flat buffer, as ``DistributedDataParallel`` does (without its
  bucket overlap, so the loop's closures keep calling the plain model);
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every decoder layer, then the root:
  parameters, gradients and AdamW's state are 1/world per rank, all-gathered layer by layer for the
  forward and backward. Every rank runs the same number of forward/backward passes (a rank out of
  units runs one with weight 0), because each pass is a collective. On CUDA with ``dtype: bfloat16``
  (or ``float16``), ``MixedPrecisionPolicy`` computes in that dtype over float32 master weights and
  reduces gradients in float32 — the promise autocast makes in one process.

Rank 0 gathers the full state dict (``full_state_dict``) and alone writes the checkpoint. The no-grad
log-prob passes of a stage run as ranks (the reference policy's, GRPO's π_old and π_ref) split their rows
the same way (``map_rows``): each rank scores its block with a whole copy of the model, and every rank
gets all the rows back.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

STRATEGIES = ("none", "ddp", "fsdp")


class LayersNotFound(ValueError):
    """FSDP needs the model's repeated decoder layers, and this model does not name them."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a training stage (rank 0 of 1 outside a launch)."""

    rank: int = 0
    size: int = 1
    strategy: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP in a launch (at world size 1 too: one rank still trains through FSDP2 and its precision policy)."""
        return self.strategy == "fsdp"

    def share(self, step_units: Sequence[int]) -> list[int]:
        """This rank's contiguous block of a step's units (the first ``n % size`` ranks take one more)."""
        base, extra = divmod(len(step_units), self.size)
        start = self.rank * base + min(self.rank, extra)
        return list(step_units[start : start + base + (self.rank < extra)])

    def passes(self, step_size: int, micro: int) -> int:
        """Forward/backward passes every rank runs for a step of ``step_size`` units (FSDP: the same in all)."""
        mine = len(self.share(range(step_size)))
        if not self.sharded:
            return -(-mine // micro)
        busiest = -(-step_size // self.size)
        return -(-busiest // micro)

    def set_sync(self, model: torch.nn.Module, sync: bool) -> None:
        """FSDP reduce-scatters gradients only on a step's last pass; before it they accumulate unsharded."""
        if self.sharded and hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(sync)

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """DDP: average the step's gradients over the ranks (FSDP has already reduced them in backward)."""
        if self.strategy != "ddp" or self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def total(self, value: float) -> float:
        """The sum of ``value`` over the ranks (the step's global loss from each rank's weighted part)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def world(strategy: str = "none") -> World:
    """The current world: the process group's rank and size when one is set up, else rank 0 of 1."""
    if strategy == "none" or not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), strategy)


def map_rows(fn: Callable[[slice], list], rows: int, strategy: str) -> list:
    """``fn`` over this rank's contiguous block of ``rows`` (a no-grad pass split across the ranks); every rank
    gets every row's result, in row order. Outside a launch, ``fn(slice(0, rows))``."""
    w = world(strategy)
    if w.size == 1:
        return fn(slice(0, rows))
    block = w.share(range(rows))
    mine = fn(slice(block[0], block[-1] + 1)) if block else []
    gathered: list[Any] = [None] * w.size
    dist.all_gather_object(gathered, mine)
    return [item for part in gathered for item in part]


def init_process_group(timeout_s: float) -> World:
    """Join the ranks a launcher started (torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` environment).

    NCCL when CUDA is there (each rank on ``cuda:LOCAL_RANK``), gloo on CPU; every collective fails after
    ``timeout_s`` instead of waiting for a rank that died.
    """
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), os.environ.get("FLYWHEEL_STRATEGY", "ddp"))


def device() -> torch.device:
    """The device of this rank: its GPU under a launch on a GPU node, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, named by transformers' ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``…)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise LayersNotFound(
            f"distributed.strategy is 'fsdp' but {type(model).__name__} declares no decoder layer class to shard "
            "(transformers' _no_split_modules): use distributed.strategy: ddp for this model."
        )
    return layers


def prepare(model: torch.nn.Module, w: World, dtype: str) -> torch.nn.Module:
    """``model`` ready for this world: sharded per decoder layer then at the root (FSDP), or one copy per rank
    with rank 0's weights (DDP, so adapters initialised in each rank start equal)."""
    if w.size == 1 and not w.sharded:
        return model
    if w.sharded:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        low = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        cuda = next(model.parameters()).device.type == "cuda"
        policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if (low and cuda) else MixedPrecisionPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)
    return model


def uses_fsdp_precision(model: torch.nn.Module, dtype: str) -> bool:
    """Whether FSDP's mixed-precision policy already casts the compute (then autocast stays off)."""
    return dtype != "float32" and hasattr(model, "set_requires_gradient_sync") and next(model.parameters()).device.type == "cuda"


def full_state_dict(model: torch.nn.Module, w: World) -> dict[str, Any] | None:
    """The whole model's weights on rank 0's CPU (every rank must call it: FSDP gathers), ``None`` on the others."""
    if w.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if w.main else None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()} if w.main else None


def records(strategy: str) -> dict[str, float]:
    """What a training stage records of how it ran: ``world_size`` and each rank's peak memory in MiB
    (``peak_memory_mib_rank{r}``; every rank must call it, it gathers)."""
    w = world(strategy)
    peak = peak_memory_mib()
    peaks = [peak] * w.size
    if w.size > 1:
        gathered: list[Any] = [None] * w.size
        dist.all_gather_object(gathered, peak)
        peaks = [float(p) for p in gathered]
    return {"world_size": float(w.size), **{f"peak_memory_mib_rank{r}": round(p, 1) for r, p in enumerate(peaks)}}


def peak_memory_mib() -> float:
    """This process's peak memory so far: the GPU allocator's peak on CUDA, else the resident set's peak."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
