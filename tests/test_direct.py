"""Direct loading (engine/direct.py): a Llama / Qwen2 folder read without transformers gives the same token
ids, chat text, weights and greedy completions as transformers; anything it does not read exactly as
transformers does goes through transformers; ``posttrain eval`` on such a folder never imports transformers."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import GSM8K_DIR, ROOT
from posttrain.engine import SamplingParams, load_model, load_tokenizer
from posttrain.engine.direct import plan
from posttrain.engine.fast import FastEngine
from posttrain.errors import PosttrainError
from posttrain.tasks import make_task

NANO = ROOT / "models" / "nano-gsm"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_nano_tokenizer_matches_transformers():
    direct, hf = plan(str(NANO)).tokenizer(), load_tokenizer(str(NANO))
    for style in ("chat", "plain", "fewshot"):
        task = make_task("gsm8k", prompt_style=style, data_dir=str(GSM8K_DIR))
        examples = task.examples("test", 150)
        texts = [task.prompt_text(e, direct) for e in examples]
        assert texts == [task.prompt_text(e, hf) for e in examples], style
        assert task.encode_prompts(examples, direct, texts) == task.encode_prompts(examples, hf, texts), style
        assert task.encode_targets(examples[:50], direct) == task.encode_targets(examples[:50], hf), style
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert direct.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    text = "Tom has <|im_start|>3 apples<|eos|> #### 42"
    for add in (True, False):
        for split in (True, False):
            got = direct(text, add_special_tokens=add, split_special_tokens=split)["input_ids"]
            assert got == list(hf(text, add_special_tokens=add, split_special_tokens=split)["input_ids"])
    assert (direct.eos_token_id, direct.pad_token_id, direct.bos_token_id) == (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id)
    assert sorted(direct.all_special_tokens) == sorted(hf.all_special_tokens) and len(direct) == len(hf)


def test_nano_weights_and_greedy_match_transformers():
    folder = plan(str(NANO))
    direct = folder.model(torch.float32, torch.device("cpu"))
    hf = load_model(str(NANO), "fp32", "cpu")
    want = hf.state_dict()
    got = direct.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert direct.lm_head.weight is direct.model.embed_tokens.weight  # tied, as in the folder's config
    tok = folder.tokenizer()
    task = make_task("gsm8k", data_dir=str(GSM8K_DIR))
    prompts = task.encode_prompts(task.examples("test", 12), tok)
    params = SamplingParams(max_new_tokens=48, logprobs=True)
    a = FastEngine(direct, tok, 12).generate(prompts, params)
    b = FastEngine(hf, load_tokenizer(str(NANO)), 12).generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.text for c in a] == [c.text for c in b]
    assert [c.finish_reason for c in a] == [c.finish_reason for c in b]


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen2_folder(path, add_prefix_space=None):
    """A Qwen2 folder as Qwen2.5's are: a byte-level BPE tokenizer.json with no normalizer (transformers gives a
    qwen2 folder its own Qwen2Tokenizer pipeline), q/k/v biases, an untied lm_head, bf16 weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conftest import _corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(_corpus(200), trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    tcfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
            "clean_up_tokenization_spaces": False, "chat_template": QWEN_TEMPLATE}
    if add_prefix_space is not None:
        tcfg["add_prefix_space"] = add_prefix_space
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, initializer_range=0.3,
                      eos_token_id=tok.token_to_id("<|im_end|>"), rope_theta=1e6)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)  # zero biases would not show a bias left out
    model.save_pretrained(path)
    return path


TRICKY = ["cafe\u0301 and caf\u00e9", "\r\n\r\n  x", "  two leading spaces", "x <|im_end|> y", "\u212b \ufb01 \uff21 \u2460",
          "tab\there", "a\u0308o\u0301", "<|endoftext|>hi", "It's 12,345.67 dollars!", "\u4f60\u597d \U0001f600"]


@pytest.mark.parametrize("add_prefix_space", [None, True])
def test_qwen2_tokenizer_as_transformers_builds_it(tmp_path, add_prefix_space):
    folder = plan(str(_qwen2_folder(tmp_path / "q", add_prefix_space)))
    direct, hf = folder.tokenizer(), load_tokenizer(str(folder.path))
    for text in TRICKY:
        for add in (True, False):
            assert direct(text, add_special_tokens=add)["input_ids"] == list(hf(text, add_special_tokens=add)["input_ids"]), text
    task = make_task("gsm8k", prompt_style="chat", data_dir=str(GSM8K_DIR))
    examples = task.examples("test", 100)
    texts = [task.prompt_text(e, direct) for e in examples]
    assert texts == [task.prompt_text(e, hf) for e in examples]
    assert task.encode_prompts(examples, direct, texts) == task.encode_prompts(examples, hf, texts)
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert direct.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert (direct.eos_token_id, direct.pad_token_id, len(direct)) == (hf.eos_token_id, hf.pad_token_id, len(hf))
    assert sorted(direct.all_special_tokens) == sorted(hf.all_special_tokens)


