"""Bad input, table-driven: every case runs the real CLI (``main``, in a child forked from a process
that imported torch and transformers once: ``cli_forkserver``; a few cases also as new processes) and
must exit 2 with one line on stderr that says what is wrong, no traceback, nothing new written
anywhere, and nothing of the user's changed. Add every new case found here: this table is the
regression list."""

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

RL_TINY = ["--max-steps", "1", "--num-generations", "2", "--per-device-batch-size", "2", "--gradient-accumulation-steps", "1",
           "--max-new-tokens", "4", "--engine", "hf", "--eval-steps", "0", "--report-to", "none", "--train-limit", "4"]

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
    ("eval damaged tokenizer.json", ["eval", "--model", "{F}/tokenizer_garbage", "--limit", "2"], "tokenizer.json: expected value"),
    ("eval config of the wrong types", ["eval", "--model", "{F}/config_types", "--limit", "2"], "Field 'vocab_size' expected int"),
    ("eval config with a zero head count", ["eval", "--model", "{F}/config_heads0", "--limit", "2"], "ZeroDivisionError"),
    ("eval tokenizer config not an object", ["eval", "--model", "{F}/tokenizer_config_list", "--limit", "2"],
     "could not load the tokenizer"),
    ("eval generation config eos not an id", ["eval", "--model", "{F}/generation_eos", "--limit", "2"],
     "generation_config.json gives eos_token_id 'x'"),
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
     "holds files posttrain did not write"),
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
    # -- issue 23: ownership a file name cannot forge (each of these once deleted or replaced the user's files)
    ("overwrite with a touched sft_config.json", ["sft", "--model", "{F}/model", "--output", "{F}/user_touched", "--overwrite"],
     "holds files posttrain did not write"),
    ("overwrite with a folder named rl_config.json", ["sft", "--model", "{F}/model", "--output", "{F}/user_dir_marker", "--overwrite"],
     "holds files posttrain did not write"),
    ("overwrite the current folder", ["sft", "--model", "{F}/model", "--output", ".", "--overwrite"], "holds files posttrain did not write"),
    ("pretrain over a folder with an empty pretrain.json", ["pretrain", "--output", "{F}/user_pretrain", "--corpus", "{F}/corpus.jsonl"],
     "posttrain did not write it"),
    ("resume into a model folder", ["sft", "--model", "{F}/model", "--output", "{F}/model", "--resume"], "holds files posttrain did not write"),
    ("resume into a user folder", ["rl", "--model", "{F}/model", "--output", "{F}/user_folder", "--resume"], "holds files posttrain did not write"),
    ("resume through a symlink to a user folder", ["sft", "--model", "{F}/model", "--output", "{F}/link_to_user", "--resume"],
     "holds files posttrain did not write"),
    ("pipeline into a user folder holding sft/model", ["pipeline", "--model", "{F}/model", "--output", "{F}/user_pipeline"],
     "holds files posttrain did not write"),
    ("pipeline into a user folder holding eval_base/summary.json", ["pipeline", "--model", "{F}/model", "--output", "{F}/user_eval_base"],
     "holds files posttrain did not write"),
    ("eval over a user's summary.json", ["eval", "--model", "{F}/model", "--limit", "1", "--max-new-tokens", "2", "--output", "{F}/user_eval"],
     "holds files posttrain did not write"),
    ("eval into a training run", ["eval", "--model", "{F}/model", "--limit", "1", "--max-new-tokens", "2", "--output", "{F}/finished_run"],
     "holds a posttrain sft run; posttrain eval writes only into a new folder or its own"),
    ("grade over an existing file", ["grade", "{F}/good.jsonl", "--output", "{F}/user_folder/thesis.tex"], "already exists"),
    ("pretrain over a user's m.logs", ["pretrain", "--output", "{F}/pm", "--corpus", "{F}/corpus.jsonl"], "holds files posttrain did not write"),
    ("merge over a finished run", ["merge", "--adapter", "{F}/finished_run", "--output", "{F}/finished_run2"], "posttrain sft output"),
    # -- issue 23: config values typed by their field
    ("quoted false for a boolean", ["eval", "--model", "{F}/model", "--config", "{F}/quoted_false.yaml"],
     "option trust_remote_code expects true or false, got the text 'false'"),
    ("no for a boolean", ["sft", "--model", "{F}/model", "--output", "out", "--config", "{F}/resume_no.yaml"],
     "option resume expects true or false, got the text 'no'"),
    ("2.9 for an int", ["eval", "--model", "{F}/model", "--config", "{F}/limit_2_9.yaml"], "give a whole number"),
    ("a duplicated key", ["eval", "--model", "{F}/model", "--config", "{F}/duplicate.yaml"], "duplicate.yaml:3: option limit is given twice"),
    ("a number for the stop strings", ["eval", "--model", "{F}/model", "--config", "{F}/stop_5.yaml"], "option stop expects a list of text"),
    ("a duplicated key in a pipeline stage", ["pipeline", "--model", "{F}/model", "--output", "out", "--config", "{F}/pipe_duplicate.yaml"],
     "option max_steps is given twice"),
    # -- issue 23: numbers range-checked before a model loads
    ("sft weight decay negative", ["sft", "--model", "{F}/model", "--weight-decay", "-1", "--output", "out"], "invalid weight_decay=-1.0"),
    ("sft warmup steps negative", ["sft", "--model", "{F}/model", "--warmup-steps", "-5", "--output", "out"], "invalid warmup_steps=-5"),
    ("sft lora alpha 0", ["sft", "--model", "{F}/model", "--lora-alpha", "0", "--output", "out"], "invalid lora_alpha=0"),
    ("sft unknown report-to", ["sft", "--model", "{F}/model", "--report-to", "tensorbord", "--output", "out"], "unknown --report-to 'tensorbord'"),
    ("rl epsilon high negative", ["rl", "--model", "{F}/model", "--epsilon-high", "-1", "--output", "out"], "invalid epsilon_high=-1.0"),
    ("rl top-p 0", ["rl", "--model", "{F}/model", "--top-p", "0", "--output", "out"], "invalid top_p=0.0"),
    ("eval on mps", ["eval", "--model", "{F}/model", "--device", "mps", "--limit", "1"], "MPS is not usable here"),
    ("eval on xpu", ["eval", "--model", "{F}/model", "--device", "xpu", "--limit", "1"], "no Intel XPU is usable here"),
    ("eval unknown engine", ["eval", "--model", "{F}/model", "--engine", "vllm", "--limit", "1"], "unknown --engine 'vllm'"),
    ("pretrain save dtype fp16", ["pretrain", "--output", "pm", "--corpus", "{F}/corpus.jsonl", "--save-dtype", "fp16"],
     "unknown --save-dtype 'fp16'"),
    ("pretrain malformed corpus", ["pretrain", "--output", "pm", "--corpus", "{F}/corpus_malformed.jsonl"],
     "corpus_malformed.jsonl:2: malformed JSON"),
    ("pretrain corpus of rows, not documents", ["pretrain", "--output", "pm", "--corpus", "{F}/malformed.jsonl"],
     "malformed.jsonl:1: expected a JSON string (a document), got dict"),
    ("pretrain corpus of numbers", ["pretrain", "--output", "pm", "--corpus", "{F}/numbers.jsonl"], "numbers.jsonl:1: expected a JSON string"),
    ("pretrain corpus not gzip", ["pretrain", "--output", "pm", "--corpus", "{F}/not.jsonl.gz"], "not.jsonl.gz is not a gzip file"),
    # -- issue 23: silently wrong once
    ("eval weights matching none of the tensors", ["eval", "--model", "{F}/renamed", "--limit", "1"], "match none of the model's tensors"),
    ("rl reward returning a string", ["rl", "--model", "{F}/model", "--reward", "{F}/rewards.py:as_text", "--output", "out", *RL_TINY],
     "reward function 'rewards.as_text' returned str"),
    ("merge an adapter with a damaged pickle", ["merge", "--adapter", "{F}/pickled_adapter", "--output", "merged"],
     "not a readable checkpoint (a damaged or foreign pickle)"),
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
    for name, file, text in (("tokenizer_garbage", "tokenizer.json", "garbage{"), ("tokenizer_config_list", "tokenizer_config.json", "[1, 2]"),
                             ("generation_eos", "generation_config.json", '{"eos_token_id": "x"}')):
        shutil.copytree(tiny_model_dir, f / name)
        (f / name / file).write_text(text)
    for name, changes in (("config_types", {"vocab_size": "2048x"}), ("config_heads0", {"num_attention_heads": 0, "head_dim": None})):
        shutil.copytree(tiny_model_dir, f / name)
        config = json.loads((f / name / "config.json").read_text())
        (f / name / "config.json").write_text(json.dumps({**config, **changes}))
    train(SFTConfig(model=str(f / "model"), output=str(f / "finished_run"), max_steps=1, train_limit=8, per_device_batch_size=2,
                    gradient_accumulation_steps=1, eval_steps=0, report_to=[], max_len=300, save_steps=1))
    _issue_23_fixtures(f)
    return f


