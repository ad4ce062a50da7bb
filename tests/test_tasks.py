"""Tasks: GSM8K loading (real files), gsm_symbolic streams, table files, prompts and targets."""

import json

import pytest

from conftest import GSM8K_DIR
from posttrain.errors import PosttrainError
from posttrain.tasks import PROMPTS, get_prompt, make_task


def test_gsm8k_local_sizes_and_columns():
    task = make_task("gsm8k", data_dir=str(GSM8K_DIR))
    train, test = task.examples("train"), task.examples("test")
    assert (len(train), len(test)) == (7473, 1319)
    ex = train[0]
    assert ex.numeric_answer == "72" and ex.response.endswith("#### 72") and "<<" not in ex.response
    assert ex.reasoning.endswith("April and May.")


def test_gsm8k_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(PosttrainError, match="train.jsonl"):
        make_task("gsm8k", data_dir=str(tmp_path)).examples("train")


def test_gsm8k_malformed_line_names_file_and_line(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{broken\n')
    with pytest.raises(PosttrainError, match=r"test.jsonl:2"):
        make_task("gsm8k", data_dir=str(tmp_path)).examples("test")


def test_gsm_symbolic_deterministic_and_disjoint():
    a = make_task("gsm_symbolic", train_size=300, test_size=100)
    b = make_task("gsm_symbolic", train_size=300, test_size=100)
    train, test = a.examples("train"), a.examples("test")
    assert [e.question for e in train] == [e.question for e in b.examples("train")]
    assert len(train) == 300 and len(test) == 100
    assert not {e.question for e in train} & {e.question for e in test}
    for e in train[:50]:
        assert a.grade(e.response, e).strict_correct  # every worked solution grades as correct


def test_table_file_task(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"What is {i}+1?", "a": str(i + 1)}) for i in range(5)))
    task = make_task(str(path), question_field="q", answer_field="a")
    rows = task.examples("test")
    assert len(rows) == 5 and rows[2].numeric_answer == "3"
    with pytest.raises(PosttrainError, match="no column 'question'"):
        make_task(str(path)).examples("test")
    csv = tmp_path / "mine.csv"
    csv.write_text("question,answer\nWhat is 2+2?,4\n")
    assert make_task(str(csv)).examples("train")[0].numeric_answer == "4"


def test_prompt_styles(tiny_tokenizer):
    ex = make_task("gsm_symbolic", train_size=20, test_size=5).examples("test")[0]
    plain = make_task("gsm_symbolic", train_size=20, test_size=5, prompt_style="plain")
    text = plain.prompt_text(ex)
    assert text.startswith("Your role") and "#### <NUMERIC_ANSWER>" in text and text.endswith(ex.question + "\n")
    few = make_task("gsm_symbolic", train_size=20, test_size=5, prompt_style="fewshot", fewshot=3)
    text = few.prompt_text(ex)
    assert text.count("Question:") == 4 and text.endswith(f"Question: {ex.question}\nAnswer:")
    chat = make_task("gsm_symbolic", train_size=20, test_size=5, prompt_style="chat")
    text = chat.prompt_text(ex, tiny_tokenizer)
    assert "<|im_start|>system" in text and text.endswith("<|im_start|>assistant\n")
    target = chat.target(ex)
    assert target.startswith("<thinking>\n") and target.endswith(f"<answer>\n{ex.numeric_answer}\n</answer>")
    assert chat.grade(target, ex).strict_correct
    ids = chat.encode_prompt(ex, tiny_tokenizer)
    assert ids.count(tiny_tokenizer.bos_token_id) == 1  # chat template's BOS, not a second one


def test_prompts_are_versioned_data():
    assert all(name.rsplit("_v", 1)[1].isdigit() for name in PROMPTS)
    assert get_prompt("plain").name == "gsm8k_plain_v1"
    with pytest.raises(PosttrainError, match="unknown prompt"):
        get_prompt("nope")


def test_unknown_task():
    with pytest.raises(PosttrainError, match="unknown task"):
        make_task("mmlu")
