"""Fast engine: token-identical greedy output to HF generate, EOS/stop handling, compaction,
sampling correct in distribution, LoRA-aware decoding, fallback for unsupported models."""

import math

import pytest
import torch

from conftest import make_tiny_model
from posttrain.engine import SamplingParams, make_engine
from posttrain.engine.fast import FastEngine, supports
from posttrain.engine.hf import HFEngine
from posttrain.tasks import make_task


def _prompts(tok, n=16):
    task = make_task("gsm_symbolic", train_size=50, test_size=40)
    return [task.encode_prompt(e, tok)[: 20 + 7 * i] for i, e in enumerate(task.examples("test")[:n])]


@pytest.mark.parametrize("batch_size", [16, 5])
def test_greedy_identical_to_hf(tiny_model, tiny_tokenizer, batch_size):
    prompts = _prompts(tiny_tokenizer)
    params = SamplingParams(max_new_tokens=40, logprobs=True)
    hf = HFEngine(tiny_model, tiny_tokenizer, 16).generate(prompts, params)
    # batch 5 also prefills in several small chunks (prompts of 20..125 tokens, 200-token budget)
    fast = FastEngine(tiny_model, tiny_tokenizer, batch_size, prefill_tokens=200 if batch_size == 5 else 16384).generate(prompts, params)
    assert [c.token_ids for c in fast] == [c.token_ids for c in hf]
    assert [c.text for c in fast] == [c.text for c in hf]
    for a, b in zip(hf, fast):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_eos_finishes_rows_and_compaction_keeps_results(tiny_model, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer)
    free = HFEngine(tiny_model, tiny_tokenizer, 16).generate(prompts, SamplingParams(max_new_tokens=30))
    # Declare a token the model often emits to be EOS, so rows finish at different steps.
    counts = torch.bincount(torch.tensor([t for c in free for t in c.token_ids]))
    tiny_model.generation_config.eos_token_id = int(counts.argmax())
    params = SamplingParams(max_new_tokens=30)
    hf = HFEngine(tiny_model, tiny_tokenizer, 16).generate(prompts, params)
    fast = FastEngine(tiny_model, tiny_tokenizer, 16, sync_every=2).generate(prompts, params)
    reasons = [c.finish_reason for c in fast]
    assert "eos" in reasons and "length" in reasons
    assert [c.token_ids for c in fast] == [c.token_ids for c in hf]


def test_stop_strings(tiny_model, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer, 4)
    free = FastEngine(tiny_model, tiny_tokenizer, 4).generate(prompts, SamplingParams(max_new_tokens=16))
    stop = free[0].text[3:6]
    if not stop.strip():
        pytest.skip("no usable stop string in this model's output")
    out = FastEngine(tiny_model, tiny_tokenizer, 4, sync_every=1).generate(prompts, SamplingParams(max_new_tokens=16, stop=[stop]))
    assert stop not in out[0].text and out[0].finish_reason == "stop" and free[0].text.startswith(out[0].text)


def test_prefill_chunks_bound_padded_tokens():
    from posttrain.utils import padded_chunks as prefill_chunks

    lengths = [5, 50, 3, 100, 7, 7, 7]
    chunks = prefill_chunks(lengths, 120)
    assert chunks == [(0, 2), (2, 3), (3, 4), (4, 7)]
    for a, b in chunks:  # padded size within budget (a lone prompt may exceed it)
        assert (b - a) * max(lengths[a:b]) <= 120 or b - a == 1
    assert prefill_chunks([500], 100) == [(0, 1)] and prefill_chunks([], 10) == []