def _issue_23_fixtures(f: Path) -> None:
    """Folders and files of a user's that look like posttrain's by name only, and inputs of the wrong type."""
    from safetensors.torch import load_file, save_file

    for name in ("user_touched", "user_dir_marker", "user_pretrain"):
        (f / name).mkdir()
        (f / name / "thesis.tex").write_text("years of work")
    (f / "user_touched" / "sft_config.json").touch()
    (f / "user_dir_marker" / "rl_config.json").mkdir()
    (f / "user_pretrain" / "pretrain.json").write_text("{}")
    (f / "link_to_user").symlink_to(f / "user_folder")
    (f / "user_pipeline" / "sft" / "model").mkdir(parents=True)
    (f / "user_pipeline" / "sft" / "model" / "thesis.tex").write_text("work")
    (f / "user_eval_base" / "eval_base").mkdir(parents=True)
    (f / "user_eval_base" / "eval_base" / "summary.json").write_text('{"accuracy": 0.99, "strict_accuracy": 0.99, "n": 1, "ci95": [0, 1]}')
    (f / "user_eval").mkdir()
    (f / "user_eval" / "summary.json").write_text('{"mine": true}')
    (f / "user_eval" / "records.jsonl").write_text('{"mine": true}\n')
    (f / "pm.logs").mkdir()
    (f / "pm.logs" / "metrics.jsonl").write_text("my own log\n")
    (f / "corpus.jsonl").write_text("".join(json.dumps(f"Tom has {i} apples. The answer is {i}.") + "\n" for i in range(50)))
    (f / "corpus_malformed.jsonl").write_text('"a document"\n{broken\n')
    (f / "numbers.jsonl").write_text("1\n2\n")
    (f / "not.jsonl.gz").write_text('"not gzip"\n')
    for name, text in (("quoted_false", 'trust_remote_code: "false"\nlimit: 1\n'), ("resume_no", "resume: no\n"),
                       ("limit_2_9", "limit: 2.9\n"), ("duplicate", "limit: 2\nmax_new_tokens: 4\nlimit: 3\n"), ("stop_5", "stop: 5\n"),
                       ("pipe_duplicate", "sft:\n  max_steps: 3\n  max_steps: 4\n")):
        (f / f"{name}.yaml").write_text(text)
    (f / "rewards.py").write_text("def as_text(prompts, completions, answer, **kw):\n    return '1' * len(completions)\n")
    shutil.copytree(f / "model", f / "renamed")
    weights = load_file(str(f / "model" / "model.safetensors"))
    save_file({"transformer." + k: v for k, v in weights.items()}, str(f / "renamed" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(f / "finished_run", f / "pickled_adapter")
    (f / "pickled_adapter" / "adapter_model.safetensors").unlink()
    (f / "pickled_adapter" / "adapter_model.bin").write_bytes(b"\x80\x04garbage, no pickle")
    shutil.copytree(f / "finished_run", f / "finished_run2")


def _case_env(work: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", POSTTRAIN_HOME=str(work / ".home"),
                TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")


def _work_dirs(tmp_path: Path, n: int) -> list[Path]:
    """A working folder per case, each with its own POSTTRAIN_HOME."""
    for i in range(n):
        (tmp_path / f"w{i}" / ".home").mkdir(parents=True)
    return [tmp_path / f"w{i}" for i in range(n)]


def _argv(case, fixtures: Path) -> list[str]:
    return [a.replace("{F}", str(fixtures)) for a in case[1]]


def _run(case, fixtures: Path, work: Path):
    """One case as a user runs it: a new ``python -m posttrain`` process."""
    r = subprocess.run([sys.executable, "-m", "posttrain", *_argv(case, fixtures)], cwd=work, capture_output=True, text=True,
                       timeout=300, env=_case_env(work))
    return case[0], case[2], r


def _run_all_forked(cases, fixtures: Path, works: list[Path], logs: Path, monkeypatch) -> list:
    """Every case in a child of its own, forked from one server that imported torch and
    transformers once (``cli_forkserver``): what ``python -m posttrain`` does after its imports."""
    import cli_forkserver

    # The server starts with this environment (a new interpreter's, as each case's would be).
    for key, value in _case_env(logs).items():
        if key != "POSTTRAIN_HOME":
            monkeypatch.setenv(key, value)
    path = [str(ROOT / "src"), str(Path(__file__).parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    jobs = [(_argv(case, fixtures), str(work), _case_env(work), str(logs / f"{i}.out"), str(logs / f"{i}.err"))
            for i, (case, work) in enumerate(zip(cases, works))]
    with cli_forkserver.pool(3) as pool:
        futures = [pool.submit(cli_forkserver.run, *job) for job in jobs]
        outcomes = []
        for case, future in zip(cases, futures):
            try:
                outcomes.append(future.result(timeout=300))
            except Exception as e:  # a child that died or hung: name the case
                pytest.fail(f"{case[0]}: the forked command did not finish ({type(e).__name__}: {e})")
    assert all(preloaded for _, preloaded in outcomes)  # each case was a fork of the preloaded server
    return [(case[0], case[2], subprocess.CompletedProcess(job[0], rc, Path(job[3]).read_text(), Path(job[4]).read_text()))
            for case, job, (rc, _) in zip(cases, jobs, outcomes)]


def _failures(results, works) -> list[str]:
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
    return failures


def test_every_bad_input_gets_one_line_and_changes_nothing(fixtures, tmp_path, monkeypatch):
    before = _snapshot(fixtures)
    works = _work_dirs(tmp_path, len(CASES))
    (tmp_path / "logs").mkdir()
    results = _run_all_forked(CASES, fixtures, works, tmp_path / "logs", monkeypatch)
    failures = _failures(results, works)
    assert not failures, "\n".join(failures)
    assert _snapshot(fixtures) == before  # nothing of the user's was touched
    assert json.loads((fixtures / "finished_run" / "sft_config.json").read_text())["learning_rate"] == 2e-4
    assert len(CASES) >= 50
    print(f"{len(CASES)} bad inputs: {len(CASES)} clean one-line errors, 0 destructive")


# A few of the table's cases as a user meets them, each a new interpreter: an error raised while the
# command's modules import, or output printed then, would show only here.
AS_PROCESSES = ["unknown flag", "eval truncated weights", "rl learning rate inf", "overwrite a folder posttrain did not write",
                "eval into a training run"]


def test_bad_inputs_in_new_processes_get_one_line_and_change_nothing(fixtures, tmp_path):
    before = _snapshot(fixtures)
    cases = [c for c in CASES if c[0] in AS_PROCESSES]
    assert len(cases) == len(AS_PROCESSES)
    works = _work_dirs(tmp_path, len(cases))
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda cw: _run(cw[0], fixtures, cw[1]), zip(cases, works)))
    failures = _failures(results, works)
    assert not failures, "\n".join(failures)
    assert _snapshot(fixtures) == before


def test_a_command_that_needs_no_model_answers_without_importing_torch(tmp_path):
    """The parser configures only the command that runs: ``grade`` (and a usage error) never import
    torch, which costs seconds at every start."""
    code = ("import sys\nfrom posttrain.cli.main import main\n"
            f"rc = main(['grade', {str(tmp_path / 'nope.jsonl')!r}])\n"
            "print(rc, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["2", "False"], r.stdout + r.stderr
    assert "file not found" in r.stderr


def test_the_package_imports_without_side_effects():
    r = subprocess.run([sys.executable, "-c", "import posttrain.cli.main"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == ""


# -- damaged run files on --resume: skipped with a note (exit 0) or a one-line stop (exit 2), as damaged checkpoints are
SFT_AS_FIXTURE = ["--train-limit", "8", "--per-device-batch-size", "2", "--gradient-accumulation-steps", "1", "--eval-steps", "0",
                  "--report-to", "none", "--max-len", "300", "--save-steps", "1"]


def _every_manifest(run: Path, text: str) -> None:
    for step in (run / "checkpoints").glob("step-*"):
        (step / "manifest.json").write_text(text)


def _poison_optimizer(run: Path) -> None:
    """A damaged optimizer.bin whose manifest was written for the damage: only loading can tell."""
    from posttrain.trainers.checkpoints import _crc32

    for step in (run / "checkpoints").glob("step-*"):
        (step / "optimizer.bin").write_bytes(b"\x80\x04 not a pickle at all")
        manifest = json.loads((step / "manifest.json").read_text())
        manifest["files"]["optimizer.bin"] = {"size": (step / "optimizer.bin").stat().st_size, "crc32": _crc32(step / "optimizer.bin")}
        (step / "manifest.json").write_text(json.dumps(manifest))


DAMAGED_RUNS = [  # (name, damage, exit code, what stdout or stderr says)
    ("a checkpoints/step-abc folder", lambda r: (r / "checkpoints" / "step-abc").mkdir(), 0, "resumed from"),
    ("a garbage run_state.json", lambda r: (r / "run_state.json").write_bytes(b"\x00\xffgarbage"), 0, "run_state.json is damaged; ignoring it"),
    ("an incomplete run_state.json", lambda r: (r / "run_state.json").write_text('{"finished": tr'), 0, "run_state.json is damaged"),
    ("a garbage line in metrics.jsonl", lambda r: (r / "metrics.jsonl").write_text('{"step": 1}\nnot json\n'), 0, "skipped 1 damaged line"),
    ("a manifest.json that is a list", lambda r: _every_manifest(r, "[]"), 2, "every checkpoint in"),
    ("a damaged optimizer.bin", _poison_optimizer, 2, "every checkpoint in"),
    ("a garbage sft_config.json", lambda r: (r / "sft_config.json").write_text("not json"), 2, "sft_config.json is damaged"),
    ("a missing sft_config.json", lambda r: (r / "sft_config.json").unlink(), 2, "sft_config.json is missing"),
    ("checkpoints that is a file", lambda r: (shutil.rmtree(r / "checkpoints"), (r / "checkpoints").write_text("x")), 2, "is not a folder"),
]


@pytest.mark.parametrize("name,damage,rc,said", DAMAGED_RUNS, ids=[c[0] for c in DAMAGED_RUNS])
def test_resume_over_damaged_run_files(fixtures, tmp_path, capsys, name, damage, rc, said):
    from posttrain.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(fixtures / "finished_run", run, symlinks=True)
    damage(run)
    capsys.readouterr()
    got = main(["sft", "--model", str(fixtures / "model"), "--output", str(run), "--resume", "--max-steps", "2", *SFT_AS_FIXTURE])
    out, err = capsys.readouterr()
    assert got == rc and said in out + err and "Traceback" not in err, (out[-800:], err[-800:])
    if rc:  # one error line, the last (transformers' weight-loading bar may come before it)
        lines = err.strip().splitlines()
        assert lines[-1].startswith("posttrain sft: error:") and sum("error" in line for line in lines) == 1
    else:
        assert json.loads((run / "run_state.json").read_text())["step"] == 2
    if "step-abc" in name:
        assert (run / "checkpoints" / "step-abc").is_dir()  # not posttrain's: never removed


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_resume_with_read_only_checkpoints_stops_in_one_line(fixtures, tmp_path, capsys):
    from posttrain.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(fixtures / "finished_run", run)
    (run / "checkpoints").chmod(0o555)
    try:
        got = main(["sft", "--model", str(fixtures / "model"), "--output", str(run), "--resume", "--max-steps", "2", *SFT_AS_FIXTURE])
    finally:
        (run / "checkpoints").chmod(0o755)
    assert got == 2 and "cannot write in" in capsys.readouterr().err


def test_resume_where_no_run_is_says_so_and_a_run_killed_before_its_first_step_starts_afresh(fixtures, tmp_path, capsys):
    from posttrain.cli.main import main
    from posttrain.rundir import RunDir

    args = ["sft", "--model", str(fixtures / "model"), "--max-steps", "1", *SFT_AS_FIXTURE]
    assert main([*args, "--output", str(tmp_path / "new"), "--resume"]) == 0
    assert "--resume: nothing to resume in" in capsys.readouterr().out
    killed = RunDir.open(tmp_path / "killed", "sft")  # what a run killed while loading its model leaves
    killed.entry("sft_config.json").write_text('{"learning_rate": 0.5}')
    killed.release()
    assert main([*args, "--output", str(tmp_path / "killed")]) == 0
    assert "stopped before its first step; starting it afresh" in capsys.readouterr().out
    assert json.loads((tmp_path / "killed" / "sft_config.json").read_text())["learning_rate"] == 2e-4


def test_two_runs_into_one_folder_get_one_writer(fixtures, tmp_path):
    """The second process meets a one-line error; the first finishes as if alone."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    out = tmp_path / "run"
    args = [sys.executable, "-m", "posttrain", "sft", "--model", str(fixtures / "model"), "--output", str(out), "--max-steps", "3",
            *SFT_AS_FIXTURE]
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time

    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None and not (out / ".posttrain.lock").exists():
        time.sleep(0.02)
    second = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    first.communicate(timeout=300)
    assert first.returncode == 0
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1 and "is writing to" in second.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_the_next_merge_clears_the_temp_folder_of_a_killed_one(fixtures, tmp_path, capsys):
    from posttrain.cli.main import main

    code = ("import sys, os; from posttrain.rundir import make_temp_folder; d = make_temp_folder(sys.argv[1], 'merged'); "
            "(d / 'model.safetensors').write_bytes(b'half'); os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert len(list(tmp_path.glob(".merged.posttrain-tmp-*"))) == 1  # what a merge killed mid-save leaves
    assert main(["merge", "--adapter", str(fixtures / "finished_run"), "--output", str(tmp_path / "merged")]) == 0
    assert not list(tmp_path.glob(".merged.*")) and (tmp_path / "merged" / "model.safetensors").is_file()
    assert "left by an interrupted posttrain run" in capsys.readouterr().out


def test_pretrain_replaces_only_its_own_model_folder(tmp_path, capsys):
    from posttrain.cli.main import main
    from posttrain.rundir import read_record

    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(f"Tom has {i} apples and {i + 2} pears. The answer is {2 * i + 2}.") + "\n"
                                                   for i in range(120)))
    args = ["pretrain", "--output", str(tmp_path / "m"), "--corpus", str(tmp_path / "corpus.jsonl"), "--vocab-size", "300",
            "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1", "--intermediate-size", "64",
            "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--logging-steps", "1"]
    assert main(args) == 0
    assert main(args) == 2 and "already holds a run; pass --resume" in capsys.readouterr().err  # as sft and rl
    assert main([*args, "--overwrite"]) == 0  # replaces the first: posttrain's record lists all of it
    assert read_record(tmp_path / "m").command == "pretrain" and (tmp_path / "m" / "model.safetensors").is_file()
    assert len((tmp_path / "m.logs" / "metrics.jsonl").read_text().splitlines()) == 2
    (tmp_path / "m" / "notes.md").write_text("mine")
    capsys.readouterr()
    assert main([*args, "--overwrite"]) == 2 and "holds files posttrain did not write (notes.md)" in capsys.readouterr().err
    assert (tmp_path / "m" / "notes.md").read_text() == "mine"


def test_a_library_deprecation_a_user_cannot_act_on_does_not_precede_the_error_line(tmp_path):
    """peft warns through transformers' deprecated ``is_gradient_checkpointing`` each time it wraps a
    model; after ``main`` has run, that warning (its real text) is not shown, others still are."""
    probe = ("import warnings\nfrom posttrain.cli.main import main\nmain(['grade', 'missing.jsonl'])\n"
             "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
             "`is_activation_checkpointing` instead.', FutureWarning)\nwarnings.warn('another one', FutureWarning)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert "posttrain grade: error:" in r.stderr and "is_gradient_checkpointing" not in r.stderr and "another one" in r.stderr
