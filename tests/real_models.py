"""Locally built models of the shapes people bring (no download): ByteLevel BPE tokenizers, a ChatML
template, two end ids in ``generation_config`` — ``<|im_end|>`` and ``<|endoftext|>``, as
Qwen2.5-Instruct ships them — a tokenizer with no pad token, and one whose post-processor adds BOS.

Each model is briefly trained (plain torch, not flywheel's trainer) on sums in its prompt format, ending
its turn with ``<|im_end|>`` after "What is a plus b?" and with ``<|endoftext|>`` after "Add a and b.",
so greedy decoding really stops at either end id — the paths a random model would never reach.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

IM_START, IM_END, ENDOFTEXT, BOS = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def sums(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, answer) pairs in two phrasings: questions end with <|im_end|>, orders with <|endoftext|>."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        a, b = rng.randrange(50), rng.randrange(10)
        out.append((f"What is {a} plus {b}?" if k % 2 == 0 else f"Add {a} and {b}.", str(a + b)))
    return out


def bpe_tokenizer(corpus: list[str], *, pad: bool = True, bos: bool = False, chat: bool = True) -> PreTrainedTokenizerFast:
    """A ByteLevel BPE tokenizer trained on ``corpus`` with ChatML special tokens."""
    specials = [ENDOFTEXT, IM_START, IM_END] + ([BOS] if bos else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT if pad else None, bos_token=BOS if bos else None,
        additional_special_tokens=[IM_START], model_max_length=128,
    )
    if chat:
        fast.chat_template = CHATML
    return fast


def build(out: Path, arch: str = "llama", *, pad: bool = True, bos: bool = False, chat: bool = True, steps: int = 300) -> Path:
    """Build, briefly train and save a model of ``arch`` (llama or qwen2); returns its directory.

    300 steps, so every fixture's greedy answers differ from prompt to prompt on each CPU seen: at 150,
    float rounding on one machine left the qwen2 fixture answering "1" to every sum."""
    data = sums(400, seed=1)
    corpus = [f"{p} {a}" for p, a in data] + ["assistant user system"]
    tok = bpe_tokenizer(corpus, pad=pad, bos=bos, chat=chat)
    im_end, eot = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)
    common = dict(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=im_end, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    examples = []
    for prompt, answer in data:
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
            p = tok(text, add_special_tokens=False)["input_ids"]
        else:
            p = tok(prompt)["input_ids"]
        c = tok(answer, add_special_tokens=False)["input_ids"] + [im_end if prompt.startswith("What") else eot]
        examples.append((p + c, [-100] * len(p) + c))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    model.train()
    for _ in range(steps):
        batch = rng.sample(examples, 32)
        width = max(len(x) for x, _ in batch)
        ids = torch.tensor([x + [0] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.generation_config = GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=tok.pad_token_id, do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def transformers_alone(path: Path, prompts: list[str], max_new_tokens: int, *, chat: bool = True) -> list[str]:
    """What a user gets from transformers by hand: the chat template, greedy ``generate`` with the
    model's own ``generation_config`` (both end ids), one prompt at a time, special tokens skipped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    out = []
    for prompt in prompts:
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out
