"""The benches' realistic model and data: a Llama of tens of millions of parameters, built here.

``build_bench_model`` trains a byte-level BPE tokenizer (ChatML template, ``<|im_end|>`` ending a turn,
as ``alignment.tokenizer.build_bpe_tokenizer`` builds it) on a synthetic corpus and saves a randomly
initialised Llama over it with ``alignment.models.build_tiny_model`` — nothing is downloaded. At its
default size (8 layers, 512 wide, 8 heads, a vocabulary of 8192) it has about 38M parameters; the
weights are random, so its completions run to ``max_new_tokens``, which is what a throughput bench
wants (every sample costs the same on both sides).

The corpus is seeded pseudo-English: 4000 made-up words drawn from a Zipf law, in sentences of 6–20
words, so the BPE merges look like a real vocabulary's (frequent words are one token, rare ones
split). ``prompts`` gives prompts of 50–200 tokens once the chat template is applied, and
``completions`` gives answers of a set token length.

The benches import it as a sibling module (``from realistic import ...``): each runs as a script
from the repository root, with ``bench/`` first on ``sys.path``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

_SYLLABLES = (
    "ka ra ti lo me nu sa de vi po le ma ri to na be ko si du fe ga hi jo mu ne pa qu re so ta "
    "ul ve wi xa yo za an el in on us ar er ir or ur est ing ion ent al"
).split()


@dataclass(frozen=True)
class BenchModel:
    path: Path
    params: int
    shape: str  # e.g. "llama 8x512, vocab 8192"


def _words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


class Corpus:
    """Seeded pseudo-English sentences over a Zipf-distributed vocabulary of made-up words."""

    def __init__(self, seed: int = 0, words: int = 4000):
        self.rng = random.Random(seed)
        self.words = _words(words, seed)
        self.weights = [1.0 / (rank + 1) for rank in range(words)]

    def sentence(self) -> str:
        n = self.rng.randint(6, 20)
        ws = self.rng.choices(self.words, self.weights, k=n)
        return ws[0].capitalize() + " " + " ".join(ws[1:]) + self.rng.choice((".", ".", ".", "?", "!"))

    def text(self, sentences: int) -> str:
        return " ".join(self.sentence() for _ in range(sentences))


def build_bench_model(
    out_dir: str | Path,
    *,
    n_layer: int = 8,
    n_embd: int = 512,
    n_head: int = 8,
    vocab_size: int = 8192,
    n_positions: int = 512,
    seed: int = 0,
) -> BenchModel:
    """Build (or reuse, when ``out_dir`` already holds it) the bench's Llama and BPE tokenizer.

    ``seed`` seeds the weights only: models of one shape share the tokenizer whatever their seed."""
    from alignment.models import build_tiny_model

    out = Path(out_dir)
    if not (out / "config.json").exists():
        corpus = Corpus(seed=0)  # the same tokenizer whatever the weights' seed
        texts = [corpus.text(8) for _ in range(3000)]
        build_tiny_model(
            texts, out, arch="llama", tokenizer="bpe", vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd,
            n_head=n_head, n_positions=n_positions, seed=seed,
        )  # fmt: skip
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(out, local_files_only=True)
    params = _param_count(cfg)
    return BenchModel(out, params, f"llama {cfg.num_hidden_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size}")


def _param_count(cfg) -> int:
    """Parameters of a Llama with tied embeddings, from its config (no need to load the weights)."""
    d, f, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d  # q, o; k, v; gate, up, down; two norms
    return v * d + layers * per_layer + d


def prompts(tokenizer, count: int, *, seed: int = 1, min_tokens: int = 50, max_tokens: int = 200) -> list[str]:
    """``count`` prompts whose chat-templated token length is spread over ``[min_tokens, max_tokens]``."""
    rng = random.Random(seed)
    corpus = Corpus(seed=0)  # the tokenizer's own vocabulary
    corpus.rng = rng
    out: list[str] = []
    for i in range(count):
        target = min_tokens + (max_tokens - min_tokens) * i // max(1, count - 1)
        words = ("Summarise the following notes in one paragraph. " + corpus.text(2 * max_tokens // 10)).split(" ")
        lo, hi = 1, len(words)
        while lo < hi:  # the longest prefix of words whose chat-templated length is within ``target``
            mid = (lo + hi + 1) // 2
            if _chat_len(tokenizer, " ".join(words[:mid])) <= target:
                lo = mid
            else:
                hi = mid - 1
        out.append(" ".join(words[:lo]))
    rng.shuffle(out)
    return out


def completions(tokenizer, count: int, tokens: int, *, seed: int = 2) -> list[str]:
    """``count`` answers of about ``tokens`` tokens each (cut on a word boundary)."""
    corpus = Corpus(seed=0)
    corpus.rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = corpus.text(12).split(" ")
        lo, hi = 1, len(words)
        while lo < hi:  # the longest prefix of words within ``tokens``
            mid = (lo + hi + 1) // 2
            if len(tokenizer(" ".join(words[:mid]), add_special_tokens=False)["input_ids"]) <= tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append(" ".join(words[:lo]))
    return out


def _chat_len(tokenizer, text: str) -> int:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
