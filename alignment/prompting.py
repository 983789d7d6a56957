"""Text → tokens, in one place: the prompt format, the end of a completion, and the training labels.

Every path that turns a prompt (and a completion) into token ids goes through a ``Formatter``:
sampling on every backend, SFT, preference log-probs, reward-model inputs, evaluation and the
served pyfunc. That is what keeps "what the model was trained to see" equal to "what it is asked":

- **Format.** ``auto`` uses the tokenizer's chat template when it has one, else the raw prompt;
  ``chat`` insists on the template (an optional system message goes first); ``raw`` never uses it.
  A chat prompt is ``apply_chat_template(messages, add_generation_prompt=True)`` tokenised *without*
  extra special tokens (the template writes its own BOS when it wants one); a raw prompt gets the
  tokenizer's special tokens exactly once (e.g. a BOS its post-processor adds), never an EOS.
- **Stopping.** A completion ends at the first of: any end id — the tokenizer's ``eos_token_id``, the
  model's ``generation_config.eos_token_id`` (an int or a list, as instruct models ship two), the
  template's end-of-turn token — or a stop string. Stored completions never contain special-token
  text; ``finish_reason`` is ``stop`` when the model ended it and ``length`` when ``max_new_tokens``
  cut it off.
- **Labels.** A training example is ``prompt ids + completion ids + [end id]`` with the prompt
  masked; the end id is the template's end-of-turn token for chat (``<|im_end|>`` for ChatML) and
  the tokenizer's EOS for raw. A truncated completion is trained, when a recipe asks for it,
  without an end token. Sequences never exceed ``max_length``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignment.errors import ConfigError

FORMATS = ("auto", "chat", "raw")
IGNORE = -100
STOP, LENGTH = "stop", "length"
_PROBE = "Zq7XxWv9"  # an assistant message whose rendering reveals the template's end-of-turn text
_HUGE = 1_000_000  # tokenizers report int(1e30) as "no limit"


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are shown to the model: the recipe's ``prompt`` section, as a plain value."""

    format: str = "auto"
    system: str | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    max_length: int | None = None  # None: the model's context window

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"prompt.format is {self.format!r}; use one of {', '.join(FORMATS)}.")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"prompt.stop must be a list of non-empty strings (got {list(self.stop)!r}).")

    @classmethod
    def of(cls, value: PromptFormat | dict[str, Any] | None) -> PromptFormat:
        if value is None:
            return cls()
        if isinstance(value, PromptFormat):
            return value
        return cls(**{**value, "stop": tuple(value.get("stop") or ())})


