"""NF4 weights in bitsandbytes' layout without bitsandbytes (tests): a dense weight quantized to
``Params4bit``'s packed bytes and quant state, and a Linear4bit stand-in that computes with them.
Run as a script under ``TRITON_INTERPRET=1`` it checks ``nf4.matmul`` (see test_nf4.py)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch

# bitsandbytes' NF4 levels (the QLoRA paper's normal-float quantiles), in code order
NF4_LEVELS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0]


def quantize_nf4(dense: torch.Tensor, double: bool = True, blocksize: int = 64) -> torch.Tensor:
    """A uint8 [N*K/2, 1] tensor with a ``quant_state`` as bitsandbytes' ``Params4bit`` holds them."""
    code = torch.tensor(NF4_LEVELS)
    flat = dense.detach().float().reshape(-1, blocksize)
    absmax = flat.abs().amax(1).clamp(min=1e-8)
    idx = ((flat / absmax[:, None])[..., None] - code).abs().argmin(-1).reshape(-1).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    state = SimpleNamespace(quant_type="nf4", blocksize=blocksize, shape=torch.Size(dense.shape), code=code,
                            dtype=dense.dtype, nested=double, state2=None, offset=None, absmax=absmax)
    if double:  # absmax - offset, 8-bit codes in blocks of 256 (any 256-level map; bitsandbytes uses a dynamic one)
        offset = absmax.mean()
        rest = absmax - offset
        pad = -len(rest) % 256
        blocks = torch.cat([rest, rest.new_zeros(pad)]).view(-1, 256)
        scale = blocks.abs().amax(1).clamp(min=1e-8)
        code2 = torch.linspace(-1, 1, 256)
        q = ((blocks / scale[:, None])[..., None] - code2).abs().argmin(-1).reshape(-1)[: len(rest)].to(torch.uint8)
        state.absmax, state.offset = q, offset
        state.state2 = SimpleNamespace(blocksize=256, code=code2, absmax=scale)
    weight = torch.nn.Parameter(packed.view(-1, 1), requires_grad=False)
    weight.quant_state = state
    return weight


class NF4Linear(torch.nn.Linear):
    """A stand-in for bitsandbytes' Linear4bit holding real NF4 data: forward dequantizes (the
    reference ``nf4.dequantize``) and multiplies, in the input's dtype."""

    def __init__(self, linear: torch.nn.Linear, double: bool = True):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight = quantize_nf4(linear.weight, double)
        if linear.bias is not None:
            self.bias = linear.bias

    def forward(self, x):
        from posttrain.engine import nf4

        w = nf4.dequantize(nf4.NF4Weight.of(self.weight), x.dtype)
        return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


def check_kernel() -> None:
    """``nf4.matmul`` against x @ dequantize(W)ᵀ: row counts below, at and inside a tile, output
    sizes not a multiple of the column block, one span or several, with and without double
    quantization, fp32 and fp16."""
    from posttrain.engine import nf4

    assert nf4.usable(torch.device("cpu"))
    torch.manual_seed(0)
    for double in (True, False):
        for n, k in ((48, 192), (32, 64), (80, 320)):
            weight = quantize_nf4(torch.randn(n, k), double)
            w = nf4.NF4Weight.of(weight)
            for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
                for m in (1, 5, 16, 33):
                    x = torch.randn(m, k).to(dtype)
                    bias = torch.randn(n)
                    want = x.float() @ nf4.dequantize(w, dtype).float().T + bias
                    for programs, block_k, join, lut, scale in ((1, 256, False, "gather", "byte"), (64, 64, False, "select", "block"),
                                                                (1, 128, True, "select", "byte"), (64, 64, True, "gather", "block")):
                        # one span per column block or as many as steps; a step past the end of K or not; both decodings
                        got = nf4.matmul(x, w, bias, programs=programs, block_k=block_k, join=join, lut=lut, scale=scale)
                        assert got.dtype == dtype and got.shape == (m, n)
                        err = (got.float() - want).abs().max().item()
                        assert err <= tol * want.abs().max().item(), (double, n, k, dtype, m, programs, block_k, join, lut, scale, err)
    x3 = torch.randn(2, 3, 64)
    w = nf4.NF4Weight.of(quantize_nf4(torch.randn(32, 64)))
    assert torch.allclose(nf4.matmul(x3, w), x3 @ nf4.dequantize(w, torch.float32).T, atol=1e-4)


def check_engine(model_dir: str) -> None:
    """The fast engine's 4-bit path on a model whose projections are NF4 stand-ins: every decode step
    through ``nf4.matmul``, and the greedy tokens are HF generate's on the same model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.engine import SamplingParams, make_engine, nf4
    from posttrain.engine.hf import HFEngine

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, NF4Linear(getattr(parent, name), double=name != "o_proj"))
    model.is_loaded_in_4bit = True
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    calls = []
    matmul = nf4.matmul
    nf4.matmul = lambda *a, **k: calls.append(a[0].shape) or matmul(*a, **k)
    prompts = [tok("Natalia sold clips to 48 of her friends")["input_ids"][: 4 + 3 * i] for i in range(4)]
    params = SamplingParams(max_new_tokens=12)
    want = [c.token_ids for c in HFEngine(model, tok, 4).generate(prompts, params)]
    engine = make_engine("fast", model, tok, 4, quantized_rollouts="4bit")
    got = [c.token_ids for c in engine.generate(prompts, params)]
    assert got == want, (got, want)
    assert len(calls) >= 7 * 2 * 11, len(calls)  # 7 projections x 2 layers x the decode steps after the first token


if __name__ == "__main__":
    check_kernel() if sys.argv[1] == "kernel" else check_engine(sys.argv[2])
    print("ok")
