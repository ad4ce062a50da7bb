"""Bad input, table-driven: every case runs the real CLI in a subprocess and must exit 2 with one
line on stderr that says what is wrong, no traceback, nothing new written anywhere, and nothing of
the user's changed. Add every new case found here: this table is the regression list."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT

# (name, argv with {F} = the fixtures folder, what stderr must say)
CASES = [
    # -- text files that are not text, or not what they claim
    ("grade binary file", ["grade", "{F}/binary.jsonl"], "is not UTF-8 text"),
    ("grade empty file", ["grade", "{F}/empty.jsonl"], "holds no rows"),
    ("grade missing file", ["grade", "{F}/nope.jsonl"], "file not found"),
    ("grade row without answer", ["grade", "{F}/no_answer.jsonl"], "has no 'answer' field"),
    ("data garbage jsonl", ["data", "--task", "{F}/binary.jsonl"], "is not UTF-8 text"),
    ("data malformed jsonl", ["data", "--task", "{F}/malformed.jsonl"], "malformed JSON"),
    ("data csv that is binary", ["data", "--task", "{F}/binary.csv"], "is not UTF-8 text"),
    ("eval binary config", ["eval", "--config", "{F}/binary.yaml"], "is not UTF-8 text"),
    ("eval invalid yaml", ["eval", "--config", "{F}/bad.yaml"], "invalid YAML"),
    ("pipeline binary config", ["pipeline", "--config", "{F}/binary.yaml"], "is not UTF-8 text"),
    ("eval config is a folder", ["eval", "--config", "{F}"], "config file not found"),
    # -- damaged model files
    ("eval truncated weights", ["eval", "--model", "{F}/truncated", "--limit", "2"], "could not read the weights"),
    ("eval zero-byte weights", ["eval", "--model", "{F}/zero", "--limit", "2"], "could not read the weights"),
    ("eval flipped header", ["eval", "--model", "{F}/flipped", "--limit", "2"], "could not read the weights"),
    ("rl truncated weights", ["rl", "--model", "{F}/truncated", "--output", "out", "--max-steps", "1"], "could not read the weights"),
    ("eval missing model", ["eval", "--model", "{F}/nope", "--limit", "2"], "is not a local folder"),
    ("eval missing gguf", ["eval", "--model", "{F}/nope.gguf"], "GGUF file not found"),
    ("eval named model not fetched", ["eval", "--model", "smollm2-135m-instruct"], "posttrain fetch smollm2-135m-instruct"),
    # -- output paths that cannot be written
    ("eval output under /proc", ["eval", "--model", "{F}/model", "--limit", "2", "--output", "/proc/posttrain-x"], "cannot write"),
    ("eval output is /dev/null", ["eval", "--model", "{F}/model", "--limit", "2", "--output", "/dev/null"], "is a file"),
    ("eval output below a file", ["eval", "--model", "{F}/model", "--output", "{F}/empty.jsonl/x"], "is a file, so nothing"),
    ("eval output is a file", ["eval", "--model", "{F}/model", "--output", "{F}/empty.jsonl"], "is a file"),
    ("grade output is a folder", ["grade", "{F}/good.jsonl", "--output", "{F}"], "is a folder"),
    ("grade output is its input", ["grade", "{F}/good.jsonl", "--output", "{F}/good.jsonl"], "is the input file"),
    ("sft output below /dev/null", ["sft", "--model", "{F}/model", "--output", "/dev/null/x"], "is a file, so nothing"),
    ("pipeline output under /proc", ["pipeline", "--model", "{F}/model", "--output", "/proc/x"], "cannot write"),
    ("fetch output not ours", ["fetch", "smollm2-135m-instruct", "--output", "{F}/user_folder", "--wheel", "{F}/good.jsonl"],
     "was not written by posttrain fetch"),
    # -- devices
    ("eval on cuda without cuda", ["eval", "--model", "{F}/model", "--device", "cuda", "--limit", "2"], "no CUDA GPU"),
    ("generate on cuda:7", ["generate", "--model", "{F}/model", "--device", "cuda:7", "--prompt", "x"], "no CUDA GPU"),
    ("eval unknown device", ["eval", "--model", "{F}/model", "--device", "tpu", "--limit", "2"], "unknown device"),
    # -- numbers out of range or not numbers
    ("eval temperature nan", ["eval", "--model", "{F}/model", "--temperature", "nan"], "must be a finite number"),
    ("rl learning rate inf", ["rl", "--model", "{F}/model", "--learning-rate", "inf", "--output", "out"], "must be a finite number"),
    ("eval limit 0", ["eval", "--model", "{F}/model", "--limit", "0"], ">= 1"),
    ("eval limit negative", ["eval", "--model", "{F}/model", "--limit", "-3"], ">= 1"),
    ("sft train limit 0", ["sft", "--model", "{F}/model", "--train-limit", "0", "--output", "out"], "invalid train_limit=0"),
    ("sft train limit negative", ["sft", "--model", "{F}/model", "--train-limit", "-5", "--output", "out"], "invalid train_limit=-5"),
    ("sft save steps negative", ["sft", "--model", "{F}/model", "--save-steps", "-1", "--output", "out"], "invalid save_steps=-1"),
    ("rl eval steps negative", ["rl", "--model", "{F}/model", "--eval-steps", "-1", "--output", "out"], "invalid eval_steps=-1"),
    ("eval budget beyond positions", ["eval", "--model", "{F}/model", "--limit", "2", "--max-new-tokens", "5000"],
     "exceeds the model's 1024 positions"),
    ("sft unknown task", ["sft", "--model", "{F}/model", "--task", "nope", "--output", "out"], "unknown task"),
    ("unknown option in config", ["eval", "--config", "{F}/unknown_key.yaml"], "unknown option(s) learning_rat"),
    ("fetch unknown model", ["fetch", "gpt-17"], "unknown model 'gpt-17'"),
    ("eval hub id while offline", ["eval", "--model", "no-such-org/no-such-model", "--limit", "1"], "could not be fetched from the hub"),
    ("eval batch size 0", ["eval", "--model", "{F}/model", "--batch-size", "0"], "--batch-size must be >= 1"),
    ("eval samples without sampling", ["eval", "--model", "{F}/model", "--num-samples", "4"], "--num-samples > 1 needs sampling"),
    ("eval gsm8k from an empty folder", ["eval", "--model", "{F}/model", "--task", "gsm8k", "--data-dir", "{F}/user_folder",
                                        "--output", "never"], "GSM8K test split not found"),
    ("eval limit not a number", ["eval", "--model", "{F}/model", "--limit", "x"], "invalid int value: 'x'"),
    ("unknown flag", ["eval", "--modle", "x"], "unrecognized arguments: --modle"),
    ("grade malformed line", ["grade", "{F}/malformed.jsonl", "--output", "graded.jsonl"], "malformed.jsonl:2: malformed JSON"),
    # -- never destroy: each of these once deleted or replaced something of the user's
    ("overwrite a folder posttrain did not write", ["sft", "--model", "{F}/model", "--output", "{F}/user_folder", "--overwrite"],
     "not written by a posttrain run"),
    ("overwrite with a mistyped task", ["sft", "--model", "{F}/model", "--output", "{F}/finished_run", "--overwrite", "--task", "nope"],
     "unknown task"),
    ("merge into the adapter itself", ["merge", "--adapter", "{F}/finished_run", "--output", "{F}/finished_run"],
     "is the adapter folder or one that holds it"),
    ("merge into the adapter's parent", ["merge", "--adapter", "{F}/finished_run", "--output", "{F}"],
     "is the adapter folder or one that holds it"),
    ("merge over a data file", ["merge", "--adapter", "{F}/finished_run", "--output", "{F}/good.jsonl"], "is a file"),
    ("merge over a user folder", ["merge", "--adapter", "{F}/finished_run", "--output", "{F}/user_folder"], "already exists"),
    ("merge 4-bit copy over a user folder", ["merge", "--adapter", "{F}/finished_run", "--output", "{F}/user", "--quantize-4bit"],
     "already exists"),
    ("resume with another learning rate", ["sft", "--model", "{F}/model", "--output", "{F}/finished_run", "--resume",
                                           "--max-steps", "3", "--learning-rate", "0.5", "--train-limit", "8",
                                           "--per-device-batch-size", "2", "--gradient-accumulation-steps", "1",
                                           "--eval-steps", "0", "--report-to", "none", "--max-len", "300"],
     "--learning-rate is 0.5 but the run"),
]


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, tiny_model_dir):
    from posttrain.trainers.sft import SFTConfig, train

    f = tmp_path_factory.mktemp("inputs")
    (f / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    (f / "binary.csv").write_bytes(b"question,answer\n\xff\xfe\x00\x81")
    (f / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    (f / "bad.yaml").write_text("model: [unclosed\n")
    (f / "unknown_key.yaml").write_text("learning_rat: 1\n")
    (f / "empty.jsonl").write_text("")
    (f / "malformed.jsonl").write_text('{"question": "q", "answer": "1"}\n{not json\n')
    (f / "no_answer.jsonl").write_text('{"completion": "#### 4"}\n')
    (f / "good.jsonl").write_text('{"completion": "#### 4", "answer": "4"}\n')
    (f / "user_folder").mkdir()
    (f / "user_folder" / "thesis.tex").write_text("years of work")
    (f / "user-4bit").mkdir()
    (f / "user-4bit" / "notes.txt").write_text("mine")
    shutil.copytree(tiny_model_dir, f / "model")
    weights = (f / "model" / "model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]), ("zero", b""),
                       ("flipped", bytes([weights[0] ^ 0xFF, weights[1] ^ 0xFF]) + weights[2:])):
        shutil.copytree(tiny_model_dir, f / name)
        (f / name / "model.safetensors").write_bytes(data)
    train(SFTConfig(model=str(f / "model"), output=str(f / "finished_run"), max_steps=1, train_limit=8, per_device_batch_size=2,
                    gradient_accumulation_steps=1, eval_steps=0, report_to=[], max_len=300, save_steps=1))
    return f


def _run(case, fixtures: Path, work: Path):
    name, argv, expected = case
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", POSTTRAIN_HOME=str(work / ".home"),
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    argv = [a.replace("{F}", str(fixtures)) for a in argv]
    r = subprocess.run([sys.executable, "-m", "posttrain", *argv], cwd=work, capture_output=True, text=True, timeout=300, env=env)
    return name, expected, r


def test_every_bad_input_gets_one_line_and_changes_nothing(fixtures, tmp_path):
    before = _snapshot(fixtures)
    works = []
    for i, _ in enumerate(CASES):
        (tmp_path / f"w{i}" / ".home").mkdir(parents=True)
        works.append(tmp_path / f"w{i}")
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda cw: _run(cw[0], fixtures, cw[1]), zip(CASES, works)))
    failures = []
    for (name, expected, r), work in zip(results, works):
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        # posttrain's bytecode cache (posttrain.startup) is no output: it is all .home may hold
        leftovers = [str(p.relative_to(work)) for p in work.rglob("*")
                     if p != work / ".home" and work / ".home" / "pycache" not in (p, *p.parents)]
        ok = (r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr and expected in r.stderr
              and lines[0].startswith("posttrain") and not leftovers)
        if not ok:
            failures.append(f"{name}: rc={r.returncode} leftovers={leftovers} stderr={r.stderr[-600:]!r}")
    assert not failures, "\n".join(failures)
    assert _snapshot(fixtures) == before  # nothing of the user's was touched
    assert json.loads((fixtures / "finished_run" / "sft_config.json").read_text())["learning_rate"] == 2e-4
    assert len(CASES) >= 50
    print(f"{len(CASES)} bad inputs: {len(CASES)} clean one-line errors, 0 destructive")


def test_the_package_imports_without_side_effects():
    r = subprocess.run([sys.executable, "-c", "import posttrain.cli.main"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == ""
