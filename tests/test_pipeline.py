"""Pipeline: a two-step recipe smoke run on a tiny model, report contents, stage skipping, clear
failures, the McNemar test by hand, and the shipped configs parse and resolve."""

import json
import math

import pytest

from conftest import ROOT, run_cli
from posttrain.errors import PosttrainError
from posttrain.pipeline.report import mcnemar_exact
from posttrain.pipeline.stages import load_pipeline_config, matched_compute, run_pipeline, stage_configs
from posttrain.trainers.metrics import read_metrics


def test_mcnemar_by_hand():
    # 6 wrong→right, 1 right→wrong: p = 2 * P(X <= 1 | n=7, 1/2) = 2 * 8/128 = 0.125
    before = [False] * 6 + [True] + [True] * 5
    after = [True] * 6 + [False] + [True] * 5
    assert mcnemar_exact(before, after) == (6, 1, 0.125)
    assert mcnemar_exact([True], [True])[2] == 1.0


@pytest.mark.parametrize("name", ["nano.yaml", "pipeline_llama32_1b.yaml", "pipeline_grpo_llama31_8b.yaml",
                                  "pipeline_qwen25_coder_gsm8k.yaml"])
def test_shipped_pipeline_configs_resolve(name):
    cfg = load_pipeline_config(ROOT / "configs" / name)
    sft, rl, evals = stage_configs(cfg)
    assert sft.model == cfg.model and rl.model.endswith("sft/model") and set(evals) == {"base", "sft", "rl", "control"}
    assert rl.algo == cfg.rl_algo


@pytest.mark.parametrize("name", ["sft_llama32_1b.yaml", "reinforce_llama32_1b.yaml", "grpo_llama31_8b.yaml"])
def test_shipped_stage_configs_resolve(name):
    from posttrain.config import build_config, load_yaml
    from posttrain.trainers.rl import RLConfig
    from posttrain.trainers.sft import SFTConfig

    cls = SFTConfig if name.startswith("sft") else RLConfig
    cfg = build_config(cls, load_yaml(ROOT / "configs" / name), name)
    if name == "sft_llama32_1b.yaml":  # the seed's numbers
        assert (cfg.epochs, cfg.per_device_batch_size, cfg.gradient_accumulation_steps, cfg.learning_rate,
                cfg.warmup_ratio, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.max_len, cfg.eval_steps) == \
               (2, 4, 4, 2e-4, 0.03, 8, 16, 0.05, 400, 25)
    if name == "grpo_llama31_8b.yaml":
        assert (cfg.num_generations, cfg.beta, cfg.max_new_tokens, cfg.warmup_steps, cfg.method) == (4, 0.02, 256, 500, "qlora")
        assert cfg.reward == ["strict_format", "xml_count", "int_answer", "correctness"]


def test_pipeline_seed_reaches_both_training_stages_and_reward_can_be_overridden(tmp_path):
    cfg = load_pipeline_config(ROOT / "configs" / "pipeline_qwen25_coder_gsm8k.yaml", {"seed": 7, "output": str(tmp_path)})
    sft, rl, _ = stage_configs(cfg)
    assert (sft.seed, rl.seed) == (7, 7) and rl.reward == ["correctness", "strict_correctness"]
    unseeded, _, _ = stage_configs(load_pipeline_config(ROOT / "configs" / "nano.yaml"))
    assert unseeded.seed == 42  # the stage's own default when the pipeline sets none
    from posttrain.cli.main import build_parser

    args = build_parser().parse_args(["pipeline", "--config", "configs/pipeline_qwen25_coder_gsm8k.yaml", "--seed", "3",
                                      "--reward", "random"])
    assert (args.seed, args.reward) == (3, ["random"])


def _tiny_pipeline(model_dir, out, **extra):
    return load_pipeline_config(None, {
        "model": str(model_dir), "output": str(out), "task": "gsm_symbolic",
        "eval": {"limit": 6, "max_new_tokens": 6, "batch_size": 6},
        "sft": {"method": "full", "max_steps": 2, "train_limit": 16, "per_device_batch_size": 4,
                "gradient_accumulation_steps": 1, "eval_steps": 0, "save_steps": 0, "report_to": [], "max_len": 300},
        "rl": {"method": "full", "max_steps": 2, "num_generations": 2, "per_device_batch_size": 4,
               "gradient_accumulation_steps": 1, "max_new_tokens": 6, "eval_steps": 0, "save_steps": 0,
               "report_to": [], "beta": 0.0, "train_limit": 16},
        **extra,
    })


def test_pipeline_without_sft_runs_rl_from_the_base_model(tiny_model_dir, tmp_path):
    out = tmp_path / "nosft"
    with pytest.raises(PosttrainError, match="control arm continues the SFT stage"):
        run_pipeline(_tiny_pipeline(tiny_model_dir, out, sft_stage=False, control=True))
    assert not out.exists()  # refused before anything was written
    summary = run_pipeline(_tiny_pipeline(tiny_model_dir, out, sft_stage=False))
    assert [s["name"] for s in summary["stages"]] == ["base", "rl"] and not (out / "sft").exists()
    assert json.loads((out / "rl" / "rl_config.json").read_text())["model"] == str(tiny_model_dir)
    report = (out / "report.md").read_text()
    assert "| base → RL |" in report and "| SFT" not in report


