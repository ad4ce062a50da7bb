"""The fast engine's model adapter alone, without the scheduler: its prefill and decode-step forwards
over a KV cache give the logits of the HF model's own forward, on merged weights, on the fused
kernels and on the live modules; the weights it builds and refreshes."""

import pytest
import torch

from conftest import make_tiny_model
from posttrain.engine.decode_state import KVCache
from posttrain.engine.model_adapter import ModelAdapter
from posttrain.engine.projections import MergedProjection


def _logits_by_hand(adapter, model, prompts, new_tokens):
    """(adapter logits, HF logits) after prefilling ``prompts`` and decoding ``new_tokens`` (one per
    prompt per step), each prompt's row of the KV cache its own."""
    p, width = len(prompts), max(map(len, prompts))
    kv = KVCache.allocate(adapter.n_layers, p, adapter.n_kv, 64, adapter.head_dim, adapter.dtype, "cpu")
    ids = torch.tensor([q + [0] * (width - len(q)) for q in prompts])
    lens = torch.tensor([len(q) for q in prompts])
    got = [adapter.prefill(ids, lens, torch.arange(p)[:, None], kv.flat)]
    seqs = [list(q) for q in prompts]
    want = [torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs])]
    pos = lens.clone()
    for step in new_tokens:
        tok = torch.tensor(step)
        got.append(adapter.step(tok, pos, torch.arange(p), kv.flat, 64).float())
        for s, t in zip(seqs, step):
            s.append(t)
        want.append(torch.stack([model(torch.tensor([s])).logits[0, -1] for s in seqs]))
        pos = pos + 1
    return torch.stack(got), torch.stack(want)


@pytest.mark.parametrize("merge", [True, False])
@torch.inference_mode()
def test_prefill_and_steps_give_the_models_logits(tiny_tokenizer, merge, monkeypatch):
    from posttrain.engine import kernels

    model = make_tiny_model(len(tiny_tokenizer))
    adapter = ModelAdapter(model, merge_weights=merge)
    adapter.build_weights()
    assert adapter.fused is merge  # a Llama with merged weights prefills and decodes on the fused kernels
    norms = []
    real = kernels.add_rms_norm
    monkeypatch.setattr(kernels, "add_rms_norm", lambda *a: norms.append(a[0].shape[0]) or real(*a))
    kv = KVCache.allocate(adapter.n_layers, 2, adapter.n_kv, 64, adapter.head_dim, adapter.dtype, "cpu")
    adapter.prefill(torch.tensor([[5, 9, 17], [7, 0, 0]]), torch.tensor([3, 1]), torch.arange(2)[:, None], kv.flat)
    # Every position of the padded prompts, through each layer's two norms and the final one:
    assert norms == ([2 * 3] * (2 * adapter.n_layers + 1) if merge else [])
    assert (adapter.weights is not None) is merge
    prompts = [[5, 9, 17, 3, 44, 8], [7, 7, 120], [250, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    got, want = _logits_by_hand(adapter, model, prompts, [[11, 12, 13], [40, 50, 60], [3, 2, 1]])
    assert (got - want).abs().max() < 1e-4


@torch.inference_mode()
def test_lora_weights_merge_and_refresh_in_place(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_model(len(tiny_tokenizer)), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.5)
    adapter = ModelAdapter(model)
    adapter.build_weights()
    w0 = adapter.weights[0]
    assert all(isinstance(p, MergedProjection) for p in w0.all())
    assert w0.o.own and not w0.qkv.own and not w0.down.own  # o has no adapter: the model's own tensor
    prompts, steps = [[5, 9, 17], [7, 7, 120, 4]], [[11, 12], [40, 50]]
    got, want = _logits_by_hand(adapter, model, prompts, steps)
    assert (got - want).abs().max() < 1e-4
    ptrs = [p.weight.data_ptr() for p in w0.all()]
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.mul_(-1)
    assert adapter.refresh() is False  # rewritten in place: captured graphs stay valid
    assert [p.weight.data_ptr() for p in w0.all()] == ptrs
    got, want = _logits_by_hand(adapter, model, prompts, steps)
    assert (got - want).abs().max() < 1e-4
    layer = model.get_base_model().model.layers[0]
    layer.self_attn.o_proj.weight = torch.nn.Parameter(layer.self_attn.o_proj.weight.clone())
    assert adapter.refresh() is True  # a tensor the step reads is another one now


def test_build_weights_is_once_and_dora_keeps_the_modules(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_model(len(tiny_tokenizer)), LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    adapter = ModelAdapter(model)
    adapter.build_weights()
    assert adapter.weights is None and not adapter.merge_weights and not adapter.fused
    plain = ModelAdapter(make_tiny_model(len(tiny_tokenizer)))
    plain.build_weights()
    first = plain.weights
    plain.build_weights()
    assert plain.weights is first
