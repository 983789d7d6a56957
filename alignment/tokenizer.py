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
