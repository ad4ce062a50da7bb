"""The whole seed story as one resumable run: evaluate base → SFT → evaluate → RL → evaluate → report.

With ``control`` on, one more arm: SFT continued from the SFT model on the same worked solutions for
as much compute as the RL stage used (counted from both runs' token records), then evaluated like
the others, so the report shows whether RL's gain is more than more SFT.

Each stage writes into its own subfolder of the output; a rerun skips stages that already finished,
and a stage whose input is missing fails before any work starts.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from posttrain.config import build_config, load_yaml
from posttrain.engine.registry import resolve_model
from posttrain.errors import PosttrainError
from posttrain.evaluation import EvalConfig, run_eval
from posttrain.rundir import RunDir, atomic_folder, inspect, owned_entry, read_record
from posttrain.utils import atomic_write, write_json

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "nano.yaml"


@dataclass
class PipelineConfig:
    model: str = "models/nano-gsm"
    """Base model: hub id or local folder."""
    task: str = "gsm_symbolic"
    """Task for every stage (train split for training, test split for evaluation)."""
    data_dir: str | None = None
    """GSM8K folder (train.jsonl/test.jsonl) when task is gsm8k."""
    prompt_style: str = "plain"
    """Prompt template shared by every stage."""
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
    sft = build_config(SFTConfig, {**common, **cfg.sft, "model": cfg.model, "output": str(out / "sft")}, f"{where}: sft")
    rl = build_config(RLConfig, {**common, **cfg.rl, "algo": cfg.rl_algo, "model": str(sft_model_dir),
                                 "output": str(out / "rl")}, f"{where}: rl")
    evals = {}
    for name, model in (("base", cfg.model), ("sft", sft_model_dir), ("rl", rl_model_dir),
                        ("control", out / "control" / "model")):
        evals[name] = build_config(EvalConfig, {**common, **cfg.eval, "model": str(model), "output": str(out / f"eval_{name}")},
                                   f"{where}: eval")
    return sft, rl, evals


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _finished(folder: Path, command: str) -> bool:
    """Whether ``folder`` holds a finished ``command`` run that posttrain wrote (its record lists the
    run_state.json that says so)."""
    return owned_entry(folder, "run_state.json", command) and bool((_json_object(folder / "run_state.json") or {}).get("finished"))


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
                        and f.name not in ("run_state.json", "sft_config.json", "rl_config.json"):
                    shutil.copy2(f, tmp / f.name)
    finally:
        stage.release()


def _summary(summary_file: Path) -> dict | None:
    """An evaluation's summary.json, when it holds the numbers the report needs."""
    s = _json_object(summary_file)
    keys = ("accuracy", "strict_accuracy", "n", "ci95")
    return s if s is not None and all(k in s for k in keys) else None


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Every stage in its own subfolder of ``cfg.output``, a folder posttrain's pipeline owns (see
    posttrain.rundir): a stage is redone only there, and only results posttrain recorded writing are
    reused."""
    out = Path(cfg.output)
    top = RunDir(out, "pipeline")
    top.check(rerun=True, expect=STAGE_FOLDERS + REPORT_FILES)  # before any work
    sft_cfg, rl_cfg, evals = stage_configs(cfg)
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
    write_report(cfg, stages, out, compute)
    top.release()
    return summary


def matched_compute(out: Path, rl_cfg) -> dict:
    """How many SFT steps cost what the RL stage cost, in forward-pass token equivalents (a token's
    forward ≈ 2·params FLOPs, its backward twice that): RL = rollout tokens (prompt + completion, once
    per rollout) + 3 × trained tokens per update (+1 each for old or reference log-probs); SFT = 3 ×
    its tokens per step, averaged over the SFT stage."""
    from posttrain.trainers.common import read_metrics

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


# ------------------------------------------------------------------------------------ statistics --
def mcnemar_exact(before: list[bool], after: list[bool]) -> tuple[int, int, float]:
    """Paired test on the same problems: (wrong→right, right→wrong, two-sided exact p-value)."""
    b = sum((not x) and y for x, y in zip(before, after))
    c = sum(x and (not y) for x, y in zip(before, after))
    n = b + c
    if n == 0:
        return b, c, 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return b, c, min(1.0, 2 * tail)


def _rolling(values: list[float], window: int) -> tuple[list[float], list[float]]:
    """Trailing rolling mean and standard deviation (shorter windows at the start)."""
    means, sds = [], []
    for i in range(len(values)):
        w = values[max(0, i - window + 1): i + 1]
        m = sum(w) / len(w)
        means.append(m)
        sds.append((sum((x - m) ** 2 for x in w) / len(w)) ** 0.5)
    return means, sds


def _records(out: Path, name: str) -> list[dict]:
    path = out / f"eval_{name}" / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------- report --
STAGE_LABELS = {"base": "base", "sft": "SFT", "rl": "RL", "control": "control: SFT continued"}
COMPARISONS = [("base", "sft"), ("sft", "rl"), ("sft", "control"), ("control", "rl")]


def _plot_sft(plt, rows: list[dict], path: Path, held_out: str) -> None:
    """Training loss (left) and held-out accuracy by step (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("loss", "training loss"), ("eval_loss", "held-out loss")):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            left.plot(*zip(*pts), label=label, marker="o" if key == "eval_loss" else None)
    left.set(xlabel="optimizer step", ylabel="loss per response token", title="SFT: loss")
    left.legend(fontsize=8)
    for key, label in (("eval_accuracy", "accuracy"), ("eval_strict_accuracy", "strict accuracy")):
        pts = [(r["step"], 100 * r[key]) for r in rows if key in r]
        if pts:
            right.plot(*zip(*pts), marker="o", label=label)
    right.set(xlabel="optimizer step", ylabel="accuracy (%)", title=f"SFT: {held_out} accuracy (greedy)", ylim=(0, 100))
    if right.lines:
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no evaluations during SFT (eval_steps: 0)", ha="center", transform=right.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_rl(plt, rows: list[dict], path: Path, held_out: str, start: float | None = None) -> None:
    """Reward (left) and accuracy (right): per-step values faint, their rolling mean ± 1 sd, and the
    held-out accuracy of the evaluations during training as points (from ``start``, the SFT stage's
    last one on the same problems, at step 0)."""
    window = max(5, len(rows) // 8)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, key, label in ((left, "reward_mean", "reward (mean over the step's completions)"),
                           (right, "accuracy", "sampled completions correct")):
        pts = [(r["step"], r[key] * (100 if ax is right else 1)) for r in rows if key in r]
        if not pts:
            continue
        steps, vals = map(list, zip(*pts))
        mean, sd = _rolling(vals, window)
        ax.plot(steps, vals, color="C0", alpha=0.25, linewidth=0.7)
        ax.plot(steps, mean, color="C0", label=f"{label}, rolling mean of {window} ± 1 sd")
        ax.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)], color="C0", alpha=0.2)
    evals = ([(0, 100 * start)] if start is not None else []) + [(r["step"], 100 * r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    if evals:
        right.plot(*zip(*evals), "s--", color="black", label=f"{held_out} accuracy (greedy)")
    left.set(xlabel="optimizer step", ylabel="reward", title="RL: reward")
    right.set(xlabel="optimizer step", ylabel="accuracy (%)", title="RL: accuracy", ylim=(0, 100))
    for ax in (left, right):
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17))  # below the axes: never over the curves
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(cfg: PipelineConfig, stages: list[dict], out: Path, compute: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.trainers.common import read_metrics

    names = [s["name"] for s in stages]
    acc = [100 * s["accuracy"] for s in stages]
    err = [[100 * (s["accuracy"] - s["ci95"][0]) for s in stages], [100 * (s["ci95"][1] - s["accuracy"]) for s in stages]]
    fig, ax = plt.subplots(figsize=(1.6 * len(stages) + 2, 3.8))
    colours = {"base": "#999", "sft": "#4a7", "rl": "#37c", "control": "#c84"}
    bars = ax.bar([STAGE_LABELS[n].replace(": ", ":\n") for n in names], acc, yerr=err, capsize=6, color=[colours[n] for n in names])
    ax.bar_label(bars, labels=[f"{a:.1f}%" for a in acc], padding=3)
    ax.set_ylabel("accuracy (%), 95% CI")
    ax.set_xlabel("stage")
    ax.set_title(f"{cfg.task}: held-out accuracy by stage (n = {stages[0]['n'] if stages else 0}, greedy)")
    top = max([100 * s["ci95"][1] for s in stages] or [1])
    ax.set_ylim(0, 100 if top > 40 else top * 1.35)  # small accuracies stay readable
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    plots = []
    sft_cfg, rl_cfg, _ = stage_configs(cfg)
    sft_rows, rl_rows = read_metrics(out / "sft" / "metrics.jsonl"), read_metrics(out / "rl" / "metrics.jsonl")
    if sft_rows:
        _plot_sft(plt, sft_rows, out / "sft.png", "validation" if sft_cfg.validation_size else "test")
        plots.append("sft.png")
    if rl_rows:
        # The SFT stage's last held-out point is RL's step 0 when both evaluated the same problems.
        same = (sft_cfg.validation_size, sft_cfg.eval_accuracy_samples) == (rl_cfg.validation_size, rl_cfg.eval_samples)
        sft_evals = [r["eval_accuracy"] for r in sft_rows if "eval_accuracy" in r]
        _plot_rl(plt, rl_rows, out / "rl.png", "validation" if rl_cfg.validation_size else "test",
                 sft_evals[-1] if same and sft_evals else None)
        plots.append("rl.png")

    lines = [f"# posttrain pipeline: {cfg.model} on {cfg.task}", "",
             f"Prompt template `{cfg.prompt_style}`; RL algorithm `{cfg.rl_algo}`; greedy evaluation on the same held-out problems at every stage.", "",
             "| stage | accuracy | 95% CI | strict accuracy | n |", "|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {STAGE_LABELS[s['name']]} | {100 * s['accuracy']:.1f}% | {100 * s['ci95'][0]:.1f}–{100 * s['ci95'][1]:.1f}% "
                     f"| {100 * s['strict_accuracy']:.1f}% | {s['n']} |")
    if compute:
        lines += ["", f"The control continued SFT for {compute['control_steps']} steps on the SFT stage's worked solutions: "
                      f"{compute['control_steps'] * compute['sft_token_passes_per_step']:,} token passes against RL's "
                      f"{compute['rl_token_passes']:,} (a pass: one token through a forward; a backward counts two)."]
    lines += ["", "## Paired significance (exact McNemar test on the same problems)", "",
              "| from → to | wrong→right | right→wrong | p-value |", "|---|---|---|---|"]
    tests = {}
    for prev, nxt in COMPARISONS:
        if prev not in names or nxt not in names:
            continue
        a = {r["id"]: r["correct"] for r in _records(out, prev)}
        b = {r["id"]: r["correct"] for r in _records(out, nxt)}
        ids = sorted(set(a) & set(b))
        up, down, p = mcnemar_exact([a[i] for i in ids], [b[i] for i in ids])
        tests[prev, nxt] = (100 * (up - down) / max(1, len(ids)), p)
        lines.append(f"| {STAGE_LABELS[prev]} → {STAGE_LABELS[nxt]} | {up} | {down} | {p:.2g} |")
    if ("sft", "rl") in tests and ("control", "rl") in tests:
        (gain, p_gain), (edge, p_edge) = tests["sft", "rl"], tests["control", "rl"]
        verdict = ("RL's gain is more than more SFT would give" if edge > 0 and p_edge < 0.05 else
                   "these problems do not show RL's gain to be more than more SFT would give")
        lines += ["", f"Reading: RL − SFT = {gain:+.1f} points (p = {p_gain:.2g}); RL − control = {edge:+.1f} points "
                      f"(p = {p_edge:.2g}): {verdict}."]
    lines += ["", "![accuracy](accuracy.png)", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Sample generations", ""]
    for name in names:
        lines.append(f"### {STAGE_LABELS[name]}")
        for r in _records(out, name)[: cfg.samples_in_report]:
            mark = "correct" if r["correct"] else "wrong"
            lines += ["", f"**Q:** {r['question']}", "", "```", r["generation"].strip()[:600], "```",
                      f"pred `{r['pred']}`, gold `{r['gold']}`: {mark}"]
        lines.append("")
    with atomic_write(out / "report.md") as f:
        f.write("\n".join(lines) + "\n")
