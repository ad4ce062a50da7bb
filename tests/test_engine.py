"""HF-generate engine: batch-size invariance under left padding, stop strings, EOS handling."""


from posttrain.engine import SamplingParams
from posttrain.engine.base import finish
from posttrain.engine.hf import HFEngine, left_pad
from posttrain.tasks import make_task


def _prompts(tok, n=16):
    task = make_task("gsm_symbolic", train_size=50, test_size=40)
    # Questions of different lengths, so batches need real left padding.
    return [task.encode_prompt(e, tok)[: 20 + 7 * i] for i, e in enumerate(task.examples("test")[:n])]


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_is_batch_size_invariant(tiny_model, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer)
    assert len({len(p) for p in prompts}) > 1
    params = SamplingParams(max_new_tokens=24)
    one = HFEngine(tiny_model, tiny_tokenizer, batch_size=1).generate(prompts, params)
    many = HFEngine(tiny_model, tiny_tokenizer, batch_size=16).generate(prompts, params)
    assert [c.token_ids for c in one] == [c.token_ids for c in many]
    assert len({tuple(c.token_ids) for c in one}) > 1  # outputs differ across prompts: a real check
    assert all(c.prompt_index == i for i, c in enumerate(one))


def test_sampling_returns_n_per_prompt_and_logprobs(tiny_model, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer, 3)
    out = HFEngine(tiny_model, tiny_tokenizer, 8).generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, n=4, seed=1, logprobs=True))
    assert [c.prompt_index for c in out] == [0] * 4 + [1] * 4 + [2] * 4
    for c in out:
        assert len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)


class _CharTok:
    """A stand-in tokenizer: token i is chr(i)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def test_finish_cuts_at_eos_and_stop_strings():
    tok = _CharTok()
    ids = [ord(c) for c in "ab#### 5\nQuestion: x"]
    c = finish(tok, 0, ids, eos_ids={0}, stop=["Question:"], logprobs=[-1.0] * len(ids))
    assert c.text == "ab#### 5\n" and c.finish_reason == "stop"
    assert tok.decode(c.token_ids).startswith("ab#### 5\nQ") and len(c.logprobs) == len(c.token_ids)
    c = finish(tok, 0, [ord("a"), 0, ord("b")], eos_ids={0}, stop=[], logprobs=None)
    assert c.token_ids == [ord("a"), 0] and c.finish_reason == "eos" and c.text == "a"
    c = finish(tok, 0, [ord("a"), ord("b")], eos_ids={0}, stop=[], logprobs=None)
    assert c.finish_reason == "length"


def test_stop_strings_in_generation(tiny_model, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer, 4)
    free = HFEngine(tiny_model, tiny_tokenizer, 4).generate(prompts, SamplingParams(max_new_tokens=16))
    # Use a piece of the first free-running output as a stop string: that row must stop before it.
    text = free[0].text
    assert len(text) >= 7 and text[4:7].strip(), f"the tiny model's greedy output is too short for this test: {text!r}"
    stop = text[4:7]
    out = HFEngine(tiny_model, tiny_tokenizer, 4).generate(prompts, SamplingParams(max_new_tokens=16, stop=[stop]))
    assert stop not in out[0].text and out[0].finish_reason == "stop"
    assert text.startswith(out[0].text) and len(out[0].token_ids) < len(free[0].token_ids)


def test_time_to_first_token_is_noted_once_from_process_start(tiny_model, tiny_tokenizer):
    from posttrain.engine.fast import FastEngine
    from posttrain.utils import process_age_s

    prompts = _prompts(tiny_tokenizer, 4)
    for engine in (HFEngine(tiny_model, tiny_tokenizer, 2), FastEngine(tiny_model, tiny_tokenizer, 2)):
        assert engine.first_token_s is None
        before = process_age_s()
        engine.generate(prompts, SamplingParams(max_new_tokens=6))
        first = engine.first_token_s
        assert before <= first <= process_age_s()  # the process age when the first token came
        engine.generate(prompts, SamplingParams(max_new_tokens=6))
        assert engine.first_token_s == first  # the first token of the engine's life, not of each call
