"""A character-level tokenizer whose vocabulary comes from the data, with a chat template.

Every character is one token, so ``decode(encode(x)) == x`` for any text made of characters seen
when the vocabulary was built. The ``Fuse`` decoder matters: a ``WordLevel`` model decodes with
spaces between tokens without it.

The tokenizer has the shape real instruct models have, so the built-in task walks the same path
as a user's model: a chat template (``<|user|>…<|end|><|assistant|>``), an end-of-turn token
``<|end|>`` distinct from its ``eos_token`` and from padding — the model's ``generation_config``
lists both end ids, as instruct models ship them.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}" + SYSTEM + "{{ m['content'] }}" + END
    + "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}" + END
    + "{% else %}" + ASSISTANT + "{{ m['content'] }}" + END + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def build_char_tokenizer(texts: Iterable[str], *, chat: bool = True) -> PreTrainedTokenizerFast:
    """One token per distinct character in ``texts``, plus pad, eos, unk and (``chat``) the chat tokens."""
    chars = sorted({c for text in texts for c in text})
    specials = [PAD, EOS, UNK] + ([SYSTEM, USER, ASSISTANT, END] if chat else [])
    vocab = {tok: i for i, tok in enumerate(specials)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # "[\s\S]" rather than "." so newlines are tokens too.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# -- byte-level BPE with ChatML, the shape of most open instruct models -----------------------------

IM_START, IM_END, ENDOFTEXT, BPE_PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``, with a ChatML template and ``<|im_end|>`` ending a turn.

    Any text round-trips (bytes are the alphabet), digits are split one per token so numbers stay
    learnable for a tiny model, and the special tokens are ``<|endoftext|>`` (EOS), ``<|im_start|>``,
    ``<|im_end|>`` (end of turn) and a separate ``<|pad|>``.
    """
    from tokenizers import trainers

    specials = [ENDOFTEXT, IM_START, IM_END, BPE_PAD]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts) + ["system user assistant"], trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=BPE_PAD, additional_special_tokens=[IM_START, IM_END],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
