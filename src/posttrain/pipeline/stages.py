"""The whole seed story as one resumable run: evaluate base → SFT → evaluate → RL → evaluate → report.

With ``control`` on, one more arm: SFT continued from the SFT model on the same worked solutions for
as much compute as the RL stage used (counted from both runs' token records), then evaluated like
the others, so the report shows whether RL's gain is more than more SFT.

Each stage writes into its own subfolder of the output; a rerun skips stages that already finished,
and a stage whose input is missing fails before any work starts.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from posttrain.config import StageOptions, build_config, load_yaml
from posttrain.engine.registry import resolve_model
from posttrain.errors import PosttrainError
from posttrain.evaluation import EvalConfig, run_eval
from posttrain.pipeline.report import write_report
from posttrain.rundir import RunDir, atomic_folder, inspect, owned_entry, read_record
from posttrain.trainers.run import RUN_CONFIGS, RUN_STATE
from posttrain.utils import read_json_object, write_json

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "nano.yaml"


@dataclass(kw_only=True)
class PipelineConfig(StageOptions):
    """The story's options. ``model`` is the base model; ``task``, ``data_dir`` and ``prompt_style``
    hold for every stage (the train split for training, the test split for evaluation)."""

    output: str = "runs/pipeline"
    """Output folder; each stage gets a subfolder."""
    rl_algo: str = "grpo"
    """grpo (default), reinforce or rloo."""
    eval: dict = field(default_factory=dict)
    """Options for every evaluation (posttrain eval's options, e.g. limit, max_new_tokens, batch_size)."""
    sft: dict = field(default_factory=dict)
    """Options for the SFT stage (posttrain sft's options)."""
    rl: dict = field(default_factory=dict)
    """Options for the RL stage (posttrain rl's options)."""
    control: bool = False
    """Also run the control arm: SFT continued from the SFT model on the same worked solutions for as
    much compute as the RL stage used, evaluated like the other stages."""
    samples_in_report: int = 3
    """Sample generations shown per stage in report.md."""
    sft_stage: bool = True
    """Run the SFT stage; false: RL starts from the base model (the report has no SFT row, and the control
    arm, which continues SFT, is not available)."""
    seed: int | None = None
    """Seed of the SFT and RL stages (and the control arm); unset: each stage's own (``seed`` in its options, else 42)."""


def load_pipeline_config(path: str | Path | None, overrides: dict | None = None) -> PipelineConfig:
    values = load_yaml(path) if path else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = build_config(PipelineConfig, values, source=str(path or "pipeline options"))
    stage_configs(cfg, str(path or "pipeline options"))  # every stage's options checked now, errors naming the file
    return cfg


# What a pipeline writes at the top of its folder: stage folders, the summary and the report.
STAGE_FOLDERS = ("eval_base", "sft", "eval_sft", "rl", "eval_rl", "control", "eval_control")
REPORT_FILES = ("summary.json", "report.md", "accuracy.png", "sft.png", "rl.png")


def stage_configs(cfg: PipelineConfig, where: str = "pipeline options"):
    """Resolve the per-stage configs (validates every option before any work starts)."""
    from posttrain.trainers.rl import RLConfig
    from posttrain.trainers.sft import SFTConfig

    out = Path(cfg.output)
    common = {"task": cfg.task, "data_dir": cfg.data_dir, "prompt_style": cfg.prompt_style}
    sft_model_dir = out / "sft" / "model"
    rl_model_dir = out / "rl" / "model"
    seeded = {} if cfg.seed is None else {"seed": cfg.seed}
    sft = build_config(SFTConfig, {**common, **cfg.sft, **seeded, "model": cfg.model, "output": str(out / "sft")}, f"{where}: sft")
    rl = build_config(RLConfig, {**common, **cfg.rl, **seeded, "algo": cfg.rl_algo,
                                 "model": str(sft_model_dir) if cfg.sft_stage else cfg.model, "output": str(out / "rl")},
                      f"{where}: rl")
    evals = {}
    for name, model in (("base", cfg.model), ("sft", sft_model_dir), ("rl", rl_model_dir),
                        ("control", out / "control" / "model")):
        evals[name] = build_config(EvalConfig, {**common, **cfg.eval, "model": str(model), "output": str(out / f"eval_{name}")},
                                   f"{where}: eval")
    return sft, rl, evals


def _finished(folder: Path, command: str) -> bool:
    """Whether ``folder`` holds a finished ``command`` run that posttrain wrote (its record lists the
    run_state.json that says so)."""
    return owned_entry(folder, RUN_STATE, command) and bool((read_json_object(folder / RUN_STATE) or {}).get("finished"))


def _standalone(train_dir: Path, model_dir: Path, method: str, command: str) -> None:
    """A plain model folder for the next stage: merge a LoRA adapter, or copy the full model. Written
    atomically and recorded in the stage's folder; one that a killed run of an older posttrain left
    without its weights is made again, when posttrain's record says the folder is its own."""
    complete = (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))
    if complete and owned_entry(train_dir, model_dir.name) and read_record(model_dir) is not None:
        return
    stage = RunDir.open(train_dir, command, rerun=True, expect=[model_dir.name])
    try:
        stage.own(model_dir.name)
        if model_dir.exists():
            print(f"{model_dir} is incomplete (an earlier run was stopped while writing it); making it again")
        if method in ("lora", "qlora"):
            from posttrain.trainers.export import merge_adapter

            merge_adapter(str(train_dir), str(model_dir), replace=True)
            return
        with atomic_folder(model_dir, "merge", replace=True) as tmp:
            for f in train_dir.iterdir():
                if f.is_file() and not f.name.startswith(".") and f.suffix in (".json", ".safetensors", ".jinja", ".model", ".txt") \
                        and f.name not in (RUN_STATE, *RUN_CONFIGS):
                    shutil.copy2(f, tmp / f.name)
    finally:
        stage.release()


