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
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from launch import code_env, eval_command  # noqa: E402
from startup import PHASES, run_phases  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--limit", type=int, default=0, help="problems (default 0: all 1319; a CPU smoke run wants a few)")
    ap.add_argument("--code", action="append", help="a posttrain source folder (repeatable; default src)")
    args = ap.parse_args()
    early = PHASES.replace('import torch; stamp("import_torch")', 'import torch; torch.cuda.is_available(); stamp("import_torch")')
    assert early != PHASES
    model, data_dir = str(Path(args.model).resolve()), str(Path(args.data_dir).resolve())  # the script runs from the root
    codes = args.code or ["src"]
    envs = {c: code_env(Path(c).resolve()) for c in codes}
    res = {"script": [], "script_early_cuda": [], **{f"cli {c}": [] for c in codes}}
    for i in range(args.runs):
        for name, script in (("script", PHASES), ("script_early_cuda", early)):
            _, result = run_phases(script, envs[codes[0]], model, data_dir, args.limit)
            res[name].append(result["stamps"] if "stamps" in result else {"error": result["stderr"][-800:]})
        for src in codes:
            out = Path(tempfile.mkdtemp(prefix="startup_ab_")) / "eval"
            cmd = eval_command(model, data_dir, out, 1, args.limit or 1319, args.limit)
            r = subprocess.run(cmd, env=envs[src], capture_output=True, text=True)
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