def test_pipeline_end_to_end_and_rerun(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pipe"
    summary = run_pipeline(_tiny_pipeline(tiny_model_dir, out))
    assert [s["name"] for s in summary["stages"]] == ["base", "sft", "rl"]
    disk = json.loads((out / "summary.json").read_text())
    for s in disk["stages"]:
        assert {"name", "accuracy", "strict_accuracy", "n", "ci95"} <= set(s) and s["n"] == 6
    report = (out / "report.md").read_text()
    assert "| base |" in report and "McNemar" in report and "base → SFT" in report and "Sample generations" in report
    assert "control" not in report
    for f in ("accuracy.png", "sft.png", "rl.png", "eval_base/records.jsonl", "sft/model/config.json",
              "rl/model/model.safetensors"):
        assert (out / f).exists(), f
    capsys.readouterr()
    run_pipeline(_tiny_pipeline(tiny_model_dir, out))  # every stage is skipped
    said = capsys.readouterr().out
    assert said.count("already") == 5


def test_pipeline_story_with_control_arm(tiny_model_dir, tmp_path):
    """The default config's shape: SFT on few worked solutions with a validation curve, RL on other
    problems' answers alone, and the control arm: SFT continued for RL's compute."""
    out = tmp_path / "pipe"
    cfg = _tiny_pipeline(tiny_model_dir, out, control=True)
    cfg.sft.update(validation_size=8, eval_steps=1, eval_examples=4, eval_accuracy_samples=4, eval_max_new_tokens=4)
    cfg.rl.update(train_offset=16, answers_only=True, validation_size=8, eval_steps=2, eval_samples=4)
    summary = run_pipeline(cfg)
    assert [s["name"] for s in summary["stages"]] == ["base", "sft", "rl", "control"]

    sft_rows = read_metrics(out / "sft" / "metrics.jsonl")
    assert [r["step"] for r in sft_rows if "eval_accuracy" in r] == [1, 2]  # the validation curve
    rl_rows = read_metrics(out / "rl" / "metrics.jsonl")
    assert [r["step"] for r in rl_rows if "eval_accuracy" in r] == [2]
    # The control's length is the RL stage's compute over an SFT step's, both from the token records.
    rl_passes = sum(r["rollout_tokens"] + 3 * r["trained_tokens"] for r in rl_rows)
    sft_per_step = 3 * sum(r["tokens"] for r in sft_rows) / len(sft_rows)
    assert summary["compute"]["control_steps"] == math.ceil(rl_passes / sft_per_step) > 2
    control_state = json.loads((out / "control" / "run_state.json").read_text())
    assert control_state["step"] == summary["compute"]["control_steps"]
    assert json.loads((out / "control" / "sft_config.json").read_text())["model"] == str(out / "sft" / "model")

    report = (out / "report.md").read_text()
    for row in ("| control: SFT continued |", "SFT → control: SFT continued", "control: SFT continued → RL",
                f"continued SFT for {summary['compute']['control_steps']} steps", "Reading: RL − SFT = "):
        assert row in report, row
    assert (out / "eval_control" / "summary.json").exists()


def test_matched_compute_counts_every_pass(tmp_path):
    """RL with KL and reused rollouts: rollout tokens once per rollout, 3 passes per trained token per
    update, +1 for old and +1 for reference log-probs (once per rollout)."""
    from posttrain.utils import write_jsonl

    (tmp_path / "rl").mkdir()
    (tmp_path / "sft").mkdir()
    write_jsonl(tmp_path / "rl" / "metrics.jsonl", [{"step": s, "rollout_tokens": 1000, "trained_tokens": 100} for s in (1, 2, 3, 4)])
    write_jsonl(tmp_path / "sft" / "metrics.jsonl", [{"step": 1, "tokens": 50}, {"step": 2, "tokens": 150}])
    rl_cfg = type("RL", (), {"num_iterations": 2, "beta": 0.04})
    got = matched_compute(tmp_path, rl_cfg)
    per_step = 1000 / 2 + (3 + 0.5 + 0.5) * 100  # per optimizer step
    assert got == {"rl_token_passes": 4 * per_step, "sft_token_passes_per_step": 300, "control_steps": math.ceil(4 * per_step / 300)}


def test_pipeline_missing_base_fails_early(tmp_path):
    with pytest.raises(PosttrainError, match="not found"):
        run_pipeline(load_pipeline_config(None, {"model": "models/does-not-exist", "output": str(tmp_path / "p")}))
    assert not (tmp_path / "p").exists()


def test_pipeline_cli_bad_config(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("sft:\n  learning_rat: 1\n")
    r = run_cli("pipeline", "--config", bad, "--output", tmp_path / "o")
    assert r.returncode != 0 and "learning_rat" in r.stderr and "Traceback" not in r.stderr
