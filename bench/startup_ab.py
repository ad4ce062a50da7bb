"""The first token of `posttrain eval` from process start, the CLI against bench/startup.py's script, run
interleaved in the same environment (same caches, no -X importtime), so that a gap between the two is not an
artefact of how each was measured (issue 25).

    python bench/startup_ab.py --model DIR --data-dir DIR --json OUT [--runs 4] [--code src --code OTHER/src]

Each round runs, each a fresh process: the script; the script with ``torch.cuda.is_available()`` right after
``import torch`` (as a config check that resolves the device early would); and ``python -m posttrain eval
--max-new-tokens 1`` on all 1319 GSM8K test problems (or ``--limit``) once per ``--code`` folder (posttrain's source put first
on PYTHONPATH). The first round meets cold caches; compare the later ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--limit", type=int, default=0, help="problems (default 0: all 1319; a CPU smoke run wants a few)")
    ap.add_argument("--code", action="append", help="a posttrain source folder (repeatable; default src)")
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("startup", ROOT / "bench/startup.py")
    startup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(startup)
    early = startup.PHASES.replace('import torch; stamp("import_torch")', 'import torch; torch.cuda.is_available(); stamp("import_torch")')
    assert early != startup.PHASES
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(":") if p]
    env_for = lambda src: {**os.environ, "PYTHONPATH": ":".join([str(Path(src).resolve()), *extra])}  # noqa: E731
    codes = args.code or ["src"]
    res = {"script": [], "script_early_cuda": [], **{f"cli {c}": [] for c in codes}}
    for i in range(args.runs):
        for name, code in (("script", startup.PHASES), ("script_early_cuda", early)):
            r = subprocess.run([sys.executable, "-c", code, args.model, args.data_dir, str(args.limit)], env=env_for(codes[0]),
                               capture_output=True, text=True)
            line = next((x for x in r.stdout.splitlines() if x.startswith("PHASES ")), None)
            res[name].append(json.loads(line[7:])["stamps"] if line else {"error": r.stderr[-800:]})
        for src in codes:
            out = Path(tempfile.mkdtemp(prefix="startup_ab_")) / "eval"
            cmd = [sys.executable, "-m", "posttrain", "eval", "--model", args.model, "--task", "gsm8k", "--data-dir", args.data_dir,
                   "--prompt-style", "chat", "--max-new-tokens", "1", "--batch-size", str(args.limit or 1319), "--output", str(out), "--show-samples", "0",
                   *(["--limit", str(args.limit)] if args.limit else [])]
            r = subprocess.run(cmd, env=env_for(src), capture_output=True, text=True)
            if r.returncode:
                res[f"cli {src}"].append({"error": r.stderr[-800:]})
                continue
            summary = json.loads((out / "summary.json").read_text())
            res[f"cli {src}"].append({**summary["phases_end_s_from_process_start"], "first_token": summary["first_token_s_from_process_start"],
                                      "done": summary["done_s_from_process_start"]})
        print(i, json.dumps({k: {kk: round(vv, 2) for kk, vv in v[-1].items() if isinstance(vv, float)} for k, v in res.items()}), flush=True)
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