class _StubTok:
    pad_token_id = 0
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampling_matches_distribution(temperature, top_p):
    """Chi-square test of the first sampled token against the exact tempered, nucleus-filtered softmax."""
    model = make_tiny_model(8, seed=1, hidden_size=32, intermediate_size=64, initializer_range=0.5)
    model.generation_config.eos_token_id = None
    prompt = [1, 3, 5, 7]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double() / temperature
    p = torch.softmax(logits, -1)
    order = torch.argsort(p, descending=True)
    cum = torch.cumsum(p[order], 0)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[(cum - p[order]) < top_p]] = True
    expected = torch.where(keep, p, torch.zeros_like(p))
    expected = expected / expected.sum()
    n = 6000
    out = FastEngine(model, _StubTok(), batch_size=n).generate(
        [prompt], SamplingParams(max_new_tokens=1, temperature=temperature, top_p=top_p, n=n, seed=123))
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out]), minlength=8).double()
    assert torch.all(counts[~keep] == 0)  # nothing outside the nucleus
    exp_counts = expected[keep] * n
    chi2 = (((counts[keep] - exp_counts) ** 2) / exp_counts).sum().item()
    dof = int(keep.sum()) - 1
    # 99.9th percentile of chi-square (Wilson-Hilferty approximation)
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3 if dof > 0 else 10.8
    assert chi2 < limit, (chi2, limit, counts, exp_counts)
    # returned log-probs are log softmax(logits / T) of the chosen token
    c = out[0]
    assert c.logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[c.token_ids[0]].item(), abs=1e-4)


def test_lora_adapter_is_live(tiny_model, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    prompts = _prompts(tiny_tokenizer, 4)
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-trivial adapter
    peft_model.eval()
    params = SamplingParams(max_new_tokens=20)
    engine = FastEngine(peft_model, tiny_tokenizer, 4)
    hf = HFEngine(peft_model, tiny_tokenizer, 4).generate(prompts, params)
    assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in hf]
    with torch.no_grad():  # training changes the adapter in place: after sync_weights the engine sees it
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(-1)
    hf2 = HFEngine(peft_model, tiny_tokenizer, 4).generate(prompts, params)
    assert [c.token_ids for c in hf2] != [c.token_ids for c in hf]
    stale = [c.token_ids for c in engine.generate(prompts, params)]
    assert stale == [c.token_ids for c in hf]  # no sync: the engine still samples from the weights it was given
    engine.sync_weights(peft_model)
    assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in hf2]
    with pytest.raises(ValueError, match="another model"):
        engine.sync_weights(tiny_model)


def _arch_model(arch, vocab):
    import transformers

    cls = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls + "Config")(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=True, initializer_range=0.3, sliding_window=None)
    model = getattr(transformers, cls + "ForCausalLM")(cfg).eval()
    with torch.no_grad():  # Qwen2's q/k/v biases start at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("merge", [True, False])
def test_other_architectures_greedy_identical_to_hf(arch, merge, tiny_tokenizer):
    model = _arch_model(arch, len(tiny_tokenizer))
    assert supports(model)[0]
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # the fused q|k|v bias is exercised
    prompts = _prompts(tiny_tokenizer, 6)
    params = SamplingParams(max_new_tokens=24)
    hf = HFEngine(model, tiny_tokenizer, 6).generate(prompts, params)
    fast = FastEngine(model, tiny_tokenizer, 6, merge_weights=merge).generate(prompts, params)
    assert [c.token_ids for c in fast] == [c.token_ids for c in hf]


def test_full_finetuning_updates_are_seen(tiny_model, tiny_tokenizer):
    """Optimizer steps change weights in place between rollouts; the stacked q|k|v and gate|up copies
    follow at ``sync_weights``."""
    prompts = _prompts(tiny_tokenizer, 4)
    params = SamplingParams(max_new_tokens=20)
    engine = FastEngine(tiny_model, tiny_tokenizer, 4)
    before = [c.token_ids for c in engine.generate(prompts, params)]
    with torch.no_grad():
        for layer in tiny_model.model.layers:
            layer.self_attn.k_proj.weight.mul_(-1.5)
            layer.mlp.up_proj.weight.mul_(2.0)
    expected = [c.token_ids for c in HFEngine(tiny_model, tiny_tokenizer, 4).generate(prompts, params)]
    assert expected != before  # the change matters ...
    engine.sync_weights(tiny_model)
    assert [c.token_ids for c in engine.generate(prompts, params)] == expected  # ... and is seen after the sync