def test_qwen2_shape_with_biases_and_own_head(tmp_path):
    """Qwen2: q/k/v biases, an untied lm_head, a bf16 file read into fp32; the same greedy completions."""
    folder = plan(str(_qwen2_folder(tmp_path / "q")))
    assert folder is not None and folder.biases == (True, False, False)
    direct = folder.model(torch.float32, torch.device("cpu"))
    hf = load_model(str(folder.path), "fp32", "cpu")
    assert all(torch.equal(direct.state_dict()[k], v) for k, v in hf.state_dict().items())
    assert direct.lm_head.weight is not direct.model.embed_tokens.weight
    tok, hf_tok = folder.tokenizer(), load_tokenizer(str(folder.path))
    task = make_task("gsm8k", prompt_style="chat", data_dir=str(GSM8K_DIR))
    examples = task.examples("test", 6)
    prompts = task.encode_prompts(examples, tok)
    assert prompts == task.encode_prompts(examples, hf_tok)
    params = SamplingParams(max_new_tokens=24)
    a = FastEngine(direct, tok, 6).generate(prompts, params)
    b = FastEngine(hf, hf_tok, 6).generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b] and [c.text for c in a] == [c.text for c in b]
    assert len({tuple(c.token_ids) for c in a}) > 1  # varied outputs, not one constant token
    _edit_json(folder.path / "config.json", use_sliding_window=True, sliding_window=16)
    assert plan(str(folder.path)) is None  # the fast engine's attention has no window


def test_a_tokenizer_transformers_would_change_is_left_to_it(tmp_path, tiny_model_dir):
    """Under a qwen2 config transformers rebuilds the nano tokenizer as a Qwen2Tokenizer (adding <|endoftext|>):
    the direct model stays, the tokenizer comes from transformers, and the evaluation says so."""
    from posttrain.evaluation import EvalConfig, run_eval

    d = _copy(tiny_model_dir, tmp_path / "m")
    _edit_json(d / "tokenizer_config.json", tokenizer_class="Qwen2Tokenizer")
    assert plan(str(d)).tokenizer() is None
    res = run_eval(EvalConfig(model=str(d), task="gsm8k", data_dir=str(GSM8K_DIR), limit=2, max_new_tokens=4, device="cpu",
                              show_samples=0), progress=False)
    assert res.summary["loader"] == "direct model, transformers tokenizer"


def test_named_special_tokens_are_special(tmp_path):
    """transformers makes every named special token special, whatever tokenizer.json says: so does the direct
    tokenizer (the decoded text, which is graded, leaves it out)."""
    d = _copy(NANO, tmp_path / "m")
    data = json.loads((d / "tokenizer.json").read_text())
    for t in data["added_tokens"]:
        t["special"] = t["content"] != "<|eos|>"  # EOS an ordinary added token in tokenizer.json
    (d / "tokenizer.json").write_text(json.dumps(data))
    direct, hf = plan(str(d)).tokenizer(), load_tokenizer(str(d))
    ids = direct("3 apples<|eos|>")["input_ids"]
    assert ids == list(hf("3 apples<|eos|>")["input_ids"]) and ids[-1] == hf.eos_token_id
    assert direct.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True) == "3 apples"


def test_eos_ids_as_transformers_reads_them(tmp_path, tiny_model_dir):
    from posttrain.engine.base import eos_token_ids

    for name, gen in (("none named", {"pad_token_id": 0}), ("a list", {"eos_token_id": [2, 3]}), ("absent", None)):
        d = _copy(tiny_model_dir, tmp_path / name.replace(" ", "_"))
        _edit_json(d / "config.json", eos_token_id=4)
        if gen is None:
            (d / "generation_config.json").unlink()
        else:
            (d / "generation_config.json").write_text(json.dumps(gen))
        folder = plan(str(d))
        direct, tok = folder.model(torch.float32, torch.device("cpu")), folder.tokenizer()
        assert eos_token_ids(direct, tok) == eos_token_ids(load_model(str(d), "fp32", "cpu"), load_tokenizer(str(d))), name


def _config(**changes):
    return lambda d: _edit_json(d / "config.json", **changes)


def _tokenizer_config(**changes):
    return lambda d: _edit_json(d / "tokenizer_config.json", **changes)


def _extra_tensor(d):
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(state["model.layers.0.self_attn.q_proj.weight"].shape[0])
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def _missing_tensor(d):
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def _int8_tensor(d):
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int8)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def _generation_template(d):
    (d / "chat_template.jinja").write_text("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}")


