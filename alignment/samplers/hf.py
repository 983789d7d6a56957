"""The ``transformers`` sampler: batched generation with per-sample seeds.

Sampling is Gumbel-max: ``argmax(logits / T + g)`` with ``g ~ Gumbel(0, 1)`` draws a token from
``softmax(logits / T)`` (restricted to the top-p nucleus when ``top_p < 1``). The noise is
counter-based: ``g[row, v]`` at decoding step ``t`` is a hash of ``(row seed, t, v)``, where the row seed
comes from ``(seed, prompt_id, sample_idx)``, computed for the whole batch with a few integer tensor
ops (no per-row random generators, so one step's noise costs the same on CPU and GPU whatever the
batch). A sample is therefore the same whatever the batch size, prompt order or shard it lands in —
the property that lets a resumed or sharded Grow reproduce an uninterrupted one row for row.

A batch's n samples of one prompt share its key/value cache: each distinct prompt's prefix runs once
(not once per sample) into a cache allocated for the whole generation, which ``generate`` then
continues; the prefix pass is deterministic, so this changes no sample.

With ``SamplingParams.logprobs`` each sample also comes with its generated ids and their log-probs
under the model, read from the forward passes that chose them (``_TokenLogps``), so held-out
evaluation needs no second pass of the policy to know ``log π(completion | prompt)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from alignment.models import load_policy
from alignment.progress import Ticker
from alignment.prompting import PromptFormat, formatter_for
from alignment.samplers import Generation, SamplingParams, request_ids, row_seed


class _GumbelNoise(LogitsProcessor):
    """Adds Gumbel noise that is a pure function of (row seed, step, token id); greedy decoding then samples exactly."""

    def __init__(self, seeds: list[int], prompt_width: int, device: torch.device):
        self.keys = torch.tensor([s & _MASK63 for s in seeds], dtype=torch.int64, device=device)
        self.prompt_width = prompt_width  # the step is the number of tokens generated so far

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        u = counter_uniform(self.keys, input_ids.shape[1] - self.prompt_width, scores.shape[-1])
        gumbel = u.log_().neg_().log_().neg_()
        return scores + gumbel.to(scores.dtype)


_MASK63 = 2**63 - 1


def _int(value: int, bits: int) -> int:
    """``value`` modulo 2**bits as a signed integer of that width (torch has no unsigned 32/64-bit arithmetic)."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _shr(x: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Logical right shift of signed ``bits``-wide integers (torch's ``>>`` is arithmetic)."""
    return (x >> n) & ((1 << (bits - n)) - 1)