def _ids(value: int | Iterable[int] | None) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class Formatter:
    """The prompt format of one tokenizer (and, when known, one model's config and generation config)."""

    def __init__(self, tokenizer, fmt: PromptFormat | dict | None = None, *, model_config=None, generation_config=None):
        self.tokenizer = tokenizer
        self.fmt = PromptFormat.of(fmt)
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.fmt.format == "chat" and not has_template:
            raise ConfigError(
                "prompt.format is 'chat' but the model's tokenizer has no chat template; "
                "use prompt.format: raw (or auto), or give the tokenizer a chat_template."
            )
        self.chat = self.fmt.format == "chat" or (self.fmt.format == "auto" and has_template)
        if self.fmt.system and not self.chat:
            raise ConfigError("prompt.system needs a chat template (prompt.format chat or auto with a templated tokenizer).")
        eos = _ids(tokenizer.eos_token_id)
        turn = self._end_of_turn() if self.chat else None
        # The id appended to a finished training completion: what the model emits to end its turn.
        self.end_id = turn if turn is not None else (eos[0] if eos else None)
        if self.end_id is None:
            raise ConfigError("The model's tokenizer has no eos_token; set one (tokenizer.eos_token) so completions can end.")
        ends = [self.end_id, *eos, *_ids(getattr(generation_config, "eos_token_id", None))]
        self.end_ids: tuple[int, ...] = tuple(dict.fromkeys(ends))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        self.max_length = self._max_length(model_config)

    # -- the prompt ---------------------------------------------------------------------------

    def messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.fmt.system}] if self.fmt.system else []
        return [*system, {"role": "user", "content": prompt}]

    def render(self, prompt: str) -> str:
        """The prompt as text, exactly as the model sees it (for servers that take text)."""
        if not self.chat:
            return prompt
        return self.tokenizer.apply_chat_template(self.messages(prompt), add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.chat:
            return self._encode(self.render(prompt))
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        while ids and ids[-1] in self.end_ids:  # a post-processor that appends EOS would end the prompt
            ids = ids[:-1]
        return ids

    # -- the completion -----------------------------------------------------------------------

    def completion_ids(self, completion: str, finished: bool = True) -> list[int]:
        return self._encode(completion) + ([self.end_id] if finished else [])

    def example(self, prompt: str, completion: str, finished: bool = True) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)``: prompt masked, completion (+ end id when finished) as labels, cut to max_length."""
        p = self.prompt_ids(prompt)
        c = self.completion_ids(completion, finished)
        ids, labels = (p + c)[: self.max_length], ([IGNORE] * len(p) + c)[: self.max_length]
        return ids, labels

    def finish(self, generated: Sequence[int]) -> tuple[str, str, int]:
        """``(text, finish_reason, num_tokens)`` of generated ids (padding after an end id is ignored).

        ``num_tokens`` counts the completion's tokens including the one that ended it.
        """
        seq = list(generated)
        cut = next((k for k, t in enumerate(seq) if t in self.end_ids), None)
        if cut is not None:
            text, reason, n = self.decode(seq[:cut]), STOP, cut + 1
        else:
            text, reason, n = self.decode(seq), LENGTH, len(seq)
        hit = self._first_stop(text)
        if hit is not None:
            n = self._tokens_until(seq[: n], text[: hit[1]])
            text, reason = text[: hit[0]], STOP
        return text, reason, n

    def cut_text(self, text: str, finish_reason: str) -> tuple[str, str]:
        """Apply the stop strings to a completion that arrived as text (remote samplers)."""
        hit = self._first_stop(text)
        return (text[: hit[0]], STOP) if hit is not None else (text, finish_reason)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- lengths ------------------------------------------------------------------------------

    def check_prompts(self, prompts: Sequence[str], max_new_tokens: int, what: str = "prompts") -> list[list[int]]:
        """Token ids of every prompt, or one sentence when any leaves no room for ``max_new_tokens``."""
        encoded = [self.prompt_ids(p) for p in prompts]
        room = self.max_length - max_new_tokens
        over = [len(e) for e in encoded if len(e) > room]
        if over:
            raise ConfigError(
                f"{len(over)} of the {what} are too long: the longest is {max(over)} tokens, and with "
                f"max_new_tokens={max_new_tokens} a prompt may have at most {room} tokens of the model's "
                f"{self.max_length}; shorten them, lower max_new_tokens, or raise model.max_length if the model allows."
            )
        return encoded

    # -- internals ----------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _end_of_turn(self) -> int | None:
        """The first special token the template writes after an assistant message (``<|im_end|>`` for ChatML)."""
        msgs = self.messages("1")
        try:
            head = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            full = self.tokenizer.apply_chat_template(
                [*msgs, {"role": "assistant", "content": _PROBE}], tokenize=False
            )
        except Exception as exc:  # a template that cannot render a plain user/assistant exchange
            raise ConfigError(f"The tokenizer's chat template cannot render a user prompt ({exc}); use prompt.format: raw.") from None
        at = full.find(_PROBE, len(head) - 1 if full.startswith(head) else 0)
        if at < 0:
            return None
        tail = self._encode(full[at + len(_PROBE) :])
        special = set(self.tokenizer.all_special_ids) | set(getattr(self.tokenizer, "added_tokens_decoder", {}) or {})
        return next((t for t in tail if t in special), None)

    def _max_length(self, model_config) -> int:
        limits = [self.fmt.max_length]
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(model_config, name, None)
            if isinstance(value, int) and value > 0:
                limits.append(value)
                break
        tok_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_limit, int) and 0 < tok_limit < _HUGE:
            limits.append(tok_limit)
        known = [v for v in limits if v]
        if self.fmt.max_length and len(known) > 1 and self.fmt.max_length > min(known[1:]):
            raise ConfigError(
                f"model.max_length is {self.fmt.max_length} but the model's context is {min(known[1:])} tokens; "
                "set model.max_length at or below it (or leave it null)."
            )
        return min(known) if known else _HUGE

    def _first_stop(self, text: str) -> tuple[int, int] | None:
        """``(start, end)`` of the earliest stop string in ``text``."""
        best = None
        for s in self.fmt.stop:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, i + len(s))
        return best

    def _tokens_until(self, seq: list[int], prefix: str) -> int:
        """The fewest leading tokens of ``seq`` whose text contains ``prefix`` (binary search over decodes)."""
        lo, hi = 1, len(seq)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.decode(seq[:mid]).startswith(prefix):
                hi = mid
            else:
                lo = mid + 1
        return hi


def formatter_for(model, tokenizer, fmt: PromptFormat | dict | None = None) -> Formatter:
    """The formatter of a loaded model: its config's context and its generation config's end ids."""
    return Formatter(
        tokenizer, fmt, model_config=getattr(model, "config", None),
        generation_config=getattr(model, "generation_config", None),
    )