FALLBACKS = {
    "rope scaling": _config(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3 rope": _config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
    "quantized": _config(quantization_config={"quant_method": "bitsandbytes"}),
    "remote code": _config(auto_map={"AutoModelForCausalLM": "modeling.MyModel"}),
    "a sliding-window layer": _config(layer_types=["full_attention", "sliding_attention"]),
    "other activation": _config(hidden_act="gelu"),
    "other architecture": _config(architectures=["LlamaForSequenceClassification"]),
    "other model type": _config(model_type="gemma"),
    "shapes not the config's": _config(intermediate_size=96),
    "no max_position_embeddings": lambda d: (d / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "max_position_embeddings"})),
    "damaged config": lambda d: (d / "config.json").write_text("{not json"),
    "tokenizer class with its own pipeline": _tokenizer_config(tokenizer_class="LlamaTokenizer"),
    "clean-up of spaces": _tokenizer_config(clean_up_tokenization_spaces=True),
    "no tokenizer.json": lambda d: (d / "tokenizer.json").unlink(),
    "generation blocks": _generation_template,
    "chat template not UTF-8": lambda d: (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}"),
    "rope parameters not an object": _config(rope_parameters="default"),
    "legacy special_tokens_map.json": lambda d: (d / "special_tokens_map.json").write_text('{"eos_token": "<|im_end|>"}'),
    "split_special_tokens by default": _tokenizer_config(split_special_tokens=True),
    "add_bos_token set": _tokenizer_config(add_bos_token=False),
    "named chat templates": _tokenizer_config(chat_template=[{"name": "default", "template": "{{ messages }}"}]),
    "layer_types not a list": _config(layer_types=5),
    "tokenizer_class not a name": _tokenizer_config(tokenizer_class=["TokenizersBackend"]),
    "weight index of the wrong shape": lambda d: (d / "model.safetensors").rename(d / "model-1.safetensors")
    or (d / "model.safetensors.index.json").write_text('{"weight_map": ["model-1.safetensors"]}'),
    "eos id not an id": lambda d: (d / "generation_config.json").write_text('{"eos_token_id": "x"}'),
    "adapter folder": lambda d: (d / "adapter_config.json").write_text("{}"),
    "a tensor too many": _extra_tensor,
    "a tensor missing": _missing_tensor,
    "integer tensor": _int8_tensor,
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_folders_it_does_not_read_exactly_go_through_transformers(tmp_path, tiny_model_dir, case):
    d = _copy(tiny_model_dir, tmp_path / "m")
    assert plan(str(d)) is not None  # the copy as saved reads directly
    FALLBACKS[case](d)
    assert plan(str(d)) is None


def test_options_that_need_transformers(tiny_model_dir, tmp_path):
    assert plan(str(tiny_model_dir), engine="hf") is None
    assert plan(str(tiny_model_dir), trust_remote_code=True) is None
    assert plan(str(tmp_path / "absent")) is None
    assert plan(str(tiny_model_dir / "model.safetensors")) is None  # a file, not a folder


def test_damaged_weights_are_one_line_error(tmp_path, tiny_model_dir):
    d = _copy(tiny_model_dir, tmp_path / "m")
    folder = plan(str(d))
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])  # cut short after planning
    with pytest.raises(PosttrainError, match="damaged or incomplete") as e:
        folder.model(torch.float32, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_eval_reads_directly_without_importing_transformers(tmp_path, tiny_model_dir):
    out = tmp_path / "eval"
    code = ("import sys; from posttrain.cli.main import main; rc = main(sys.argv[1:]); "
            "late = [m for m in ('transformers', 'torch._dynamo', 'sympy') if m in sys.modules]; "
            "assert not late, f'imported {late}'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "eval", "--model", str(tiny_model_dir), "--task", "gsm8k",
                        "--data-dir", str(GSM8K_DIR), "--limit", "6", "--max-new-tokens", "16", "--device", "cpu",
                        "--output", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loader"] == "direct" and summary["n"] == 6


def test_eval_direct_and_transformers_give_the_same_records(tiny_model_dir):
    from posttrain.evaluation import EvalConfig, run_eval

    cfg = dict(model=str(tiny_model_dir), task="gsm8k", data_dir=str(GSM8K_DIR), limit=10, max_new_tokens=24,
               device="cpu", show_samples=0)
    direct = run_eval(EvalConfig(**cfg), progress=False)
    model = load_model(str(tiny_model_dir), "auto", "cpu")
    given = run_eval(EvalConfig(**cfg), model=model, tokenizer=load_tokenizer(str(tiny_model_dir)), progress=False)
    assert (direct.summary["loader"], given.summary["loader"]) == ("direct", "given")
    for key in ("prompt", "generation", "finish_reason"):
        assert [r[key] for r in direct.records] == [r[key] for r in given.records], key
    assert direct.summary["accuracy"] == given.summary["accuracy"]


def test_engine_hf_loads_through_transformers(tiny_model_dir):
    from posttrain.evaluation import EvalConfig, run_eval

    res = run_eval(EvalConfig(model=str(tiny_model_dir), task="gsm8k", data_dir=str(GSM8K_DIR), limit=2,
                              max_new_tokens=4, device="cpu", engine="hf", show_samples=0), progress=False)
    assert res.summary["loader"] == "transformers"