def test_merged_projection_equals_the_modules(tiny_model):
    """q|k|v stacked with a LoRA adapter merged: one GEMM gives what the three PEFT modules give."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from posttrain.engine.projections import MergedProjection

    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj"]))
    attn = peft_model.get_base_model().model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.lora_B["default"].weight.normal_(0, 1.0)
    peft_model.eval()
    base_before = attn.k_proj.base_layer.weight.clone()
    proj = MergedProjection([attn.q_proj, attn.k_proj, attn.v_proj])
    assert torch.equal(attn.k_proj.base_layer.weight, base_before)  # merging never writes into the model
    o_proj = MergedProjection([attn.o_proj])
    assert o_proj.own and o_proj.weight is attn.o_proj.weight  # a plain Linear is not copied
    x = torch.randn(3, 64)
    want = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
    # hand-computed: k = x (W + 3·B·A)^T  (alpha 6 / r 2 = 3)
    lora = attn.k_proj
    k_hand = x @ (lora.base_layer.weight + 3.0 * lora.lora_B["default"].weight @ lora.lora_A["default"].weight).T
    assert (want[:, 64:96] - k_hand).abs().max() < 1e-4
    assert (F.linear(x, proj.weight, proj.bias) - want).abs().max() < 1e-4
    with torch.no_grad():  # a training step on the adapter; refresh rewrites the same buffer
        lora.lora_B["default"].weight.mul_(-1)
    ptr = proj.weight.data_ptr()
    assert proj.refresh() is False and proj.weight.data_ptr() == ptr
    want = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
    assert (F.linear(x, proj.weight, proj.bias) - want).abs().max() < 1e-4


def test_unsupported_model_falls_back_with_notice(tiny_tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2))
    assert not supports(gpt2)[0]
    engine = make_engine("fast", gpt2, tiny_tokenizer)
    assert engine.name == "hf" and "fast engine does not support" in capsys.readouterr().out
    assert make_engine("auto", make_tiny_model(len(tiny_tokenizer)), tiny_tokenizer).name == "fast"


class _Packed4bitLinear(torch.nn.Linear):
    """A stand-in for bitsandbytes' Linear4bit (an nn.Linear whose weight is packed 4-bit data with a
    ``quant_state``): the packed tensor here is junk bytes, the dense weight lives in the quant state,
    and forward computes with it, as Linear4bit dequantizes on the fly."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        packed = torch.nn.Parameter(torch.randint(0, 255, (linear.weight.numel() // 2, 1), dtype=torch.uint8), requires_grad=False)
        packed.quant_state = linear.weight.detach().clone()
        self.weight = packed
        if linear.bias is not None:
            self.bias = linear.bias

    def forward(self, x):  # as Linear4bit: in the compute dtype, the output in the input's dtype
        if self.weight.numel() * 2 != self.in_features * self.out_features:
            raise RuntimeError("the packed 4-bit weights are not here")  # Linear4bit would read them
        w = self.weight.quant_state
        return torch.nn.functional.linear(x.to(w.dtype), w, self.bias).to(x.dtype)


def _quantized_stand_in(model):
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, _Packed4bitLinear(getattr(parent, name)))
    model.is_loaded_in_4bit = True
    return model


@pytest.mark.parametrize("lora", [False, True])
def test_4bit_base_is_served_from_dequantized_weights(tiny_tokenizer, monkeypatch, lora):
    """QLoRA policies: the engine dequantizes each 4-bit projection (never reads packed bytes as
    weights), merges the adapter in, and samples what HF generate samples on the same model."""
    import posttrain.engine.projections as projections

    monkeypatch.setattr(projections, "dequantize", lambda weight: weight.quant_state)
    model = _quantized_stand_in(make_tiny_model(len(tiny_tokenizer)))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        model.eval()
    assert supports(model)[0]
    prompts = _prompts(tiny_tokenizer, 4)
    params = SamplingParams(max_new_tokens=20)
    hf = HFEngine(model, tiny_tokenizer, 4).generate(prompts, params)
    engine = make_engine("auto", model, tiny_tokenizer, 4)
    assert engine.name == "fast"
    assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in hf]