def _summary(summary_file: Path) -> dict | None:
    """An evaluation's summary.json, when it holds the numbers the report needs."""
    s = read_json_object(summary_file)
    return s if s is not None and all(k in s for k in ("accuracy", "strict_accuracy", "n", "ci95")) else None


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Every stage in its own subfolder of ``cfg.output``, a folder posttrain's pipeline owns (see
    posttrain.rundir): a stage is redone only there, and only results posttrain recorded writing are
    reused."""
    out = Path(cfg.output)
    top = RunDir(out, "pipeline")
    top.check(rerun=True, expect=STAGE_FOLDERS + REPORT_FILES)  # before any work
    sft_cfg, rl_cfg, evals = stage_configs(cfg)
    if cfg.control and not cfg.sft_stage:
        raise PosttrainError("the control arm continues the SFT stage: turn the SFT stage on (sft_stage: true) or the control off")
    if not Path(cfg.model).exists() and cfg.model.startswith(("models/", "./", "/", "runs/")):
        raise PosttrainError(f"base model folder {cfg.model} not found; run posttrain pretrain or point --model at one")
    resolve_model(cfg.model)  # a named model not fetched yet, or a missing .gguf: say so before any stage
    top.lock()
    top.start()
    timings = {}
    stages = []

    def evaluate(name: str):
        ecfg = evals[name]
        folder = Path(ecfg.output)
        summary = _summary(folder / "summary.json") if top.lists(folder.name) and owned_entry(folder, "summary.json", "eval") else None
        if summary is not None:
            print(f"[{name}] evaluation already done: {folder / 'summary.json'}")
        else:
            if not Path(ecfg.model).exists() and name != "base":
                raise PosttrainError(f"stage eval_{name} needs {ecfg.model}, which is missing; rerun the stage before it")
            top.own(folder.name)
            t = time.perf_counter()
            print(f"[{name}] evaluating {ecfg.model} on {ecfg.limit or 'all'} held-out problems")
            summary = run_eval(ecfg, progress=True).summary
            timings[f"eval_{name}"] = time.perf_counter() - t
        top.keep()  # a stage's result: a later failure leaves the pipeline to be rerun, not discarded
        stages.append({"name": name, "accuracy": summary["accuracy"], "strict_accuracy": summary["strict_accuracy"],
                       "n": summary["n"], "ci95": summary["ci95"]})

    def train(name: str, tcfg, trainer, command: str):
        folder = Path(tcfg.output)
        if top.lists(folder.name) and _finished(folder, command):
            print(f"[{name}] already finished: {folder}")
        else:
            if Path(tcfg.model).is_relative_to(out) and not Path(tcfg.model).exists():
                raise PosttrainError(f"stage {name} needs {tcfg.model}, which is missing; rerun the stage before it")
            top.own(folder.name)
            t = time.perf_counter()
            here = inspect(folder)
            tcfg.resume = here.state == "ours" and here.record.command == command  # the stage's own run, killed: continue it
            trainer(tcfg)
            timings[name] = time.perf_counter() - t
        _standalone(folder, folder / "model", tcfg.method, command)

    from posttrain.trainers import rl as rl_trainer
    from posttrain.trainers import sft as sft_trainer

    evaluate("base")
    if cfg.sft_stage:
        train("sft", sft_cfg, sft_trainer.train, "sft")
        evaluate("sft")
    train("rl", rl_cfg, rl_trainer.train, "rl")
    evaluate("rl")
    compute = None
    if cfg.control:
        compute = matched_compute(out, rl_cfg)
        control_cfg = replace(sft_cfg, model=str(out / "sft" / "model"), output=str(out / "control"),
                               max_steps=compute["control_steps"], warmup_steps=0, eval_steps=0, resume=False)
        train("control", control_cfg, sft_trainer.train, "sft")
        evaluate("control")

    summary = {"stages": stages, "timings_s": timings, "compute": compute,
               "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    top.own(*REPORT_FILES)
    write_json(out / "summary.json", summary)
    write_report(cfg, stages, out, sft_cfg, rl_cfg, compute)
    top.release()
    return summary


def matched_compute(out: Path, rl_cfg) -> dict:
    """How many SFT steps cost what the RL stage cost, in forward-pass token equivalents (a token's
    forward ≈ 2·params FLOPs, its backward twice that): RL = rollout tokens (prompt + completion, once
    per rollout) + 3 × trained tokens per update (+1 each for old or reference log-probs); SFT = 3 ×
    its tokens per step, averaged over the SFT stage."""
    from posttrain.trainers.metrics import read_metrics

    rl_rows = read_metrics(out / "rl" / "metrics.jsonl")
    sft_rows = [r for r in read_metrics(out / "sft" / "metrics.jsonl") if "tokens" in r]
    if not rl_rows or not sft_rows or "trained_tokens" not in rl_rows[-1]:
        raise PosttrainError(f"the control arm needs the token records of {out / 'sft'} and {out / 'rl'} (metrics.jsonl, "
                             f"logged by this version); rerun those stages")
    extra = (rl_cfg.num_iterations > 1) / rl_cfg.num_iterations + (rl_cfg.beta > 0) / rl_cfg.num_iterations
    per_rl_step = sum(r["rollout_tokens"] / rl_cfg.num_iterations + (3 + extra) * r["trained_tokens"] for r in rl_rows) / len(rl_rows)
    rl_units = per_rl_step * rl_rows[-1]["step"]  # logged rows stand for every step (logging_steps may skip some)
    per_sft_step = 3 * sum(r["tokens"] for r in sft_rows) / len(sft_rows)
    return {"rl_token_passes": round(rl_units), "sft_token_passes_per_step": round(per_sft_step),
            "control_steps": max(1, math.ceil(rl_units / per_sft_step))}
