"""Does posttrain make a real model better at GSM8K, and is the gain more than its controls'? Runs, side by
side on one GPU, the Qwen2.5-Coder-0.5B-Instruct pipeline (base eval → SFT → eval → GRPO → eval) with
several seeds, the same pipeline with the random reward (the control that Qwen-family models are known
to gain under), and TRL's GRPOTrainer on the same RL config from the first seed's SFT model for a
wall-clock budget, evaluated by posttrain's evaluator on the same 1319 problems.

    posttrain fetch qwen2.5-coder-0.5b-instruct     # once (--wheel DIR on a machine with no registry)
    python bench/qwen_gsm8k.py --data-dir ../shared/data/gsm8k --work /tmp/qwen --json bench/results/qwen_gsm8k_DEVICE_DATE.json

Every arm is a fresh process timed from its start; the arms run at the same time (at most ``--at-once``,
default 3; the rest wait their turn), so each shares the GPU with the others: their wall times are upper
bounds of a run alone. ``--json`` is rewritten as arms finish, so a caller can collect partial results.
TRL needs ``trl`` and ``datasets`` installed; ``--no-trl`` skips that arm.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from posttrain.config import load_yaml  # noqa: E402

STAGE_KEYS = ("accuracy", "strict_accuracy", "n", "ci95")


class Arm:
    """One process of the comparison: its command, log, and wall clock from its start (``start`` runs it)."""

    def __init__(self, name: str, cmd: list[str], work: Path, env: dict, start: bool = True):
        self.name, self.cmd, self.env = name, cmd, env
        self.log = work / "logs" / f"{name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.wall_s: float | None = None
        if start:
            self.start()

    def start(self) -> None:
        self.t0 = time.time()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

    @property
    def running(self) -> bool:
        return self.proc is not None and not self.poll()

    def poll(self) -> bool:
        if self.wall_s is None and self.proc is not None and self.proc.poll() is not None:
            self.wall_s = time.time() - self.t0
        return self.wall_s is not None

    def row(self) -> dict:
        row = {"arm": self.name, "command": " ".join(self.cmd), "returncode": self.proc and self.proc.poll(),
               "wall_s_from_process_start": None if self.wall_s is None else round(self.wall_s, 1)}
        if self.proc is not None and self.proc.poll():
            row["log_tail"] = self.log.read_text(errors="replace")[-1500:]
        return row


def pipeline_row(arm: Arm, out: Path) -> dict:
    row = arm.row()
    summary = out / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        row["stages"] = [{k: st[k] for k in ("name", *STAGE_KEYS)} for st in s["stages"]]
        row["timings_s"] = {k: round(v, 1) for k, v in s["timings_s"].items()}
    metrics = out / "rl" / "metrics.jsonl"
    if metrics.is_file():
        steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        steps = [s for s in steps if "time_s" in s]
        if steps:
            row["rl_steps"] = len(steps)
            row["rl_peak_gpu_mem_gib"] = max((s.get("gpu_mem_peak_gib") or 0) for s in steps)
    return row


def trl_config(pipeline_cfg: dict, data_dir: str, path: Path) -> Path:
    """The pipeline's RL stage as a standalone RL config (what bench/trl_grpo.py reads)."""
    values = {k: pipeline_cfg[k] for k in ("task", "prompt_style") if k in pipeline_cfg}
    values.update(pipeline_cfg.get("rl", {}), data_dir=data_dir, algo=pipeline_cfg.get("rl_algo", "grpo"))
    path.write_text(yaml.safe_dump(values))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/pipeline_qwen25_coder_gsm8k.yaml")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--work", required=True, help="folder for every arm's run (model folders; large)")
    ap.add_argument("--json", required=True, help="where the results go (also rewritten as arms finish)")
    ap.add_argument("--model", help="base model (overrides the config's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--random-seed", type=int, default=1, help="seed of the random-reward arm")
    ap.add_argument("--no-random", action="store_true")
    ap.add_argument("--grpo-only", action="store_true", help="also an arm with no SFT stage (GRPO from the base model, first seed)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--trl-minutes", type=float, default=5.0, help="TRL's wall-clock budget from its process start")
    ap.add_argument("--at-once", type=int, default=3, help="most arms running at once: on one H200, six at once ran out of "
                    "memory (an SFT of this recipe holds ~38 GiB); the others wait their turn")
    ap.add_argument("--poll-s", type=float, default=5.0)
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p),
           "PYTHONUNBUFFERED": "1"}
    py = [sys.executable, "-m", "posttrain"]
    base = [*py, "pipeline", "--config", args.config, "--data-dir", args.data_dir, "--no-control",
            *(["--model", args.model] if args.model else [])]
    pipelines: dict[str, tuple[Arm, Path]] = {}
    for seed in args.seeds:
        out = work / f"seed{seed}"
        pipelines[f"seed{seed}"] = (Arm(f"seed{seed}", [*base, "--seed", str(seed), "--output", str(out)], work, env, start=False), out)
    if not args.no_random:
        out = work / "random"
        pipelines["random"] = (Arm("random", [*base, "--seed", str(args.random_seed), "--reward", "random",
                                              "--output", str(out)], work, env, start=False), out)
    if args.grpo_only:
        out = work / "grpo_only"
        pipelines["grpo_only"] = (Arm("grpo_only", [*base, "--seed", str(args.seeds[0]), "--no-sft", "--output", str(out)],
                                      work, env, start=False), out)
    cfg = load_yaml(args.config)
    first = pipelines[f"seed{args.seeds[0]}"][0]
    sft_model = work / f"seed{args.seeds[0]}" / "sft" / "model"
    trl_out, trl_arm, trl_eval = work / "trl", None, None
    result = {"what": "bench/qwen_gsm8k.py", "command": " ".join(sys.argv), "config": args.config, "config_values": cfg,
              "date": datetime.date.today().isoformat(), "arms_at_once": args.at_once}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        result["torch"] = torch.__version__
    except Exception as e:  # the comparison itself runs in the child processes
        result["device"] = f"unknown ({e})"

    def write():
        result["arms"] = [pipeline_row(a, out) for a, out in pipelines.values()]
        if trl_arm is not None:
            row = trl_arm.row()
            summary = trl_out / "summary.json"
            if summary.is_file():
                row["trl"] = json.loads(summary.read_text())
            if trl_eval is not None:
                row["eval"] = trl_eval.row()
                es = work / "eval_trl" / "summary.json"
                if es.is_file():
                    s = json.loads(es.read_text())
                    row["stages"] = [{"name": "trl", **{k: s[k] for k in STAGE_KEYS}}]
            result["trl_arm"] = row
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.json)

    while True:
        for arm, _ in pipelines.values():
            arm.poll()
        for arm, _ in pipelines.values():
            busy = sum(a.running for a, _ in pipelines.values()) + (trl_arm.running if trl_arm else 0) + \
                (trl_eval.running if trl_eval else 0)
            if arm.proc is None and busy < args.at_once:
                arm.start()
        # TRL starts from the first seed's SFT model as soon as it exists; from the base model (beside the GRPO-only
        # arm) if that arm failed before making one.
        start = sft_model if (sft_model / "config.json").is_file() else None
        if start is None and args.grpo_only and first.wall_s is not None:
            start = args.model or cfg["model"]
        if not args.no_trl and trl_arm is None and start is not None:
            rl_yaml = trl_config(cfg, args.data_dir, work / "trl_rl_config.yaml")
            result["trl_start_model"] = str(start)
            trl_arm = Arm("trl", [sys.executable, str(ROOT / "bench" / "trl_grpo.py"), "--config", str(rl_yaml), "--model",
                                  str(start), "--out", str(trl_out), "--max-minutes", str(args.trl_minutes)], work, env)
        if trl_arm is not None and trl_eval is None and trl_arm.poll() and trl_arm.proc.returncode == 0:
            ev = cfg.get("eval", {})
            trl_eval = Arm("eval_trl", [*py, "eval", "--model", str(trl_out / "model"), "--task", cfg.get("task", "gsm8k"),
                                        "--data-dir", args.data_dir, "--prompt-style", cfg.get("prompt_style", "chat"),
                                        "--max-new-tokens", str(ev.get("max_new_tokens", 400)),
                                        "--batch-size", str(ev.get("batch_size", 1319)), "--output", str(work / "eval_trl")],
                           work, env)
        write()
        done = all(a.wall_s is not None for a, _ in pipelines.values())
        trl_done = args.no_trl or (trl_arm is not None and trl_arm.poll() and (trl_arm.proc.returncode != 0 or (
            trl_eval is not None and trl_eval.poll())))
        if not args.no_trl and trl_arm is None and done:
            trl_done = True  # nothing for TRL to start from
        if done and trl_done:
            break
        time.sleep(args.poll_s)
    write()
    for row in result["arms"] + ([result["trl_arm"]] if "trl_arm" in result else []):
        stages = " → ".join(f"{s['name']} {100 * s['accuracy']:.1f}/{100 * s['strict_accuracy']:.1f}" for s in row.get("stages", []))
        print(f"{row['arm']:<8} rc={row['returncode']} wall {row['wall_s_from_process_start']} s  {stages}")


if __name__ == "__main__":
    main()
