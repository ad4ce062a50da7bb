"""Data parallelism on CPU: two ranks (gloo, started by torchrun as ``accelerate launch`` would) give
the update one rank gives on the whole batch, and only rank 0 writes and prints."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model, random_rl_batch, run_torchrun


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_ranks_of_8_give_the_rl_gradient_of_one_rank_of_16(tmp_path, loss_type):
    from posttrain.trainers.rl import RLConfig, update
    from posttrain.trainers.run import make_accelerator

    out = tmp_path / "grads.pt"
    r = run_torchrun(2, "tests/dist_update.py", out, loss_type)
    assert r.returncode == 0, r.stderr[-3000:]
    two = torch.load(out)
    model = make_tiny_model(384).train()
    cfg = RLConfig(algo="grpo", loss_type=loss_type, beta=0.1, num_generations=4, per_device_batch_size=4,
                   gradient_accumulation_steps=4, max_new_tokens=8)
    finite, stats = update(model, random_rl_batch(384, n=16), cfg, make_accelerator())
    assert finite
    for name, p in model.named_parameters():
        torch.testing.assert_close(two["grads"][name], p.grad, atol=1e-6, rtol=1e-4)
    assert two["stats"]["loss"] == pytest.approx(stats["loss"], rel=1e-4, abs=1e-6)


def test_a_non_finite_loss_on_one_rank_ends_the_step_on_both(tmp_path):
    """Rank 0's loss is NaN in its first micro-batch: both ranks finish the update (no rank leaves
    the other waiting in the gradients' all-reduce), rank 0 says the step was not finite, rank 1 that
    its own was; the optimizer step then skips it on every rank (``skip_step`` takes the minimum)."""
    out = tmp_path / "nan"
    r = run_torchrun(2, "tests/dist_update.py", out, "grpo", "nan", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert (rank0["finite"], rank0["stats"]) == (False, {}) and rank1["finite"] is True and "loss" in rank1["stats"]


def _sft_args(model_dir, out, accum):
    return ["-m", "posttrain", "sft", "--model", model_dir, "--output", out, "--method", "lora", "--lora-dropout", 0,
            "--max-steps", 2, "--per-device-batch-size", 8, "--gradient-accumulation-steps", accum, "--eval-steps", 0,
            "--save-steps", 1, "--train-limit", 64, "--report-to", "none", "--learning-rate", 1e-2, "--max-len", 300]


def test_sft_on_two_ranks_equals_one_rank_and_only_rank_0_writes(tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_torchrun(1, *_sft_args(tiny_model_dir, one, 2))
    r2 = run_torchrun(2, *_sft_args(tiny_model_dir, two, 1))
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("done: step 2") == 1 and r2.stdout.count("data: ") == 1  # rank 0 alone prints
    wa, wb = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one writer: no row twice
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert "destroy_process_group" not in r2.stderr  # torch warns when a process group is left open


def test_rl_on_two_ranks_runs_and_only_rank_0_writes(tiny_model_dir, tmp_path):
    out = tmp_path / "rl"
    r = run_torchrun(2, "-m", "posttrain", "rl", "--model", tiny_model_dir, "--output", out, "--method", "lora",
                     "--max-steps", 2, "--num-generations", 4, "--per-device-batch-size", 4, "--gradient-accumulation-steps", 2,
                     "--max-new-tokens", 8, "--engine", "hf", "--eval-steps", 2, "--eval-samples", 8, "--train-limit", 32,
                     "--report-to", "none", "--save-steps", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done: step 2") == 1 and r.stdout.count("rl: grpo") == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and "eval_accuracy" in rows[-1]
    assert (out / "adapter_model.safetensors").exists() and json.loads((out / "run_state.json").read_text())["finished"]