@pytest.mark.parametrize("quantized_rollouts", ["dequantized", "4bit"])
def test_prepared_qlora_policy_computes_in_the_projections_dtype(tiny_tokenizer, monkeypatch, quantized_rollouts):
    """After peft's prepare_model_for_kbit_training a QLoRA policy keeps embeddings, norms and lm_head
    in fp32 around bf16 4-bit projections (the 8B run of seed 003 met this): the engine casts at those
    modules and samples what it samples from the all-bf16 model those fp32 tensors were cast from,
    on either path for the 4-bit base."""
    import posttrain.engine.projections as projections

    monkeypatch.setattr(projections, "dequantize", lambda weight: weight.quant_state)
    bf16 = _quantized_stand_in(make_tiny_model(len(tiny_tokenizer)).to(torch.bfloat16))
    prepared = _quantized_stand_in(make_tiny_model(len(tiny_tokenizer)).to(torch.bfloat16))  # the same weights
    for name, p in prepared.named_parameters():
        if p.dtype == torch.bfloat16 and "proj" not in name:  # what prepare_model_for_kbit_training upcasts
            p.data = p.data.float()
    assert prepared.model.embed_tokens.weight.dtype == prepared.lm_head.weight.dtype == torch.float32
    prompts = _prompts(tiny_tokenizer, 4)
    params = SamplingParams(max_new_tokens=20)
    engine = make_engine("auto", prepared, tiny_tokenizer, 4, quantized_rollouts=quantized_rollouts)
    assert engine.name == "fast" and engine.dtype == torch.bfloat16
    got = [c.token_ids for c in engine.generate(prompts, params)]
    want = [c.token_ids for c in make_engine("auto", bf16, tiny_tokenizer, 4, quantized_rollouts=quantized_rollouts).generate(prompts, params)]
    assert got == want and len({tuple(t) for t in got}) > 1
    assert engine.adapter.quantized_path == quantized_rollouts


def _with_lora(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def _flip_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-1)


def _counted_stand_in(tok, monkeypatch):
    """A LoRA policy on the 4-bit stand-in, the list its dequantizations are counted in, 4 prompts,
    20 greedy tokens, and HF generate's tokens for them."""
    from posttrain.engine import projections

    dequantized = []

    def dequantize(weight):  # as bitsandbytes', it reads the packed bytes
        if weight.numel() == 0:
            raise RuntimeError("dequantized from packed weights that are not here")
        dequantized.append(weight)
        return weight.quant_state

    monkeypatch.setattr(projections, "dequantize", dequantize)
    model = _with_lora(_quantized_stand_in(make_tiny_model(len(tok))))
    prompts, params = _prompts(tok, 4), SamplingParams(max_new_tokens=20)
    return dequantized, model, prompts, params, [c.token_ids for c in HFEngine(model, tok, 4).generate(prompts, params)]


def test_4bit_path_computes_from_the_packed_base_with_the_adapters_apart(tiny_tokenizer, monkeypatch, capsys):
    """quantized_rollouts=4bit: each 4-bit layer computes itself (bitsandbytes' Linear4bit forward;
    here the stand-in's) and each adapter is its own low-rank product: the tokens of the dequantized
    path and of HF generate, with no dense copy made; a sync rewrites nothing, yet the engine follows
    the trained adapter."""
    from posttrain.engine import projections

    dequantized, model, prompts, params, hf = _counted_stand_in(tiny_tokenizer, monkeypatch)
    dense = FastEngine(model, tiny_tokenizer, 4, quantized_rollouts="dequantized")
    assert [c.token_ids for c in dense.generate(prompts, params)] == hf
    assert len(dequantized) == 7 * model.config.num_hidden_layers  # the copy: every 4-bit projection dequantized
    assert "copy of the 4-bit base" in capsys.readouterr().out
    dequantized.clear()

    engine = FastEngine(model, tiny_tokenizer, 4, quantized_rollouts="4bit")
    assert [c.token_ids for c in engine.generate(prompts, params)] == hf
    assert "straight from the 4-bit weights" in capsys.readouterr().out
    assert not dequantized  # nothing dequantized, no dense copy
    assert engine.adapter.fused  # the fused decode step runs on these projections too
    projs = [p for w in engine.adapter.weights for p in w.all()]
    assert all(isinstance(p, projections.LowRankProjection) for p in projs)
    assert sum(len(part.adapters) for p in projs for part in p.parts) == 3 * model.config.num_hidden_layers  # q, v, down

    base = {n: p for n, p in model.named_parameters() if p.dtype == torch.uint8}
    before = {n: (p.data.clone(), p.data_ptr(), p.quant_state, p.quant_state.clone()) for n, p in base.items()}
    _flip_adapters(model)  # a training step on the adapters, in place
    hf2 = [c.token_ids for c in HFEngine(model, tiny_tokenizer, 4).generate(prompts, params)]
    assert hf2 != hf
    engine.sync_weights(model)
    assert not dequantized and not engine.adapter.refresh()  # nothing rewritten, no tensor moved (graphs kept)
    for n, p in base.items():  # the 4-bit base untouched
        data, ptr, state, dense_w = before[n]
        assert torch.equal(p.data, data) and p.data_ptr() == ptr and p.quant_state is state and torch.equal(state, dense_w)
    assert [c.token_ids for c in engine.generate(prompts, params)] == hf2
    assert [c.token_ids for c in dense.generate(prompts, params)] == hf  # the copy is stale until its own sync ...
    dense.sync_weights(model)
    assert [c.token_ids for c in dense.generate(prompts, params)] == hf2  # ... which dequantizes and merges again
    assert len(dequantized) == 7 * model.config.num_hidden_layers


