"""The CLI end to end in subprocesses: eval, data, grade, generate, score, and bad input."""

import json

from conftest import GSM8K_DIR, run_cli


def test_eval_writes_summary_and_records(tiny_model_dir, tmp_path):
    out = tmp_path / "ev"
    r = run_cli("eval", "--model", tiny_model_dir, "--task", "gsm8k", "--data-dir", GSM8K_DIR, "--limit", 6,
                "--max-new-tokens", 8, "--batch-size", 4, "--output", out, "--engine", "hf")
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 6 and {"accuracy", "strict_accuracy", "tokens_per_s", "truncation_rate"} <= set(summary)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 6
    assert {"question", "prompt", "generation", "pred", "gold", "correct", "strict_correct", "gen_len", "stopped"} <= set(records[0])
    assert records[0]["gold"] == "18"
    assert "accuracy (flexible)" in r.stdout


def test_eval_pass_at_k(tiny_model_dir, tmp_path):
    r = run_cli("eval", "--model", tiny_model_dir, "--limit", 3, "--max-new-tokens", 4, "--num-samples", 3,
                "--temperature", 0.8, "--output", tmp_path / "e", "--engine", "hf")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert "pass@3" in s and "maj@3" in s and s["pass@3"] >= s["maj@3"] - 1e-9


def test_data_command_shows_gsm8k_sizes():
    r = run_cli("data", "--task", "gsm8k", "--data-dir", GSM8K_DIR)
    assert r.returncode == 0, r.stderr
    assert "7473" in r.stdout and "1319" in r.stdout


def test_data_command_token_lengths(tiny_model_dir):
    r = run_cli("data", "--task", "gsm_symbolic", "--tokenizer", tiny_model_dir, "--max-len", 100)
    assert r.returncode == 0, r.stderr
    assert "share over --max-len 100" in r.stdout


def test_grade_command(tmp_path):
    inp = tmp_path / "in.jsonl"
    rows = [{"completion": "so #### 1,234", "answer": "work\n#### 1234"},
            {"completion": "The answer is 7", "answer": 7},
            {"completion": "#### 3", "answer": "4"}]
    inp.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out.jsonl"
    r = run_cli("grade", inp, "--output", out)
    assert r.returncode == 0, r.stderr
    graded = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["correct"] for g in graded] == [True, True, False]
    assert [g["strict_correct"] for g in graded] == [True, False, False]
    assert "accuracy 0.6667" in r.stdout


def test_generate_and_score(tiny_model_dir):
    r = run_cli("generate", "--model", tiny_model_dir, "--prompt", "2*15=", "--max-new-tokens", 5,
                "--num-return-sequences", 2)
    assert r.returncode == 0, r.stderr and r.stdout.count("2*15=") == 2
    r = run_cli("score", "--model", tiny_model_dir, "--prompt", "2*15=", "--target", "30.", "--eos", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["total_logprob"] < 0 and data["tokens"][-1]["token"] == "<|eos|>"
    assert abs(sum(t["logprob"] for t in data["tokens"]) - data["total_logprob"]) < 1e-6


def _one_line_error(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "error:" in r.stderr
