"""The whole seed story as one resumable run: evaluate base → SFT → evaluate → RL → evaluate → report.

Each stage writes into its own subfolder of the output; a rerun skips stages that already finished,
and a stage whose input is missing fails before any work starts.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import build_config, load_yaml
from posttrain.engine.registry import resolve_model
from posttrain.errors import PosttrainError
from posttrain.evaluation import EvalConfig, run_eval
from posttrain.utils import atomic_dir, atomic_write, check_writable, write_json

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
    samples_in_report: int = 3
    """Sample generations shown per stage in report.md."""


def load_pipeline_config(path: str | Path | None, overrides: dict | None = None) -> PipelineConfig:
    values = load_yaml(path) if path else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = build_config(PipelineConfig, values, source=str(path or "pipeline options"))
    for stage in ("eval", "sft", "rl"):
        if not isinstance(getattr(cfg, stage), dict):
            raise PosttrainError(f"{path}: '{stage}' must be a mapping of options")
    return cfg


def stage_configs(cfg: PipelineConfig):
    """Resolve the per-stage configs (validates every option before any work starts)."""
    from posttrain.trainers.rl import RLConfig
    from posttrain.trainers.sft import SFTConfig

    out = Path(cfg.output)
    common = {"task": cfg.task, "data_dir": cfg.data_dir, "prompt_style": cfg.prompt_style}
    sft_model_dir = out / "sft" / "model"
    rl_model_dir = out / "rl" / "model"
    sft = build_config(SFTConfig, {**common, **cfg.sft, "model": cfg.model, "output": str(out / "sft")}, "sft options")
    rl = build_config(RLConfig, {**common, **cfg.rl, "algo": cfg.rl_algo, "model": str(sft_model_dir),
                                 "output": str(out / "rl")}, "rl options")
    evals = {}
    for name, model in (("base", cfg.model), ("sft", sft_model_dir), ("rl", rl_model_dir)):
        evals[name] = build_config(EvalConfig, {**common, **cfg.eval, "model": str(model), "output": str(out / f"eval_{name}")},
                                   "eval options")
    return sft, rl, evals


def _finished(folder: Path) -> bool:
    state = folder / "run_state.json"
    return state.exists() and json.loads(state.read_text()).get("finished", False)


def _standalone(train_dir: Path, model_dir: Path, method: str) -> None:
    """A plain model folder for the next stage: merge a LoRA adapter, or copy the full model. Written
    atomically; a folder a killed run left without its weights is ours (inside the pipeline's output)
    and is made again."""
    if (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors")):
        return
    if model_dir.exists():
        print(f"{model_dir} is incomplete (an earlier run was stopped while writing it); making it again")
        shutil.rmtree(model_dir)
    if method in ("lora", "qlora"):
        from posttrain.trainers.export import merge_adapter

        merge_adapter(str(train_dir), str(model_dir))
        return
    with atomic_dir(model_dir) as tmp:
        for f in train_dir.iterdir():
            if f.is_file() and f.suffix in (".json", ".safetensors", ".jinja", ".model", ".txt") and f.name not in (
                    "run_state.json", "sft_config.json", "rl_config.json"):
                shutil.copy2(f, tmp / f.name)


def run_pipeline(cfg: PipelineConfig) -> dict:
    out = check_writable(cfg.output)
    sft_cfg, rl_cfg, evals = stage_configs(cfg)
    if not Path(cfg.model).exists() and cfg.model.startswith(("models/", "./", "/", "runs/")):
        raise PosttrainError(f"base model folder {cfg.model} not found; run posttrain pretrain or point --model at one")
    resolve_model(cfg.model)  # a named model not fetched yet, or a missing .gguf: say so before any stage
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    stages = []

    def evaluate(name: str):
        ecfg = evals[name]
        summary_file = Path(ecfg.output) / "summary.json"
        if summary_file.exists():
            print(f"[{name}] evaluation already done: {summary_file}")
        else:
            if not Path(ecfg.model).exists() and name != "base":
                raise PosttrainError(f"stage eval_{name} needs {ecfg.model}, which is missing; rerun the stage before it")
            t = time.perf_counter()
            print(f"[{name}] evaluating {ecfg.model} on {ecfg.limit or 'all'} held-out problems")
            run_eval(ecfg, progress=True)
            timings[f"eval_{name}"] = time.perf_counter() - t
        s = json.loads(summary_file.read_text())
        stages.append({"name": name, "accuracy": s["accuracy"], "strict_accuracy": s["strict_accuracy"], "n": s["n"],
                       "ci95": s["ci95"]})

    def train(name: str, tcfg, trainer):
        folder = Path(tcfg.output)
        if _finished(folder):
            print(f"[{name}] already finished: {folder}")
        else:
            if Path(tcfg.model).is_relative_to(out) and not Path(tcfg.model).exists():
                raise PosttrainError(f"stage {name} needs {tcfg.model}, which is missing; rerun the stage before it")
            t = time.perf_counter()
            tcfg.resume = folder.exists()
            trainer(tcfg)
            timings[name] = time.perf_counter() - t
        _standalone(folder, folder / "model", tcfg.method)

    from posttrain.trainers import rl as rl_trainer
    from posttrain.trainers import sft as sft_trainer

    evaluate("base")
    train("sft", sft_cfg, sft_trainer.train)
    evaluate("sft")
    train("rl", rl_cfg, rl_trainer.train)
    evaluate("rl")

    summary = {"stages": stages, "timings_s": timings, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    write_json(out / "summary.json", summary)
    write_report(cfg, stages, out)
    return summary


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
def write_report(cfg: PipelineConfig, stages: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.trainers.common import read_metrics

    names = [s["name"] for s in stages]
    acc = [100 * s["accuracy"] for s in stages]
    err = [[100 * (s["accuracy"] - s["ci95"][0]) for s in stages], [100 * (s["ci95"][1] - s["accuracy"]) for s in stages]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    bars = ax.bar(names, acc, yerr=err, capsize=6, color=["#999", "#4a7", "#37c"][: len(names)])
    ax.bar_label(bars, labels=[f"{a:.1f}%" for a in acc], padding=3)
    ax.set_ylabel("accuracy (%), 95% CI")
    ax.set_xlabel("stage")
    ax.set_title(f"{cfg.task}: held-out accuracy by stage (n = {stages[0]['n'] if stages else 0})")
    top = max([100 * s["ci95"][1] for s in stages] or [1])
    ax.set_ylim(0, 100 if top > 40 else top * 1.35)  # small accuracies stay readable
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    curves = {"sft_loss.png": ("sft", ["loss", "eval_loss"], "loss (response tokens)"),
              "rl_reward.png": ("rl", ["reward_mean", "accuracy"], "per-step value, rolling mean ± 1 sd")}
    for fname, (stage, keys, ylabel) in curves.items():
        rows = read_metrics(out / stage / "metrics.jsonl")
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if not pts:
                continue
            steps, vals = map(list, zip(*pts))
            if stage == "rl" and len(vals) >= 10:  # per-step rewards are noisy: show the trend and its spread
                mean, sd = _rolling(vals, max(5, len(vals) // 10))
                line, = ax.plot(steps, mean, label=f"{key} (rolling mean)", linestyle="-" if key == keys[0] else "--")
                ax.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                                color=line.get_color(), alpha=0.2)
                ax.plot(steps, vals, color=line.get_color(), alpha=0.25, linewidth=0.7)
            else:
                ax.plot(steps, vals, label=key, marker="o" if len(pts) < 20 else None)
        evals = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
        if evals:
            ax.plot(*zip(*evals), "s--", color="black", label="held-out accuracy")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.set_title(f"{stage}: " + ("training loss" if stage == "sft" else "reward and sampled accuracy"))
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)

    lines = [f"# posttrain pipeline: {cfg.model} on {cfg.task}", "",
             f"Prompt template `{cfg.prompt_style}`; RL algorithm `{cfg.rl_algo}`; greedy evaluation on the same held-out problems at every stage.", "",
             "| stage | accuracy | 95% CI | strict accuracy | n |", "|---|---|---|---|---|"]
    for s in stages:
        lines.append(f"| {s['name']} | {100 * s['accuracy']:.1f}% | {100 * s['ci95'][0]:.1f}–{100 * s['ci95'][1]:.1f}% "
                     f"| {100 * s['strict_accuracy']:.1f}% | {s['n']} |")
    lines += ["", "## Paired significance (exact McNemar test on the same problems)", "",
              "| from → to | wrong→right | right→wrong | p-value |", "|---|---|---|---|"]
    for prev, nxt in zip(names, names[1:]):
        a = {r["id"]: r["correct"] for r in _records(out, prev)}
        b = {r["id"]: r["correct"] for r in _records(out, nxt)}
        ids = sorted(set(a) & set(b))
        up, down, p = mcnemar_exact([a[i] for i in ids], [b[i] for i in ids])
        lines.append(f"| {prev} → {nxt} | {up} | {down} | {p:.2g} |")
    lines += ["", "![accuracy](accuracy.png)", ""]
    for fname in curves:
        if (out / fname).exists():
            lines.append(f"![{fname}]({fname})")
    lines += ["", "## Sample generations", ""]
    for name in names:
        lines.append(f"### {name}")
        for r in _records(out, name)[: cfg.samples_in_report]:
            mark = "correct" if r["correct"] else "wrong"
            lines += ["", f"**Q:** {r['question']}", "", "```", r["generation"].strip()[:600], "```",
                      f"pred `{r['pred']}`, gold `{r['gold']}`: {mark}"]
        lines.append("")
    with atomic_write(out / "report.md") as f:
        f.write("\n".join(lines) + "\n")