def counter_uniform(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Uniform floats in (0, 1), shape ``(len(keys), vocab)``: element ``[r, v]`` depends only on ``(keys[r], step, v)``.

    Each row's key and the step go through splitmix64 (int64, one value per row); each
    ``(row, token)`` element then through a 32-bit integer hash (Wellons' ``lowbias32``, int32 ops, which
    vectorise on CPU and GPU alike). The top 23 bits make ``(k + 0.5) / 2**23``, exact in float32.
    """
    # splitmix64 of key + (step + 1) * golden, per row.
    x = keys + _int((step + 1) * 0x9E3779B97F4A7C15, 64)
    x = (x ^ _shr(x, 30, 64)) * _int(0xBF58476D1CE4E5B9, 64)
    x = (x ^ _shr(x, 27, 64)) * _int(0x94D049BB133111EB, 64)
    x = x ^ _shr(x, 31, 64)
    row = (_shr(x, 32, 64) ^ (x & 0xFFFFFFFF)).to(torch.int32)  # < 2**32: wraps into int32
    token = (torch.arange(vocab, device=keys.device, dtype=torch.int64) * 0x9E3779B9 & 0xFFFFFFFF).to(torch.int32)
    h = row.unsqueeze(1) ^ token  # (rows, vocab); int32 products below wrap, as the hash wants
    h ^= _shr(h, 16, 32)
    h *= _int(0x7FEB352D, 32)
    h ^= _shr(h, 15, 32)
    h *= _int(0x846CA68B, 32)
    h ^= _shr(h, 16, 32)
    return _shr(h, 9, 32).float().add_(0.5).mul_(2.0**-23)


class _TokenLogps:
    """Each generated token's log-probability under the model, from the forward pass that chose it.

    A forward hook on the model keeps the log-softmax of each step's last logits — the model's own, before
    any logits processor (a repetition penalty a model's ``generation_config`` declares, temperature,
    top-p, the Gumbel noise), so they are ``log π`` as a teacher-forced pass computes it. A step's token is
    known at the next step (the last input id of its forward pass), the last one from ``generate``'s
    output. Keeping one step's ``(rows, vocab)`` at a time is why this is not ``output_logits``, which
    holds every step's: gigabytes over a real vocabulary and a long completion.
    """

    def __init__(self, model):
        self.model = model
        self.chosen: list[torch.Tensor] = []  # (rows,) per generated token, on the model's device
        self.last: torch.Tensor | None = None

    def __enter__(self) -> _TokenLogps:
        self.handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _hook(self, module, args, kwargs, output) -> None:
        if self.last is not None:
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            self.chosen.append(self.last.gather(1, ids[:, -1:]).squeeze(1))
        self.last = output.logits[:, -1].float().log_softmax(-1)

    def per_token(self, new: torch.Tensor) -> torch.Tensor:
        """``(rows, steps)`` log-probs of ``new``, the ids ``generate`` returned past the prompt.

        ``generate`` may run one step more than it returns (a deferred stop check undoes it): that
        step's pass already named the last returned token, and its own log-probs are dropped.
        """
        steps = new.shape[1]
        if steps == 0:
            return new.new_zeros((new.shape[0], 0), dtype=torch.float32)
        if len(self.chosen) < steps:
            self.chosen.append(self.last.gather(1, new[:, -1:]).squeeze(1))
        return torch.stack(self.chosen[:steps], 1)


class TransformersSampler:
    """Sample from a local Hugging Face causal LM, ``batch_size`` sequences at a time.

    Prompts are formatted and tokenised by ``alignment.prompting`` (chat template, special tokens
    once); generation stops at every end id the model declares and at ``prompt.stop`` strings.
    """

    def __init__(
        self,
        model_path: str,
        *,
        batch_size: int = 256,
        device: str | None = None,
        dtype: str = "float32",
        prompt: PromptFormat | dict | None = None,
        trust_remote_code: bool = False,
        progress: bool = True,
    ):
        self.model, self.tokenizer = load_policy(model_path, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
        self.formatter = formatter_for(self.model, self.tokenizer, prompt)
        self.batch_size = batch_size
        self.progress = progress

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[str], n: int, params: SamplingParams, prompt_ids: Sequence[int] | None = None
    ) -> Generation:
        ids = request_ids(prompts, n, prompt_ids)
        fmt = self.formatter
        encoded = fmt.check_prompts(prompts, params.max_new_tokens)
        rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
        # Sort by prompt length so a batch holds similar lengths: less padding, same results.
        rows.sort(key=lambda r: len(encoded[r[0]]))
        out: dict[tuple[int, int], tuple[str, str, int]] = {}
        tokens: dict[tuple[int, int], tuple[list[int], list[float]]] = {}  # with params.logprobs
        config = GenerationConfig(
            do_sample=False, max_new_tokens=params.max_new_tokens, pad_token_id=fmt.pad_id, eos_token_id=list(fmt.end_ids),
        )
        batches = range(0, len(rows), self.batch_size)
        tick = Ticker(len(rows), "samples")
        for start in tqdm(batches, desc="sampling", unit="batch", disable=None if self.progress else True, leave=False):
            batch = rows[start : start + self.batch_size]
            input_ids, mask = _left_pad([encoded[i] for i, _ in batch], fmt.pad_id, self.model.device)
            processors = LogitsProcessorList()
            if params.temperature > 0:
                if params.temperature != 1.0:  # dividing by 1 changes nothing
                    processors.append(TemperatureLogitsWarper(params.temperature))
                if params.top_p < 1.0:
                    processors.append(TopPLogitsWarper(params.top_p))
                seeds = [row_seed(params.seed, ids[i], j) for i, j in batch]
                processors.append(_GumbelNoise(seeds, input_ids.shape[1], self.model.device))
            cache = self._shared_prefix_cache([encoded[i] for i, _ in batch], input_ids.shape[1], params.max_new_tokens)
            recorder = _TokenLogps(self.model) if params.logprobs else None
            with recorder or contextlib.nullcontext():
                generated = self.model.generate(
                    input_ids=input_ids, attention_mask=mask, generation_config=config, logits_processor=processors,
                    **({"past_key_values": cache} if cache is not None else {}),
                )  # fmt: skip
            new = generated[:, input_ids.shape[1] :]
            logps = recorder.per_token(new).tolist() if recorder is not None else None
            for k, (row, seq) in enumerate(zip(batch, new.tolist(), strict=True)):
                out[row] = fmt.finish(seq)
                if logps is not None:
                    tokens[row] = (seq[: out[row][2]], logps[k][: out[row][2]])
            tick(len(out))
        each = lambda at, d: [[d[(i, j)][at] for j in range(n)] for i in range(len(prompts))]  # noqa: E731
        return Generation(
            completions=each(0, out), finish_reasons=each(1, out), num_tokens=each(2, out),
            prompt_token_ids=encoded if tokens else [], token_ids=each(0, tokens) if tokens else [],
            token_logps=each(1, tokens) if tokens else [],
        )

    def _shared_prefix_cache(self, seqs: list[list[int]], width: int, max_new_tokens: int) -> DynamicCache | None:
        """The batch's key/value cache over every prompt but its last token, each distinct prompt run once.

        The batch is left-padded to ``width``; ``generate`` then runs the last prompt column and decodes.
        Two savings over handing ``generate`` the padded batch as it is: the prompt pass runs once per
        distinct prompt, not once per sample (a prompt's n samples share their prefix), over groups of
        prompts of similar length (little padding); and the cache is allocated for the whole generation,
        so a decoding step writes one column where the default cache re-copies all of it. ``None``
        (plain ``generate``) for a model whose cache is not plain full attention (sliding windows,
        linear attention, encoder-decoder), or when no prompt has more than one token.
        """
        model = self.model
        if width < 2 or model.config.is_encoder_decoder or not _plain_cache(model.config):
            return None
        distinct: dict[tuple[int, ...], int] = {}
        where = [distinct.setdefault(tuple(s), len(distinct)) for s in seqs]  # row -> distinct prompt
        prefixes = [list(p[:-1]) for p in distinct]
        order = sorted(range(len(prefixes)), key=lambda u: len(prefixes[u]))
        past = width - 1  # the prefix columns: every row's prompt but its last token, left-padded
        capacity = width + max_new_tokens
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        rows_of: list[list[int]] = [[] for _ in prefixes]
        for r, u in enumerate(where):
            rows_of[u].append(r)
        device = model.device
        unfilled: list[tuple[torch.Tensor, int]] = []  # (rows, columns before their group's first column)
        for group in _length_groups(order, [len(p) for p in prefixes]):
            group_width = max(len(prefixes[u]) for u in group)
            dest = torch.tensor([r for u in group for r in rows_of[u]], device=device)
            unfilled.append((dest, past - group_width))
            if group_width == 0:
                continue  # one-token prompts: the whole prefix is padding
            ids, mask = _left_pad([prefixes[u] for u in group], self.formatter.pad_id, device)
            positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 0)  # as generate() derives them
            cache = DynamicCache(config=model.config)
            model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                  **self._logits_to_keep)  # fmt: skip
            src = torch.tensor([k for k, u in enumerate(group) for _ in rows_of[u]], device=device)
            for layer_idx, layer in enumerate(cache.layers):
                if len(keys) <= layer_idx:  # columns past the prompt are written before attention reads them
                    shape = (len(seqs), layer.keys.shape[1], capacity, layer.keys.shape[3])
                    keys.append(layer.keys.new_empty(shape))
                    values.append(layer.values.new_empty((*shape[:3], layer.values.shape[3])))
                keys[layer_idx][dest, :, past - group_width : past] = layer.keys[src]
                values[layer_idx][dest, :, past - group_width : past] = layer.values[src]
        if not keys:
            return None
        for buffer in (*keys, *values):  # padding left of a group's columns: masked, but must not be NaN
            for dest, start in unfilled:
                if start:
                    buffer[dest, :, :start] = 0
        cache = DynamicCache(config=model.config)
        cache.layers = [_PreallocatedLayer(k, v, past) for k, v in zip(keys, values, strict=True)]
        return cache

    @property
    def _logits_to_keep(self) -> dict:
        """``logits_to_keep=1`` where the model takes it: the prompt pass needs only the cache, not its logits."""
        import inspect

        return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}


def _plain_cache(config) -> bool:
    """Whether the model's default cache is full attention in every layer (what ``_PreallocatedLayer`` replaces)."""
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config the cache cannot read: leave it to generate()
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _length_groups(order: list[int], lengths: list[int], waste: float = 0.25) -> list[list[int]]:
    """``order`` (indices by ascending length) cut into runs whose left-padding adds at most ``waste`` of their tokens."""
    groups: list[list[int]] = []
    for u in order:
        group = groups[-1] if groups else None
        if group is not None and (len(group) + 1) * lengths[u] <= (1 + waste) * (sum(lengths[v] for v in group) + lengths[u]):
            group.append(u)
        else:
            groups.append([u])
    return groups


class _PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer in a buffer sized for the whole generation.

    ``DynamicLayer`` concatenates each step's keys and values onto the cache, copying all of it per
    token; this writes the new column in place and hands attention a view of the filled part (the same
    values, so the same logits). It grows by doubling should generation outrun the buffer.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self._keys, self._values, self._length = keys, values, length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._view()

    def _view(self) -> None:
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            grow = max(end, 2 * self._keys.shape[-2]) - self._keys.shape[-2]
            self._keys = torch.cat([self._keys, self._keys.new_zeros((*self._keys.shape[:2], grow, self._keys.shape[3]))], -2)
            self._values = torch.cat([self._values, self._values.new_zeros((*self._values.shape[:2], grow, self._values.shape[3]))], -2)
        self._keys[:, :, self._length : end] = key_states
        self._values[:, :, self._length : end] = value_states
        self._length = end
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s) :] = torch.tensor(s)
            mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)
