"""Real model shapes walk the real path: BPE tokenizers, ChatML, two end ids, no pad, a BOS post-processor.

The fixtures (tests/real_models.py) are built locally and briefly trained, so greedy decoding ends at
``<|im_end|>`` after a question and at ``<|endoftext|>`` — the *second* end id in
``generation_config``, not the tokenizer's ``eos_token`` — after an order. flywheel's evaluation and
Grow must give, row for row, what transformers alone gives with the model's own template and
generation config; training labels must be exactly the completion and the end-of-turn token.

Run: ``.venv/bin/python -m pytest tests/test_real_models.py -q``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from alignment import filters
from alignment.evaluation import score_heldout
from alignment.logprobs import sequence_logps
from alignment.models import load_policy
from alignment.prompting import IGNORE, Formatter, formatter_for
from alignment.rewards import numeric_match
from alignment.samplers import SamplingParams
from alignment.samplers.hf import TransformersSampler
from alignment.training import encode_pairs
from tests.real_models import BOS, ENDOFTEXT, IM_END, build, sums, transformers_alone

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "arithmetic-rest.yaml"
DATA = sums(12, seed=9)
PROMPTS = [p for p, _ in DATA]
REFS = [a for _, a in DATA]
IDS = list(range(len(PROMPTS)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real-models")
    return {
        "qwen2": build(root / "qwen2", "qwen2"),  # pad = <|endoftext|>, as Qwen2.5 ships
        "llama-no-pad": build(root / "llama", "llama", pad=False),
        "llama-bos-raw": build(root / "llama-bos", "llama", bos=True, chat=False),  # no template, BOS post-processor
    }


@pytest.mark.parametrize("name", ["qwen2", "llama-no-pad", "llama-bos-raw"])
def test_eval_and_greedy_grow_equal_transformers_alone(models, name):
    path = models[name]
    expected = transformers_alone(path, PROMPTS, 8, chat=name != "llama-bos-raw")
    assert any(expected) and len(set(expected)) > 1, "the fixture should answer something"
    one = TransformersSampler(str(path), batch_size=1, device="cpu", progress=False)  # prompt.format: auto
    frame, metrics = score_heldout(one, IDS, PROMPTS, REFS, numeric_match, max_new_tokens=8)
    assert frame["completion"].to_list() == expected
    assert set(frame["finish_reason"]) == {"stop"}
    assert metrics["eval_accuracy"] == pytest.approx(sum(numeric_match(PROMPTS, expected, REFS)) / len(PROMPTS))
    # Grow at temperature 0, batched with left padding: the same text for every sample.
    grow = TransformersSampler(str(path), batch_size=64, device="cpu", progress=False)
    out = grow.generate(PROMPTS, 2, SamplingParams(temperature=0.0, max_new_tokens=8, seed=5), IDS)
    assert out.completions == [[e, e] for e in expected]


def test_a_completion_ends_at_the_second_end_id_with_no_special_text(models):
    path = models["qwen2"]
    model, tok = load_policy(path, device="cpu")
    eot = tok.convert_tokens_to_ids(ENDOFTEXT)
    orders = [p for p in PROMPTS if p.startswith("Add")]
    fmt = formatter_for(model, tok)
    assert tok.eos_token == IM_END and eot in fmt.end_ids and eot != tok.eos_token_id
    # Stopping at the tokenizer's eos_token alone runs past <|endoftext|>: the bug this guards against.
    only_eos = []
    for order in orders:
        ids = torch.tensor([fmt.prompt_ids(order)])
        with torch.no_grad():
            only_eos.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist())
    assert eot in only_eos[0][:-1], "the fixture ends orders with <|endoftext|>"
    # One prompt a batch, as the references above: this is about where a completion ends, not about padding.
    gen = TransformersSampler(str(path), batch_size=1, device="cpu", progress=False).generate(orders, 1, SamplingParams(0.0, 1.0, 8))
    for text, reason, n, ran_on in zip(gen.completions, gen.finish_reasons, gen.num_tokens, only_eos, strict=True):
        end = next(i for i, t in enumerate(ran_on) if t in fmt.end_ids)  # the first of either end id
        assert reason == ["stop"]
        assert "<|" not in text[0] and text[0] == tok.decode(ran_on[:end], skip_special_tokens=True)
        assert n == [len(tok(text[0], add_special_tokens=False)["input_ids"]) + 1]  # the end token counts


def test_a_length_cut_sample_is_recorded_and_kept_out_of_training(models):
    gen = TransformersSampler(str(models["qwen2"]), device="cpu", progress=False).generate(
        PROMPTS, 1, SamplingParams(0.0, 1.0, max_new_tokens=1)
    )
    reasons = [r[0] for r in gen.finish_reasons]
    assert "length" in reasons
    scored = pl.DataFrame({
        "prompt_id": IDS, "sample_idx": [0] * len(IDS), "completion": [c[0] for c in gen.completions],
        "reward": [1.0] * len(IDS), "finish_reason": reasons,
    })  # fmt: skip
    kept = filters.at_least(filters.drop_truncated(scored), 0.5)
    assert kept.height == reasons.count("stop") and (kept["finish_reason"] == "stop").all()


def test_templated_sft_labels_are_the_completion_and_the_end_of_turn_token(models):
    model, tok = load_policy(models["qwen2"], device="cpu")
    prompt, completion = "What is 12 plus 3?", "15"
    [(ids, labels)] = encode_pairs(tok, [prompt], [completion], formatter_for(model, tok))
    assert tok.decode([t for t in labels if t != IGNORE]) == completion + IM_END
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    p_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[: len(p_ids)] == p_ids and labels[: len(p_ids)] == [IGNORE] * len(p_ids)
    # The preference trainer scores exactly these ids: log π(completion + <|im_end|> | templated prompt).
    logp, length = sequence_logps(model, tok, [prompt], [completion])
    c_ids = ids[len(p_ids):]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    manual = sum(logprobs[len(p_ids) + k - 1, t].item() for k, t in enumerate(c_ids))
    assert math.isclose(logp.item(), manual, abs_tol=1e-4) and length.item() == len(c_ids)
    # A truncated completion (kept on purpose) trains without an end token.
    [(_, cut)] = encode_pairs(tok, [prompt], [completion], formatter_for(model, tok), finished=[False])
    assert tok.decode([t for t in cut if t != IGNORE]) == completion


def test_special_tokens_once_bos_from_the_post_processor_and_none_twice(models):
    model, tok = load_policy(models["llama-bos-raw"], device="cpu")
    bos = tok.convert_tokens_to_ids(BOS)
    fmt = formatter_for(model, tok)
    assert not fmt.chat
    ids, labels = fmt.example("Add 3 and 4.", "7")
    assert ids[0] == bos and ids.count(bos) == 1 and labels[0] == IGNORE
    # A tokenizer with no pad token pads with its end id; nothing is added to the vocabulary.
    model, tok = load_policy(models["llama-no-pad"], device="cpu")
    assert formatter_for(model, tok).pad_id in formatter_for(model, tok).end_ids


def test_a_chat_format_without_a_template_and_a_prompt_past_the_context_are_one_sentence(models):
    from alignment.errors import UserError

    _, tok = load_policy(models["llama-bos-raw"], device="cpu")
    with pytest.raises(UserError, match="no chat template"):
        Formatter(tok, {"format": "chat"})
    model, tok = load_policy(models["qwen2"], device="cpu")
    with pytest.raises(UserError, match=r"1 of the prompts are too long: the longest is \d+ tokens"):
        formatter_for(model, tok).check_prompts(["What is 1 plus 2?", "word " * 200], 8)


# -- through the CLI, as a user runs it -------------------------------------------------------------


def flywheel(tmp: Path, *sets: str, run: str = "r") -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "flows.cli", "run", str(RECIPE), "--run-name", run,
            "--set", f"lake=file://{tmp / 'lake'}", "--set", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def user_task(tmp: Path, prompts: list[str]) -> list[str]:
    answers = dict(sums(12, seed=9))
    rows = [{"prompt": p, "reference": answers.get(p, "1")} for p in prompts]
    (tmp / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp / "labelled.jsonl").write_text(json.dumps({"prompt": prompts[0], "completion": "1"}))
    return ["task.builtin=null", f"task.prompts={tmp / 'train.jsonl'}", f"task.eval={tmp / 'eval.jsonl'}"]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("flywheel:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def manifests(tmp: Path) -> list[Path]:
    return list((tmp / "lake").rglob("_manifest.json")) if (tmp / "lake").exists() else []


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("long_prompt", "too long"),
        ("chat_without_template", "no chat template"),
        ("unknown_dtype", "model.dtype"),
        ("stop_not_strings", "prompt.stop"),
        ("labelled_reference_missing", "'answer'"),
    ],
)
def test_bad_model_input_is_one_sentence_and_writes_nothing(models, tmp_path, case, expect):
    task = user_task(tmp_path, PROMPTS[:4])
    sets = {
        "long_prompt": [f"model.path={models['qwen2']}", *user_task(tmp_path, PROMPTS[:3] + ["word " * 200])],
        "chat_without_template": [f"model.path={models['llama-bos-raw']}", "prompt.format=chat", *task],
        "unknown_dtype": ["model.dtype=float64"],
        "stop_not_strings": ["prompt.stop=5"],
        "labelled_reference_missing": [
            f"model.path={models['qwen2']}", *task, f"task.labelled={tmp_path / 'labelled.jsonl'}",
            "task.labelled_reference_column=answer",
        ],
    }[case]
    proc = flywheel(tmp_path, "warm_start.enabled=false", *sets)
    assert expect in one_line_error(proc)
    assert manifests(tmp_path) == []


def test_a_user_instruct_model_runs_a_rest_iteration_from_the_cli(models, tmp_path):
    """Baseline and one Grow/Improve step on the Qwen2 fixture: templated, stopped at both end ids."""
    task = user_task(tmp_path, PROMPTS)
    proc = flywheel(
        tmp_path, f"model.path={models['qwen2']}", *task, "reward=numeric_match", "warm_start.enabled=false",
        "grow_steps=1", "grow.samples_per_prompt=2", "grow.max_new_tokens=6", "eval.max_new_tokens=6", "improve.epochs=1",
        run="qwen",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lake = tmp_path / "lake"
    evals = pl.read_parquet(next((lake / "eval" / "run=qwen" / "iteration=0" / "step=0").glob("*.parquet")))
    assert evals.sort("prompt_id")["completion"].to_list() == transformers_alone(models["qwen2"], PROMPTS, 6)
    samples = pl.read_parquet(list((lake / "samples" / "run=qwen" / "iteration=1").glob("*.parquet")))
    assert set(samples["finish_reason"]) <= {"stop", "length"} and not samples["completion"].str.contains("<\\|").any()
    assert "accuracy" in proc.stdout
