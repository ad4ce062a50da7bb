"""SFT: masked loss against hand computation, packing equivalence, learning, resume, merge, CLI."""

import json
import math
import os
import shutil

import pytest
import torch

from conftest import make_tiny_model, run_cli
from posttrain.errors import PosttrainError
from posttrain.losses.sft import IGNORE_INDEX, masked_nll_mean, masked_nll_sum
from posttrain.trainers.metrics import read_metrics
from posttrain.trainers.sft import SFTConfig, Tokenized, pack, pad_right, tokenize_examples, train


def test_masked_nll_matches_hand_computation():
    # One sequence of 4 tokens over a vocabulary of 3; only the last two tokens are response.
    logits = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 0]])
    # logits[1] predicts token 2, logits[2] predicts token 0.
    lse1 = math.log(1 + math.exp(2) + 1)
    lse2 = math.log(1 + 1 + math.exp(3))
    expected = (lse1 - 0.0) + (lse2 - 0.0)
    total, n = masked_nll_sum(logits, labels)
    assert n.item() == 2 and total.item() == pytest.approx(expected, rel=1e-6)
    assert masked_nll_mean(logits, labels).item() == pytest.approx(expected / 2, rel=1e-6)


def test_masked_positions_get_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 2, 2, IGNORE_INDEX, IGNORE_INDEX]])
    masked_nll_sum(logits, labels)[0].backward()
    # Position t's logits are used only if label t+1 is counted.
    used = torch.zeros(2, 5, dtype=torch.bool)
    used[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert torch.all(logits.grad[~used] == 0)
    assert torch.all(logits.grad[used].abs().sum(-1) > 0)
    # The loss reads only the counted labels: changing a counted one changes it, and the masked
    # positions' logits can be anything.
    other = labels.clone()
    other[0, 2] = 5
    assert masked_nll_sum(logits.detach(), other)[0].item() != masked_nll_sum(logits.detach(), labels)[0].item()
    scrambled = logits.detach().clone()
    scrambled[~used] = torch.randn_like(scrambled[~used]) * 100
    assert masked_nll_sum(scrambled, labels)[0].item() == pytest.approx(masked_nll_sum(logits.detach(), labels)[0].item(), rel=1e-6)


def test_packed_forward_equals_separate_forwards(tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer))
    seqs = [Tokenized([1, 5, 9, 13, 7], [IGNORE_INDEX] * 2 + [9, 13, 7]), Tokenized([1, 8, 3], [IGNORE_INDEX, 8, 3]),
            Tokenized([1, 4, 4, 6, 2, 9, 11], [IGNORE_INDEX] * 3 + [6, 2, 9, 11])]
    with torch.no_grad():
        packed = pack(seqs, "cpu")
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        offset = 0
        for s in seqs:
            alone = model(input_ids=torch.tensor([s.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[offset:offset + len(s.input_ids)], alone, atol=1e-5, rtol=1e-4)
            offset += len(s.input_ids)
        # And the summed loss is the same packed or padded.
        padded = pad_right(seqs, 0, "cpu")
        a = masked_nll_sum(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits, padded["labels"])
        b = masked_nll_sum(logits[None], packed["labels"])
        assert a[1] == b[1] and a[0].item() == pytest.approx(b[0].item(), rel=1e-5)


def test_truncation_policy_keeps_answers(tiny_tokenizer):
    from posttrain.tasks import make_task

    task = make_task("gsm_symbolic", train_size=40, test_size=5)
    exs = task.examples("train")
    data, stats = tokenize_examples(task, exs, tiny_tokenizer, max_len=300, truncation="prompt_left")
    assert stats["truncated"] + stats["dropped"] > 0
    for d in data:
        assert len(d.input_ids) <= 300
    # every kept example still ends with its full answer and EOS
    for d in data:
        resp = [t for t, lab in zip(d.input_ids, d.labels) if lab != IGNORE_INDEX]
        assert resp[-1] == tiny_tokenizer.eos_token_id and "####" in tiny_tokenizer.decode(resp)
    with pytest.raises(PosttrainError, match="longer than max_len"):
        tokenize_examples(task, exs[:3], tiny_tokenizer, max_len=10, truncation="drop")


def _cfg(model_dir, out, **kw):
    base = dict(model=str(model_dir), task="gsm_symbolic", train_limit=32, output=str(out), max_steps=4,
                per_device_batch_size=4, gradient_accumulation_steps=2, learning_rate=5e-3, eval_steps=0,
                save_steps=2, report_to=[], max_len=300, max_tokens_per_forward=600, seed=3)
    base.update(kw)
    return SFTConfig(**base)


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_training_lowers_the_loss(tiny_model_dir, tmp_path):
    final = train(_cfg(tiny_model_dir, tmp_path / "a", max_steps=12, train_limit=8, per_device_batch_size=8,
                       gradient_accumulation_steps=1, learning_rate=2e-2, lora_dropout=0.0))
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert final["finished"] and len(rows) == 12
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]


def test_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    train(_cfg(tiny_model_dir, tmp_path / "full"))
    b = tmp_path / "resumed"
    train(_cfg(tiny_model_dir, b))
    # Make b look interrupted after step 2: drop everything written after that checkpoint.
    shutil.rmtree(b / "checkpoints" / "step-4")
    for f in ("run_state.json", "adapter_model.safetensors"):
        (b / f).unlink()
    train(_cfg(tiny_model_dir, b, resume=True))
    wa, wb = _adapter(tmp_path / "full"), _adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)
    # The checkpoint holds only the trainable weights, not the base model.
    ckpt = b / "checkpoints" / "step-4" / "model.safetensors"
    assert ckpt.stat().st_size < 2 * (b / "adapter_model.safetensors").stat().st_size + 10000
    # Resuming a finished run does nothing and says so.
    assert train(_cfg(tiny_model_dir, b, resume=True))["finished"]


