"""Pipeline: a two-step recipe smoke run on a tiny model, report contents, stage skipping, clear
failures, the McNemar test by hand, and the shipped configs parse and resolve."""

import json

import pytest

from conftest import ROOT, run_cli
from posttrain.errors import PosttrainError
from posttrain.pipeline import load_pipeline_config, mcnemar_exact, run_pipeline, stage_configs


def test_mcnemar_by_hand():
    # 6 wrong→right, 1 right→wrong: p = 2 * P(X <= 1 | n=7, 1/2) = 2 * 8/128 = 0.125
    before = [False] * 6 + [True] + [True] * 5
    after = [True] * 6 + [False] + [True] * 5
    assert mcnemar_exact(before, after) == (6, 1, 0.125)
    assert mcnemar_exact([True], [True])[2] == 1.0


@pytest.mark.parametrize("name", ["nano.yaml", "pipeline_llama32_1b.yaml", "pipeline_grpo_llama31_8b.yaml"])
def test_shipped_pipeline_configs_resolve(name):
    cfg = load_pipeline_config(ROOT / "configs" / name)
    sft, rl, evals = stage_configs(cfg)
    assert sft.model == cfg.model and rl.model.endswith("sft/model") and set(evals) == {"base", "sft", "rl"}
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


def _tiny_pipeline(model_dir, out):
    return load_pipeline_config(None, {
        "model": str(model_dir), "output": str(out), "task": "gsm_symbolic",
        "eval": {"limit": 6, "max_new_tokens": 6, "batch_size": 6},
        "sft": {"method": "full", "max_steps": 2, "train_limit": 16, "per_device_batch_size": 4,
                "gradient_accumulation_steps": 1, "eval_steps": 0, "save_steps": 0, "report_to": [], "max_len": 300},
        "rl": {"method": "full", "max_steps": 2, "num_generations": 2, "per_device_batch_size": 4,
               "gradient_accumulation_steps": 1, "max_new_tokens": 6, "eval_steps": 0, "save_steps": 0,
               "report_to": [], "beta": 0.0, "train_limit": 16},
    })


def test_pipeline_end_to_end_and_rerun(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "pipe"
    summary = run_pipeline(_tiny_pipeline(tiny_model_dir, out))
    assert [s["name"] for s in summary["stages"]] == ["base", "sft", "rl"]
    disk = json.loads((out / "summary.json").read_text())
    for s in disk["stages"]:
        assert {"name", "accuracy", "strict_accuracy", "n", "ci95"} <= set(s) and s["n"] == 6
    report = (out / "report.md").read_text()
    assert "| base |" in report and "McNemar" in report and "base → sft" in report and "Sample generations" in report
    for f in ("accuracy.png", "sft_loss.png", "rl_reward.png", "eval_base/records.jsonl", "sft/model/config.json",
              "rl/model/model.safetensors"):
        assert (out / f).exists(), f
    capsys.readouterr()
    run_pipeline(_tiny_pipeline(tiny_model_dir, out))  # every stage is skipped
    said = capsys.readouterr().out
    assert said.count("already") == 5


def test_pipeline_missing_base_fails_early(tmp_path):
    with pytest.raises(PosttrainError, match="not found"):
        run_pipeline(load_pipeline_config(None, {"model": "models/does-not-exist", "output": str(tmp_path / "p")}))
    assert not (tmp_path / "p").exists()


def test_pipeline_cli_bad_config(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("sft:\n  learning_rat: 1\n")
    r = run_cli("pipeline", "--config", bad, "--output", tmp_path / "o")
    assert r.returncode != 0 and "learning_rat" in r.stderr and "Traceback" not in r.stderr