def test_transient_copy_is_built_for_each_rollout_and_freed_for_the_update(tiny_tokenizer, monkeypatch, capsys):
    """quantized_rollouts=transient: the tokens of the kept copy (and of HF generate); ``release``
    frees the copy, the KV cache and the graphs; the next rollout dequantizes and merges the trained
    adapter again, and the notice is said once."""
    dequantized, model, prompts, params, hf = _counted_stand_in(tiny_tokenizer, monkeypatch)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if hasattr(p, "quant_state")}
    engine = FastEngine(model, tiny_tokenizer, 4, quantized_rollouts="transient")
    assert [c.token_ids for c in engine.generate(prompts, params)] == hf
    per_copy = 7 * model.config.num_hidden_layers
    assert len(dequantized) == per_copy and "built for each rollout and freed before the update" in capsys.readouterr().out
    assert engine.adapter.weights is not None and engine.scheduler.kv is not None
    # While the copy serves rollouts, the packed weights wait in host memory (a forward would fail) ...
    assert len(packed) == per_copy and all(p.numel() == 0 for n, p in model.named_parameters() if n in packed)
    with pytest.raises(RuntimeError, match="not here"):
        HFEngine(model, tiny_tokenizer, 4).generate(prompts, params)
    engine.release()
    assert engine.adapter.weights is None and engine.scheduler.kv is None and not engine.scheduler._graphs
    for n, p in model.named_parameters():  # ... and are back, byte for byte, for the update
        if n in packed:
            assert torch.equal(p, packed[n]) and hasattr(p, "quant_state")

    _flip_adapters(model)  # a training step on the adapters, in place
    hf2 = [c.token_ids for c in HFEngine(model, tiny_tokenizer, 4).generate(prompts, params)]
    assert hf2 != hf
    engine.sync_weights(model)
    assert [c.token_ids for c in engine.generate(prompts, params)] == hf2
    assert len(dequantized) == 2 * per_copy and capsys.readouterr().out == ""  # built again, said once
    assert engine.adapter.quantized_path == "transient"

    _flip_adapters(model)  # back to the first adapters, and a sync before any release: the copy is rebuilt from the 4-bit weights
    engine.sync_weights(model)
    assert [c.token_ids for c in engine.generate(prompts, params)] == hf
    engine.release()

    kept = FastEngine(model, tiny_tokenizer, 4, quantized_rollouts="dequantized")
    kept.generate(prompts, params)
    weights = kept.adapter.weights
    kept.release()  # only a transient copy is freed
    assert kept.adapter.weights is weights and kept.scheduler.kv is not None


def test_low_rank_projection_adds_each_adapter_as_peft_does(tiny_tokenizer, monkeypatch):
    """q|k|v from 4-bit layers with an adapter on k: the output is the PEFT modules' own, bit for bit,
    and it follows an adapter changed in place with no refresh."""
    from peft import LoraConfig, get_peft_model

    from posttrain.engine.projections import LowRankProjection, MergedProjection

    model = get_peft_model(_quantized_stand_in(make_tiny_model(len(tiny_tokenizer))), LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj"]))
    attn = model.get_base_model().model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.lora_B["default"].weight.normal_(0, 1.0)
    model.eval()
    proj = LowRankProjection([attn.q_proj, attn.k_proj, attn.v_proj])
    assert [len(p.adapters) for p in proj.parts] == [0, 1, 0] and proj.parts[1].adapters[0][2] == 3.0  # alpha 6 / r 2
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(proj(x), torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1))
        attn.k_proj.lora_B["default"].weight.mul_(-1)
        assert torch.equal(proj(x), torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1))
        monkeypatch.setattr("posttrain.engine.projections.dequantize", lambda weight: weight.quant_state)
        merged = MergedProjection([attn.q_proj, attn.k_proj, attn.v_proj])
        assert (merged(x) - proj(x)).abs().max() < 1e-4  # the same map as the dequantized, merged copy
    assert proj.refresh() is False
    attn.k_proj.lora_A["default"].weight = torch.nn.Parameter(torch.randn_like(attn.k_proj.lora_A["default"].weight))
    assert proj.refresh() is True  # another tensor: captured graphs must go


