"""Pretraining on the run scaffolding: the model folder and the run beside it, resume, graceful stops,
and the data order a resumed run shares with an uninterrupted one."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from posttrain.errors import PosttrainError
from posttrain.trainers.pretrain import PretrainConfig, RowOrder, train


def tiny_corpus(path, n=240):
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 40), rng.randint(1, 40)
            f.write(json.dumps(f"Ann has {a} apples and buys {b} more. How many apples does she have?\n"
                               f"{a} + {b} = {a + b}. The answer is {a + b}.") + "\n")
    return path


TINY = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, seq_len=32,
            batch_size=4, max_steps=8, warmup_steps=2, logging_steps=1, save_steps=1, save_dtype="fp32")


def tiny_flags():
    return [x for k, v in TINY.items() for x in (f"--{k.replace('_', '-')}", v)]


def test_row_order_is_the_stateful_loops_and_follows_from_the_step():
    n_rows, per_step, seed = 10, 4, 3
    g = torch.Generator().manual_seed(seed)  # the loop pretraining ran before it could resume
    order, want = torch.randperm(n_rows, generator=g), []
    for step in range(15):
        start = (step * per_step) % max(1, n_rows - per_step + 1)
        if start < per_step and step > 0:
            order = torch.randperm(n_rows, generator=g)
        want.append(order[start:start + per_step].tolist())
    rows = RowOrder(n_rows, per_step, seed)
    assert [rows.rows(s).tolist() for s in range(15)] == want
    assert rows.rows(14).tolist() == want[14]  # a step retried (its loss was not finite) reads the same rows
    resumed = RowOrder(n_rows, per_step, seed)
    assert [resumed.rows(s).tolist() for s in range(9, 15)] == want[9:]
    with pytest.raises(ValueError):
        resumed.rows(3)


def test_pretraining_writes_the_model_and_a_resumable_run_beside_it(tmp_path, capsys):
    corpus = tiny_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "nano"
    final = train(PretrainConfig(output=str(out), corpus=str(corpus), **TINY))
    assert final["finished"] and final["step"] == 8 and final["parameters"] > 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    record = json.loads((out / "pretrain.json").read_text())
    assert record["tokens_seen"] == 8 * 4 * 32 and record["final_loss"] == final["loss"]
    logs = tmp_path / "nano.logs"
    steps = [json.loads(line)["step"] for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    assert json.loads((logs / "run_state.json").read_text())["step"] == 8 and (logs / "pretrain_config.json").is_file()
    assert [p.name for p in sorted((logs / "checkpoints").iterdir())] == ["step-7", "step-8"]  # save_total_limit 2
    with pytest.raises(PosttrainError, match="already holds a run"):
        train(PretrainConfig(output=str(out), corpus=str(corpus), **TINY))
    assert train(PretrainConfig(output=str(out), corpus=str(corpus), resume=True, **TINY))["step"] == 8
    assert "already finished" in capsys.readouterr().out
    more = train(PretrainConfig(output=str(out), corpus=str(corpus), resume=True, **{**TINY, "max_steps": 10}))
    assert more["step"] == 10 and "resumed from" in capsys.readouterr().out
    with pytest.raises(PosttrainError, match="--resume: --learning-rate"):
        train(PretrainConfig(output=str(out), corpus=str(corpus), resume=True, **{**TINY, "max_steps": 12, "learning_rate": 1e-2}))


def test_pretrain_options_out_of_range_are_one_line_errors(tmp_path):
    with pytest.raises(PosttrainError, match="save-dtype"):
        PretrainConfig(save_dtype="int8")
    with pytest.raises(PosttrainError, match="save_steps"):
        PretrainConfig(save_steps=-1)
    with pytest.raises(PosttrainError, match="contradict"):
        PretrainConfig(resume=True, overwrite=True)


def test_sigterm_stops_pretraining_with_a_checkpoint_and_resume_reaches_the_same_weights(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    corpus = tiny_corpus(tmp_path / "corpus.jsonl")
    flags = ["--corpus", corpus, *tiny_flags(), "--max-steps", 40, "--save-steps", 0]
    env = dict(os.environ, TQDM_DISABLE="1")
    clean = subprocess.run([sys.executable, "-m", "posttrain", "pretrain", "--output", tmp_path / "clean", *map(str, flags)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    out = tmp_path / "term"
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "pretrain", "--output", str(out), *map(str, flags)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = tmp_path / "term.logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "checkpoint saved" in err and f"--resume --output {out}" in err and "Traceback" not in err
    assert not (out / "model.safetensors").exists() and not (tmp_path / "term.logs" / "run_state.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "posttrain", "pretrain", "--output", str(out), *map(str, flags), "--resume"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    want, got = load_file(str(tmp_path / "clean" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