def test_existing_output_needs_resume_or_overwrite(tiny_model_dir, tmp_path):
    from posttrain.rundir import RunDir

    run = RunDir.open(tmp_path / "x", "sft")  # a run posttrain made, that logged a step
    run.entry("metrics.jsonl").write_text('{"step": 1}\n')
    run.release()
    with pytest.raises(PosttrainError, match="--resume"):
        train(_cfg(tiny_model_dir, tmp_path / "x"))
    (tmp_path / "y").mkdir()  # a folder posttrain did not make: neither flag makes it posttrain's
    (tmp_path / "y" / "junk").write_text("1")
    for flags in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(PosttrainError, match="holds files posttrain did not write"):
            train(_cfg(tiny_model_dir, tmp_path / "y", **flags))
    assert os.listdir(tmp_path / "y") == ["junk"]


def test_nan_loss_skips_steps_then_stops_and_keeps_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import posttrain.trainers.sft as sft

    real, calls = sft.masked_nll_sum, {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        total, n = real(logits, labels)
        return (total * float("nan"), n) if calls["n"] > 16 else (total, n)  # 8 chunks/step: NaN at step 3

    monkeypatch.setattr(sft, "masked_nll_sum", poisoned)
    with pytest.raises(PosttrainError, match="3 steps in a row had NaN/inf loss.*step-2"):
        train(_cfg(tiny_model_dir, tmp_path / "n", max_tokens_per_forward=300))
    assert capsys.readouterr().out.count("step skipped") == 3  # the same policy as RL: skip, then stop
    assert [p.name for p in (tmp_path / "n" / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-2"]


def test_non_finite_gradients_under_a_finite_loss_never_reach_the_weights(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """An overflow in backward (seen on a GPU: a finite loss, NaN gradients) skips the step instead of
    writing NaN into every weight."""
    import posttrain.trainers.sft as sft

    real, calls = sft.masked_nll_sum, {"n": 0}

    def overflowing_backward(logits, labels):
        calls["n"] += 1
        total, n = real(logits, labels)
        if calls["n"] in (5, 6):  # both chunks of step 3 (two per step here): finite value, infinite gradient
            t = logits.float().sum()
            total = total + (t - t.detach()) * 3e38  # adds 0 to the value, 3e38 to every logit's gradient
        return total, n

    monkeypatch.setattr(sft, "masked_nll_sum", overflowing_backward)
    train(_cfg(tiny_model_dir, tmp_path / "g", max_steps=4, save_steps=0))
    assert capsys.readouterr().out.count("step skipped") == 1
    rows = [r for r in read_metrics(tmp_path / "g" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert all(torch.isfinite(t).all() for t in _adapter(tmp_path / "g").values())


def test_qlora_without_bitsandbytes_fails_cleanly(tiny_model_dir, tmp_path):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(PosttrainError, match="bitsandbytes"):
        train(_cfg(tiny_model_dir, tmp_path / "q", method="qlora"))


def test_merged_model_generates_like_base_plus_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.engine import SamplingParams
    from posttrain.engine.hf import HFEngine
    from posttrain.engine.models import load_tokenizer
    from posttrain.trainers.export import merge_adapter

    out = tmp_path / "sft"
    train(_cfg(tiny_model_dir, out, max_steps=3, learning_rate=5e-2, lora_dropout=0.0))
    merged_dir = merge_adapter(str(out), str(tmp_path / "merged"))
    tok = load_tokenizer(str(merged_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with_adapter = PeftModel.from_pretrained(base, str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    prompts = [tok("Tom has 3 apples and buys 4 more.")["input_ids"], tok("A train goes 60 miles")["input_ids"]]
    params = SamplingParams(max_new_tokens=12)
    a = HFEngine(with_adapter, tok, 2).generate(prompts, params)
    b = HFEngine(merged, tok, 2).generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "tokenizer.json").exists()


def test_sft_cli_end_to_end(tiny_model_dir, tmp_path, tmp_path_factory):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ntask: gsm_symbolic\ntrain_limit: 16\nmax_steps: 2\n"
                   "per_device_batch_size: 4\ngradient_accumulation_steps: 1\neval_steps: 2\neval_examples: 4\n"
                   "eval_accuracy_samples: 2\neval_max_new_tokens: 4\nreport_to: [tensorboard]\n")
    out = tmp_path / "run"
    r = run_cli("sft", "--config", cfg, "--output", out, "--max-len", 300)
    assert r.returncode == 0, r.stderr
    assert (out / "adapter_model.safetensors").exists() and (out / "tensorboard").is_dir()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "eval_loss" in rows[-1] and "eval_accuracy" in rows[-1]
    r = run_cli("merge", "--adapter", out, "--output", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    r = run_cli("sft", "--config", cfg, "--output", out, "--max-len", 300, "--resume")
    assert r.returncode == 0 and "already finished" in r.stdout
    r = run_cli("sft", "--config", cfg, "--output", tmp_path / "bad", "--method", "sgd")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "unknown --method" in r.stderr


def test_sigterm_saves_a_checkpoint_then_resume_finishes(tiny_model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "posttrain", "sft", "--model", str(tiny_model_dir), "--train-limit", "32", "--max-steps", "400",
           "--per-device-batch-size", "4", "--gradient-accumulation-steps", "1", "--eval-steps", "0", "--save-steps", "0",
           "--report-to", "none", "--max-len", "300", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "checkpoint saved" in err and "Traceback" not in err
    ckpts = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").exists()
    assert not (out / "run_state.json").exists()


def test_push_to_hub_offline_is_a_clear_error(tiny_model_dir, tmp_path):
    from posttrain.trainers.hub import push_folder

    with pytest.raises(PosttrainError, match="could not push"):
        push_folder(tiny_model_dir, "someone/some-repo")


def test_resume_with_a_larger_max_steps_continues_a_finished_run(tiny_model_dir, tmp_path):
    """4 steps, then --resume --max-steps 6, lands where 6 steps in one go land (constant schedule),
    with every step logged once."""
    kw = dict(lora_dropout=0.0, lr_scheduler="constant", warmup_ratio=0.0)
    train(_cfg(tiny_model_dir, tmp_path / "six", max_steps=6, **kw))
    a = tmp_path / "four-then-six"
    train(_cfg(tiny_model_dir, a, max_steps=4, **kw))
    assert train(_cfg(tiny_model_dir, a, max_steps=4, resume=True, **kw))["step"] == 4  # nothing to do
    assert train(_cfg(tiny_model_dir, a, max_steps=6, resume=True, **kw))["step"] == 6
    for k, v in _adapter(tmp_path / "six").items():
        torch.testing.assert_close(_adapter(a)[k], v, atol=1e-5, rtol=1e-4)
    assert [json.loads(line)["step"] for line in (a / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert json.loads((a / "sft_config.json").read_text())["max_steps"] == 6


def test_resume_refuses_changed_training_options(tiny_model_dir, tmp_path):
    out = tmp_path / "r"
    train(_cfg(tiny_model_dir, out, max_steps=2))
    saved = (out / "sft_config.json").read_text()
    with pytest.raises(PosttrainError, match="--learning-rate is 0.1 but the run .* used 0.005"):
        train(_cfg(tiny_model_dir, out, max_steps=4, resume=True, learning_rate=0.1))
    assert (out / "sft_config.json").read_text() == saved  # never recorded falsely


def test_resume_drops_metrics_rows_logged_after_the_checkpoint(tiny_model_dir, tmp_path):
    """A run killed after step 3 (checkpoint at 2) logged step 3; the resumed run logs it again, once."""
    out = tmp_path / "k"
    train(_cfg(tiny_model_dir, out, max_steps=4, save_steps=2))
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-4")
    (out / "run_state.json").unlink()
    train(_cfg(tiny_model_dir, out, max_steps=4, save_steps=2, resume=True))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_one_engine_serves_every_evaluation_of_a_run(tiny_model_dir, tmp_path, monkeypatch):
    import posttrain.engine as engine_mod

    built = []
    real = engine_mod.make_engine
    monkeypatch.setattr(engine_mod, "make_engine", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    train(_cfg(tiny_model_dir, tmp_path / "e", max_steps=4, eval_steps=1, eval_examples=2, eval_accuracy_samples=2,
               eval_max_new_tokens=4, engine="hf"))
    assert built == ["hf"]  # four evaluations, one engine, the engine asked for
    rows = [json.loads(line) for line in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert sum("eval_accuracy" in r for r in rows) == 4


@pytest.mark.parametrize("damage", ["truncate", "zero", "flip", "missing"])
def test_resume_skips_a_damaged_latest_checkpoint(tiny_model_dir, tmp_path, damage, capsys):
    """The newest checkpoint damaged four ways: resume says so in one line and continues from the
    newest intact one, landing where an uninterrupted run lands."""
    import shutil

    kw = dict(lora_dropout=0.0, save_steps=1, save_total_limit=3, max_steps=4)
    train(_cfg(tiny_model_dir, tmp_path / "clean", **kw))
    out = tmp_path / damage
    train(_cfg(tiny_model_dir, out, **kw))
    (out / "run_state.json").unlink()
    shutil.rmtree(out / "checkpoints" / "step-4")  # killed before step 4 was saved ...
    weights = next((out / "checkpoints" / "step-3").glob("model*.safetensors"))  # ... and step 3 damaged afterwards
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "zero":
        weights.write_bytes(b"")
    elif damage == "flip":
        weights.write_bytes(data[:-9] + bytes([data[-9] ^ 0x01]) + data[-8:])  # one bit of the last weights
    else:
        weights.unlink()
    capsys.readouterr()
    train(_cfg(tiny_model_dir, out, resume=True, **kw))
    said = capsys.readouterr().out
    assert "checkpoint" in said and "step-3 is damaged" in said and "resumed from" in said and "step-2" in said
    for k, v in _adapter(tmp_path / "clean").items():
        torch.testing.assert_close(_adapter(out)[k], v, atol=1e-5, rtol=1e-4)


def test_resume_with_every_checkpoint_damaged_stops_in_one_line(tiny_model_dir, tmp_path):
    out = tmp_path / "all"
    train(_cfg(tiny_model_dir, out, max_steps=2, save_steps=1, save_total_limit=3))
    (out / "run_state.json").unlink()
    for ck in (out / "checkpoints").iterdir():
        next(ck.glob("model*.safetensors")).write_bytes(b"")
    with pytest.raises(PosttrainError, match="every checkpoint in .* is damaged"):
        train(_cfg(tiny_model_dir, out, max_steps=4, save_steps=1, resume=True))


def test_resume_clears_a_save_that_a_kill_interrupted(tiny_model_dir, tmp_path):
    out = tmp_path / "t"
    train(_cfg(tiny_model_dir, out, max_steps=2))
    (out / "checkpoints" / ".step-3.tmp").mkdir()  # what a kill during the step-3 save leaves
    (out / "checkpoints" / ".step-3.tmp" / "model.safetensors").write_bytes(b"half")
    train(_cfg(tiny_model_dir, out, max_steps=3, resume=True))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]


def test_outputs_honour_the_umask(tiny_model_dir, tmp_path):
    old = os.umask(0o027)
    try:
        train(_cfg(tiny_model_dir, tmp_path / "u", max_steps=2))
    finally:
        os.umask(old)
    for name in ("adapter_model.safetensors", "run_state.json", "sft_config.json", "checkpoints/step-2/manifest.json"):
        assert ((tmp_path / "u" / name).stat().st_mode & 0o777) == 0o640, name


def test_a_model_trained_on_gsm_symbolic_may_not_report_gsm8k_test_accuracy(tiny_model_dir, tmp_path):
    """gsm_symbolic's templates were built from GSM8K test problems: the lineage travels with the
    model (through merge and further training) and evaluation refuses the contaminated score."""
    from conftest import GSM8K_DIR
    from posttrain.evaluation import EvalConfig, run_eval
    from posttrain.trainers.export import merge_adapter

    train(_cfg(tiny_model_dir, tmp_path / "sym", max_steps=1))
    merged = merge_adapter(str(tmp_path / "sym"), str(tmp_path / "merged"))
    assert json.loads((merged / "posttrain.json").read_text())["trained_on"] == ["gsm_symbolic"]
    with pytest.raises(PosttrainError, match="trained on gsm_symbolic, whose problems were built from gsm8k's test split"):
        run_eval(EvalConfig(model=str(merged), task="gsm8k", data_dir=str(GSM8K_DIR), limit=2, max_new_tokens=2))
    with pytest.raises(PosttrainError, match="contaminated"):  # nor train on GSM8K from it while scoring GSM8K test
        train(_cfg(merged, tmp_path / "g", task="gsm8k", data_dir=str(GSM8K_DIR), eval_steps=1, eval_examples=2))
    assert run_eval(EvalConfig(model=str(merged), task="gsm_symbolic", limit=2, max_new_tokens=2)).summary["n"] == 2
    run_eval(EvalConfig(model=str(merged), task="gsm8k", split="train", data_dir=str(GSM8K_DIR), limit=2, max_new_tokens=2))


def test_validation_is_the_train_splits_tail_and_evaluations_use_it(tiny_model_dir, tmp_path, monkeypatch):
    import posttrain.trainers.sft as sft_mod
    from posttrain.tasks import make_task

    seen = []
    real = sft_mod.accuracy_eval
    monkeypatch.setattr(sft_mod, "accuracy_eval", lambda engine, tok, task, examples, *a: seen.append([e.id for e in examples])
                        or real(engine, tok, task, examples, *a))
    train(_cfg(tiny_model_dir, tmp_path / "v", max_steps=2, train_limit=8, validation_size=5, eval_steps=2,
               eval_examples=2, eval_accuracy_samples=3, eval_max_new_tokens=4, mixed_precision="bf16"))
    rows = make_task("gsm_symbolic").examples("train")
    assert seen == [[e.id for e in rows[-5:-2]]]  # the train split's tail, not the test split
    config = json.loads((tmp_path / "v" / "sft_config.json").read_text())
    assert config["data_stats"]["examples"] == 8 and config["mixed_precision"] == "bf16"


def test_mixed_precision_choices(monkeypatch, capsys):
    from posttrain.trainers import run
    from posttrain.trainers.run import make_accelerator

    assert make_accelerator("auto").mixed_precision == "no"  # CPU: fp32 unless asked
    for native in (True, False):
        monkeypatch.setattr(run, "cpu_has_native_bf16", lambda native=native: native)
        capsys.readouterr()
        assert make_accelerator("bf16").mixed_precision == "bf16"  # as asked, with a line where it is emulated
        assert ("emulated and many times slower than fp32" in capsys.readouterr().out) is not native
    with pytest.raises(PosttrainError, match="mixed-precision"):
        SFTConfig(mixed_precision="fp8")


def test_the_answer_marker_is_one_token(tiny_tokenizer):
    text = "3 + 4 = 7\n#### 7"
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert "####" in tiny_tokenizer.convert_ids_to_tokens(ids)
    assert tiny_tokenizer.decode(ids) == text


def test_max_minutes_stops_between_steps_saves_and_resume_continues(tiny_model_dir, tmp_path, monkeypatch):
    import posttrain.trainers.run as run

    clock = iter(range(0, 10_000, 50))  # each look at the process age: 50 s later
    monkeypatch.setattr(run, "process_age_s", lambda: float(next(clock)))
    out = tmp_path / "run"
    train(_cfg(tiny_model_dir, out, max_steps=6, max_minutes=2.5))  # 150 s: a few steps, not six
    state = json.loads((out / "run_state.json").read_text())
    assert state["stopped_by_max_minutes"] and 0 < state["step"] < 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, state["step"] + 1))
    assert all(r["time_s"] % 50 == 0 for r in rows)  # each step logs the process age at its end
    assert (out / "checkpoints" / f"step-{state['step']}").is_dir() and (out / "adapter_model.safetensors").is_file()
    monkeypatch.setattr(run, "process_age_s", lambda: 1.0)
    train(_cfg(tiny_model_dir, out, max_steps=6, max_minutes=2.5, resume=True))
    state = json.loads((out / "run_state.json").read_text())
    assert state["step"] == 6 and "stopped_by_max_minutes" not in state


def test_a_checkpointed_sft_step_recomputes_attention_on_the_forwards_kernels(tiny_model_dir, tmp_path, monkeypatch):
    """With gradient checkpointing the backward runs layers' forwards again: under the forward's SDPA
    kernels (not cuDNN's), or torch's checkpoint finds recomputed tensors of other shapes on a GPU."""
    import torch.nn.functional as F

    sdpa, calls = F.scaled_dot_product_attention, []

    def recorded(*args, **kwargs):
        calls.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    counts = []
    for name, kw in (("plain", {}), ("ckpt", {"gradient_checkpointing": True, "checkpoint_every": 2})):
        calls.clear()
        train(_cfg(tiny_model_dir, tmp_path / name, max_steps=1, save_steps=0, **kw))
        assert calls and not any(calls)
        counts.append(len(calls))
    assert counts[1] > counts[0]  # the recomputes ran, on the same kernels