def test_auto_choice_follows_free_gpu_memory(tiny_tokenizer, monkeypatch, capsys):
    """``auto``: the dequantized copy when it fits beside a quarter of the GPU kept free; else the
    transient copy when it fits beside the rollout's KV cache and a fiftieth of the GPU; else the
    4-bit path; one line says which and why. Without a GPU, the copy (nothing to save)."""
    from posttrain.engine import projections

    monkeypatch.setattr(projections, "dequantize", lambda weight: weight.quant_state)
    model = _quantized_stand_in(make_tiny_model(len(tiny_tokenizer)))
    groups = [[layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj] for layer in model.model.layers]
    one_layer_qkv = 64 * (64 + 32 + 32) * 4  # hidden 64, 4 heads of 16, 2 KV heads, fp32
    assert projections.dense_copy_bytes(groups, torch.float32) == 2 * one_layer_qkv
    copy = 2 * one_layer_qkv
    gib = 2**30
    kv, slack = 3 * gib // 8, int(0.02 * 4 * gib)  # a fiftieth of 4 GiB: 0.08 GiB, and a bit
    for free, want in ((copy + gib, "dequantized"), (copy + gib - 1, "transient"),  # a quarter of 4 GiB kept free
                       (copy + kv + slack + 1, "transient"), (copy + kv + slack, "4bit")):
        monkeypatch.setattr(projections, "free_memory", lambda device, free=free: (free, 4 * gib))
        assert projections.choose_quantized_path("auto", copy, torch.bfloat16, torch.device("cuda"), kv)[0] == want
    assert projections.choose_quantized_path("4bit", copy, torch.bfloat16, torch.device("cuda"))[0] == "4bit"
    assert projections.choose_quantized_path("dequantized", 10**15, torch.bfloat16, torch.device("cuda"))[0] == "dequantized"

    prompts, params = _prompts(tiny_tokenizer, 2), SamplingParams(max_new_tokens=4)
    for free, want, said in ((3 * gib, "dequantized", "which fits"), (gib // 2, "transient", "kept, it would not leave 25% free"),
                             (gib // 20, "4bit", "does not fit")):
        monkeypatch.setattr(projections, "free_memory", lambda device, free=free: (free, 4 * gib))
        engine = make_engine("auto", model, tiny_tokenizer, 2)
        engine.generate(prompts, params)
        out = capsys.readouterr().out
        assert engine.adapter.quantized_path == want and said in out and f"{free / gib:.1f} of 4.0 GiB free" in out
        assert len(out.strip().splitlines()) == 1
        engine.release()  # the transient path's 4-bit weights come back to the model
    monkeypatch.undo()
    monkeypatch.setattr(projections, "dequantize", lambda weight: weight.quant_state)
    engine = make_engine("auto", model, tiny_tokenizer, 2)
    engine.generate(prompts, params)
    assert engine.adapter.quantized_path == "dequantized" and "no GPU memory to save on cpu" in capsys.readouterr().out
    plain = make_engine("auto", make_tiny_model(len(tiny_tokenizer)), tiny_tokenizer, 2)
    plain.generate(prompts, params)
    assert plain.adapter.quantized_path is None and capsys.readouterr().out == ""  # no 4-bit base, no choice, no notice


def test_unknown_quantized_rollouts_is_a_one_line_error(tiny_model, tiny_tokenizer):
    from posttrain.errors import PosttrainError

    with pytest.raises(PosttrainError, match="quantized_rollouts must be one of auto, dequantized, transient, 4bit, got 'nf4'"):
        make_engine("fast", tiny_model, tiny_tokenizer, 2, quantized_rollouts="nf4")
    with pytest.raises(PosttrainError, match="quantized_rollouts"):
        FastEngine(tiny_model, tiny_tokenizer, 2, quantized_rollouts="int4")


def test_prefill_and_rl_forwards_keep_cudnn_attention_off(tiny_model, tiny_tokenizer, monkeypatch):
    """Variable-length attention runs without cuDNN's SDPA backend (its per-call host cost dominated
    small-model RL steps on an H100): the engine's prefill and RL's log-prob forward both."""
    import torch.nn.functional as F

    from posttrain.trainers import rl

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        if q.shape[-2] > 1:  # prefill and training; one-query decode steps use their own kernel on GPUs
            seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    eng = FastEngine(tiny_model, tiny_tokenizer, batch_size=4)
    eng.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=3, temperature=0.0))
    n_prefill = len(seen)
    ids = torch.randint(5, 100, (2, 9))
    rl.sequence_logprobs(tiny_model, ids, torch.ones_like(ids))
    assert n_prefill >= tiny_model.config.num_hidden_layers and len(seen) > n_prefill  # both paths called SDPA
    assert not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # and only there


def test_decode_step_runs_on_the_fused_kernels_and_stays_greedy_identical(tiny_model, tiny_tokenizer, monkeypatch):
    """A Llama-family model decodes through kernels.add_rms_norm / rope_cache_write / silu_mul (their
    references on CPU) with HF's greedy tokens; with the modules kept live it does not."""
    from posttrain.engine import kernels

    calls = []
    real = kernels.add_rms_norm
    monkeypatch.setattr(kernels, "add_rms_norm", lambda *a: calls.append(1) or real(*a))
    prompts, params = _prompts(tiny_tokenizer)[:3], SamplingParams(max_new_tokens=12, logprobs=True)
    hf = HFEngine(tiny_model, tiny_tokenizer, 8).generate(prompts, params)
    fast = FastEngine(tiny_model, tiny_tokenizer, 8).generate(prompts, params)
    assert [c.token_ids for c in fast] == [c.token_ids for c in hf]
    for a, b in zip(hf, fast):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
    assert len(calls) >= (2 * tiny_model.config.num_hidden_layers + 1) * 11  # every decode step after the first token
    calls.clear()
    FastEngine(tiny_model, tiny_tokenizer, 8, merge_weights=False).generate(prompts, params)
    assert not calls


def test_fused_kernel_references_round_as_the_modules_do():
    """In bf16, bit for bit: the references the Triton kernels follow equal transformers' RMSNorm (with
    the residual add), rotary embedding and SiLU-gated MLP product."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from posttrain.engine import kernels

    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    h, delta = torch.randn(5, 96, generator=g).to(bf), torch.randn(5, 96, generator=g).to(bf)
    norm = LlamaRMSNorm(96, eps=1e-5).to(bf)
    norm.weight.data = torch.randn(96, generator=g).to(bf)
    s, out = kernels.add_rms_norm_ref(h, delta, norm.weight, norm.variance_epsilon)
    assert torch.equal(s, h + delta) and torch.equal(out, norm(h + delta))

    n, heads, kv, d = 3, 4, 2, 16
    qkv = torch.randn(n, (heads + 2 * kv) * d, generator=g).to(bf)
    cos, sin = torch.randn(n, d, generator=g).to(bf), torch.randn(n, d, generator=g).to(bf)
    kc, vc = torch.zeros(6, kv, 10, d, dtype=bf), torch.zeros(6, kv, 10, d, dtype=bf)
    rows, pos = torch.tensor([4, 0, 2]), torch.tensor([7, 1, 3])
    q = kernels.rope_cache_write_ref(qkv, cos, sin, kc, vc, rows, pos, heads, kv)
    q0, k0, v0 = qkv.view(n, 1, heads + 2 * kv, d).transpose(1, 2).split([heads, kv, kv], 1)
    q_hf, k_hf = apply_rotary_pos_emb(q0, k0, cos[:, None], sin[:, None])  # [n, H, 1, d]
    assert torch.equal(q, q_hf[:, :, 0])
    assert torch.equal(kc[rows, :, pos], k_hf[:, :, 0]) and torch.equal(vc[rows, :, pos], v0[:, :, 0])
    assert kc.abs().sum() == kc[rows, :, pos].abs().sum()  # nothing else written

    # The prefill's form: q and k out, each token's K/V to two cache rows (a prompt's two samples).
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    rows2 = torch.tensor([[4, 5], [0, 1], [2, 3]])
    qk = kernels.rope_cache_write_ref(qkv, cos, sin, kc2, vc2, rows2, pos, heads, kv, with_k=True)
    assert torch.equal(qk, torch.cat([q_hf, k_hf], 1)[:, :, 0])
    for sample in range(2):
        assert torch.equal(kc2[rows2[:, sample], :, pos], k_hf[:, :, 0]) and torch.equal(vc2[rows2[:, sample], :, pos], v0[:, :, 0])
    assert kc2.abs().sum() == 2 * kc[rows, :, pos].abs().sum()

    gu = torch.randn(n, 2 * 40, generator=g).to(bf)
    assert torch.equal(kernels.silu_mul_ref(gu), torch.nn.functional.silu(gu[:, :40]) * gu[:, 40:])


# Sampled tokens of the tiny model as the engine drew them at 88a4a67 (before the engine was split into a
# model adapter and a scheduler): a refactor keeps the RNG consumption, compaction and waves as they were.
# The top-p case was drawn again when the sampler went from 8 to 4 candidates a round (its uniforms per
# row and its candidates changed on purpose); plain sampling (top_p 1.0) is as it was at 88a4a67.
PINNED_SAMPLES = {
    (6, 0.8, 0.9): [[180, 277, 135, 342, 94, 316, 355, 337, 281, 283], [317, 304, 167, 189, 273, 183, 280, 143, 107, 191],
                    [263, 156, 300, 78, 188, 20, 256, 204, 357, 221], [142, 269, 362, 107, 57, 75, 25, 338, 1, 75], [307, 258],
                    [148, 231, 365, 305, 167, 321, 148, 290, 259, 191]],
    (4, 1.0, 1.0): [[180, 191, 140, 117, 126, 291, 364, 367, 331, 121], [70, 161, 329, 97, 206, 115, 69, 160, 278, 277], [258], [258],
                    [307, 258], [307, 90, 292, 247, 307, 315, 322, 339, 122, 331]],
}


@pytest.mark.parametrize("batch_size,temperature,top_p", list(PINNED_SAMPLES))
def test_sampled_tokens_are_pinned(tiny_model, tiny_tokenizer, batch_size, temperature, top_p):
    """Same seed, same tokens: one wave (batch 6) and two (batch 4), top-p and plain sampling, rows
    finishing early (a frequent token declared EOS) so that compaction changes the rows sampled."""
    tiny_model.generation_config.eos_token_id = 258
    engine = FastEngine(tiny_model, tiny_tokenizer, batch_size, sync_every=2)
    out = engine.generate(_prompts(tiny_tokenizer, 3), SamplingParams(max_new_tokens=10, temperature=temperature, top_p=top_p,
                                                                      n=2, seed=7, logprobs=True))
    assert [c.token_ids for c in out] == PINNED_SAMPLES[batch_size, temperature, top_p]


def test_free_memory_under_a_per_process_cap(monkeypatch):
    """Under ``torch.cuda.set_per_process_memory_fraction`` (a 24 GB card emulated on a larger one)
    ``auto`` weighs the cap, less what this process holds, not the device's free memory."""
    from posttrain.engine import projections

    gib, cuda = 2**30, torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (130 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 6 * gib)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)
    assert projections.free_memory(cuda) == (130 * gib, 140 * gib)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 0.25)
    assert projections.free_memory(cuda) == (29 * gib, 35 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 40 * gib)
    assert projections.free_memory(cuda) == (0, 35 * gib)
    assert projections.free_memory(torch.device("cpu")) is None


def test_a_reserved_prompt_length_keeps_one_kv_cache_for_longer_prompts_later(tiny_model, tiny_tokenizer):
    """An RL run reserves its longest prompt: a later, longer prompt than any before runs on the same KV
    cache (a new one would also mean every CUDA graph captured again); without it the cache is remade."""
    short, long_ = [list(range(5, 15))], [list(range(5, 95))]
    params = SamplingParams(max_new_tokens=4)
    for reserve, same in ((90, True), (None, False)):
        engine = FastEngine(tiny_model, tiny_tokenizer, 4)
        if reserve:
            engine.reserve(reserve)
        engine.generate(short, params)
        kv = engine.scheduler.kv
        engine.generate(long_, params)
        assert (engine.scheduler.kv is kv) is same
