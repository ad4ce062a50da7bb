"""Fault injection: runs (SFT, RL, pretraining) killed with SIGKILL at several points resume to the weights an
uninterrupted run reaches; a pipeline killed mid-stage, or left with a half-written model folder, completes on rerun."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

SFT = ["--method", "lora", "--lora-dropout", "0", "--max-steps", "10", "--per-device-batch-size", "8",
       "--gradient-accumulation-steps", "1", "--train-limit", "64", "--eval-steps", "0", "--save-steps", "1",
       "--report-to", "none", "--max-len", "300", "--learning-rate", "5e-3"]
RL = ["--method", "lora", "--lora-dropout", "0", "--max-steps", "6", "--num-generations", "4", "--per-device-batch-size", "8",
      "--gradient-accumulation-steps", "1", "--max-new-tokens", "8", "--engine", "hf", "--eval-steps", "0", "--save-steps", "1",
      "--report-to", "none", "--train-limit", "32", "--learning-rate", "1e-2"]


def _cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    return subprocess.Popen([sys.executable, "-m", "posttrain", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _kill_when(proc, ready, timeout=180):
    """SIGKILL ``proc`` as soon as ``ready()`` holds; returns whether it was still running."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return alive


def _rows(out):
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _finish(args):
    proc = _cli(args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    return stdout


@pytest.mark.parametrize("command,opts,kill_points", [("sft", SFT, (2, 6)), ("rl", RL, (3,))])
def test_killed_runs_resume_to_the_uninterrupted_weights(tiny_model_dir, tmp_path, command, opts, kill_points):
    clean = tmp_path / "clean"
    _finish([command, "--model", tiny_model_dir, "--output", clean, *opts])
    out = tmp_path / "killed"
    for i, rows in enumerate(kill_points):
        args = [command, "--model", tiny_model_dir, "--output", out, *opts] + (["--resume"] if i else [])
        assert _kill_when(_cli(args), lambda r=rows: _rows(out) >= r), "the run ended before it could be killed"
        assert not (out / "run_state.json").exists()
    said = _finish([command, "--model", tiny_model_dir, "--output", out, *opts, "--resume"])
    assert "resumed from" in said
    wa, wb = load_file(str(clean / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == (10 if command == "sft" else 6)
    assert not list((out / "checkpoints").glob(".*"))  # no temp folder of an interrupted save is left



def test_killed_pretraining_resumes_to_the_uninterrupted_weights(tmp_path):
    from test_pretrain import tiny_corpus, tiny_flags

    opts = ["pretrain", "--corpus", tiny_corpus(tmp_path / "corpus.jsonl"), *tiny_flags(), "--max-steps", "12"]
    _finish([*opts, "--output", tmp_path / "clean"])
    out, logs = tmp_path / "killed", tmp_path / "killed.logs"
    for i, rows in enumerate((2, 7)):
        assert _kill_when(_cli([*opts, "--output", out] + (["--resume"] if i else [])), lambda r=rows: _rows(logs) >= r), \
            "the run ended before it could be killed"
        assert not (logs / "run_state.json").exists() and not (out / "model.safetensors").exists()
    assert "resumed from" in _finish([*opts, "--output", out, "--resume"])
    wa, wb = load_file(str(tmp_path / "clean" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)
    steps = [json.loads(line)["step"] for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    assert not list((logs / "checkpoints").glob(".*"))

def _pipeline_yaml(tmp_path, model_dir):
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(f"""model: {model_dir}
task: gsm_symbolic
eval: {{limit: 6, max_new_tokens: 6, batch_size: 6}}
sft: {{method: full, max_steps: 3, train_limit: 16, per_device_batch_size: 4, gradient_accumulation_steps: 1,
      eval_steps: 0, save_steps: 1, report_to: [], max_len: 300}}
rl: {{method: full, max_steps: 8, num_generations: 2, per_device_batch_size: 8, gradient_accumulation_steps: 1,
     max_new_tokens: 6, eval_steps: 0, save_steps: 1, report_to: [], beta: 0.0, train_limit: 16}}
""")
    return cfg


def test_pipeline_killed_mid_stage_completes_on_rerun(tiny_model_dir, tmp_path):
    cfg, out = _pipeline_yaml(tmp_path, tiny_model_dir), tmp_path / "p"
    proc = _cli(["pipeline", "--config", cfg, "--output", out])
    assert _kill_when(proc, lambda: _rows(out / "rl") >= 2)
    assert not (out / "summary.json").exists()
    said = _finish(["pipeline", "--config", cfg, "--output", out])
    assert "[sft] already finished" in said and "resumed from" in said
    assert [s["name"] for s in json.loads((out / "summary.json").read_text())["stages"]] == ["base", "sft", "rl"]


def test_pipeline_remakes_a_half_written_model_folder(tiny_model_dir, tmp_path):
    cfg, out = _pipeline_yaml(tmp_path, tiny_model_dir), tmp_path / "p"
    _finish(["pipeline", "--config", cfg, "--output", out])
    (out / "sft" / "model" / "model.safetensors").unlink()  # what a kill during the old, non-atomic copy left
    for stage in ("eval_sft", "rl", "eval_rl"):
        import shutil

        shutil.rmtree(out / stage)
    said = _finish(["pipeline", "--config", cfg, "--output", out])
    assert "is incomplete" in said and (out / "sft" / "model" / "model.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["stages"][2]["name"] == "rl"
