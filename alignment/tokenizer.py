"""A character-level tokenizer whose vocabulary comes from the data.

Every character is one token, so ``decode(encode(x)) == x`` for any text made of
characters seen when the vocabulary was built. The ``Fuse`` decoder matters: a
``WordLevel`` model decodes with spaces between tokens without it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def build_char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build a tokenizer with one token per distinct character in ``texts`` (plus pad, eos, unk)."""
    chars = sorted({c for text in texts for c in text})
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # "[\s\S]" rather than "." so newlines are tokens too.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
