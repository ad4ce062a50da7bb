"""The pipeline's report: the statistics (paired exact McNemar tests, rolling means), the plots (accuracy
by stage, the SFT and RL curves) and ``report.md``, from what the stages wrote."""

from __future__ import annotations

import json
import math
from pathlib import Path

from posttrain.utils import atomic_write


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
COMPARISONS = [("base", "sft"), ("sft", "rl"), ("base", "rl"), ("sft", "control"), ("control", "rl")]


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


def write_report(cfg, stages: list[dict], out: Path, sft_cfg, rl_cfg, compute: dict | None = None) -> None:
    """``report.md`` in ``out`` with its plots: the accuracy of every stage with its 95% CI, the paired
    tests between stages, the SFT and RL curves from their metrics, and sample generations. ``cfg`` is
    the PipelineConfig; ``sft_cfg`` and ``rl_cfg`` its resolved stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.trainers.metrics import read_metrics

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
        if prev not in names or nxt not in names or (prev, nxt) == ("base", "rl") and "sft" in names:
            continue  # base → RL only where there is no SFT stage between them
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
