"""``engine.nf4``: the NF4 decode matmul, checked on CPU under Triton's interpreter (subprocesses: the
interpreter is chosen when Triton's kernels are defined) against the dense reference, which matches
bitsandbytes' own dequantization bit for bit (BENCHMARKS.md; bench/nf4.py checks it on the GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nf4_stand_in import quantize_nf4
from posttrain.engine import nf4

HERE = Path(__file__).parent


def _interpret(*args):
    pytest.importorskip("triton")  # the test extras install it on Linux x86-64
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(HERE / "nf4_stand_in.py"), *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]


def test_kernel_matches_the_dense_reference():
    _interpret("kernel")


def test_fast_engine_decodes_from_nf4_weights_as_hf_generate(tiny_model_dir):
    _interpret("engine", tiny_model_dir)


def test_the_kernel_reads_bitsandbytes_layout():
    """The view takes NF4 in 64-blocks, with or without double quantization, and nothing else; the
    reference dequantization is the weight it was quantized from, to NF4's precision (a swapped
    nibble order, block size or absmax level would be far off)."""
    torch.manual_seed(0)
    dense = torch.randn(32, 128)
    for double in (True, False):
        w = nf4.NF4Weight.of(quantize_nf4(dense, double))
        assert (w.out_features, w.in_features, w.absmax.dtype) == (32, 128, torch.float32)
        back = nf4.dequantize(w, torch.float32)
        blockmax = dense.abs().view(-1, 64).amax(1, keepdim=True)
        assert ((back - dense).abs().view(-1, 64) <= 0.2 * blockmax + 0.01).all()
    fp4 = quantize_nf4(dense)
    fp4.quant_state.quant_type = "fp4"
    big = quantize_nf4(dense, blocksize=128)
    odd = quantize_nf4(torch.randn(8, 96), double=False, blocksize=32)
    assert nf4.NF4Weight.of(fp4) is None and nf4.NF4Weight.of(big) is None and nf4.NF4Weight.of(odd) is None
    assert nf4.NF4Weight.of(torch.nn.Parameter(torch.randn(4, 4))) is None
    assert nf4.splits(1024, 4096, 32, 256, 264) == 9 and nf4.splits(14336, 4096, 32, 256, 264) == 1
    assert nf4.splits(32, 64, 32, 256, 264) == 1
