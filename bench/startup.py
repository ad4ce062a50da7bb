"""Where `posttrain eval`'s time to first token goes, phase by phase, in a fresh process (issue 25).

    python bench/startup.py --model DIR --data-dir DIR --json OUT [--runs 3] [--limit N]

Each run is a new Python process that does what ``run_eval`` does, in its order, with a stamp (seconds
since the process started, as a user waits) after each step: the interpreter, torch, posttrain's
modules, the GSM8K task, transformers' tokenizer classes, the tokenizer, the model classes, the CUDA
context, the weights, the engine, and an evaluation of one new token for every prompt (rendering,
tokenising, the prefill, sampling, grading: stamped when it returns, so the first token of the whole
batch). Then the real ``python -m posttrain eval --max-new-tokens 1`` runs under ``-X importtime``:
its own phase stamps and first token, and its import time summed by top-level package (self time of
the package's modules, wherever they are first imported). Whether scikit-learn and scipy were
imported is recorded per run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from launch import code_env, eval_command  # noqa: E402

PHASES = r'''
import json, sys, time
from posttrain.utils import process_age_s
from posttrain.startup import enable_bytecode_cache
enable_bytecode_cache()  # first, as the posttrain command does
stamps = {"interpreter": process_age_s()}
def stamp(name): stamps[name] = process_age_s()
import torch; stamp("import_torch")
from posttrain.engine import load_model, load_tokenizer, make_engine
from posttrain.engine.base import SamplingParams
from posttrain.tasks import make_task; stamp("import_posttrain")
model_dir, data_dir, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]) or None
task = make_task("gsm8k", prompt_style="chat", fewshot=0, data_dir=data_dir)
examples = task.examples("test", limit); stamp("task")
import transformers; from transformers import AutoTokenizer; stamp("import_tokenizer_classes")
tok = load_tokenizer(model_dir); stamp("tokenizer")
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_dir))]; stamp("import_model_classes")
if torch.cuda.is_available():
    torch.empty(1, device="cuda"); torch.cuda.synchronize()
stamp("cuda_context")
model = load_model(model_dir, "auto", "auto"); stamp("weights")
engine = make_engine("fast", model, tok, len(examples)); stamp("engine")
from posttrain.evaluation import evaluate
evaluate(task, examples, engine, tok, SamplingParams(1, 0.0, 1.0, 1, [], 0), progress=False)
stamp("first_token")
print("PHASES " + json.dumps({"stamps": stamps, "sklearn_imported": "sklearn" in sys.modules,
                              "scipy_imported": "scipy" in sys.modules, "modules": len(sys.modules)}))
'''


def run_phases(script: str, env: dict, model: str, data_dir: str, limit: int) -> tuple[int, dict]:
    """Run a phase-stamping ``script`` (``PHASES`` or a variant of it) in a fresh process: its exit code
    and its printed result (stamps, modules imported), or the end of its stderr."""
    r = subprocess.run([sys.executable, "-c", script, model, data_dir, str(limit)], cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith("PHASES ")), None)
    return r.returncode, json.loads(line[7:]) if line else {"stderr": r.stderr[-3000:]}


def import_costs(stderr: str) -> dict:
    """-X importtime's lines summed by top-level package: self time of every module of the package (ms)."""
    self_ms: dict[str, float] = defaultdict(float)
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            self_ms[m.group(4).split(".")[0]] += int(m.group(1)) / 1000
    return dict(sorted(self_ms.items(), key=lambda kv: -kv[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--limit", type=int, default=0, help="the first N test problems (default all 1319)")
    ap.add_argument("--runs", type=int, default=2, help="fresh processes for the phase stamps (the first may fill caches)")
    ap.add_argument("--json", default=f"bench/results/startup_{datetime.date.today()}.json")
    args = ap.parse_args()
    env = code_env(ROOT / "src")
    rows = []
    for i in range(args.runs):
        rc, result = run_phases(PHASES, env, args.model, args.data_dir, args.limit)
        row = {"run": i, "rc": rc, **result}
        if "stamps" in row:
            s, prev = row["stamps"], 0.0
            row["phase_s"] = {}
            for k, v in s.items():
                row["phase_s"][k] = round(v - prev, 3)
                prev = v
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(tempfile.mkdtemp(prefix="startup_"))
    cmd = eval_command(args.model, args.data_dir, out / "eval", 1, 1319, args.limit, python_flags=("-X", "importtime"))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    summary = json.loads((out / "eval" / "summary.json").read_text()) if r.returncode == 0 else {}
    costs = import_costs(r.stderr)
    cli = {"rc": r.returncode, "first_token_s": summary.get("first_token_s_from_process_start"),
           "phases_end_s": summary.get("phases_end_s_from_process_start"),
           "import_ms_by_package": {k: round(v, 1) for k, v in list(costs.items())[:25]},
           "import_ms_total": round(sum(costs.values()), 1), **({} if r.returncode == 0 else {"stderr": r.stderr[-3000:]})}
    print(json.dumps(cli), flush=True)
    import torch

    meta = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "date": str(datetime.date.today()),
            "torch": torch.__version__, "model": args.model, "python": sys.version.split()[0]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "phases": rows, "cli_importtime": cli}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
