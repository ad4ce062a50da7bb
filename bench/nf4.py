"""``engine.nf4.matmul`` on a GPU (issue 26): exactness against bitsandbytes, launch settings, speed.

For each projection shape of a model (Llama-3.1-8B by default: q/o 4096×4096, k/v 1024×4096, gate/up
14336×4096, down 4096×14336), a random bf16 weight is quantized by bitsandbytes (NF4, double
quantization, blocks of 64: seed 003's ``BitsAndBytesConfig``), then:

* ``nf4.dequantize`` of the kernel's view is compared with ``bitsandbytes.functional.dequantize_4bit``
  (must be equal bit for bit: the kernel rounds each weight as bitsandbytes does);
* ``nf4.matmul`` for 1, 8, 32 and 64 rows against ``x @ dequantize_4bit(W)ᵀ`` (max relative error;
  only the fp32 summation order differs);
* the launch settings (``--sweep``: column and input blocks, warps, stages, target programs, one dot
  over interleaved weights or two over even and odd inputs) timed at 32 rows,
  the best overall reported and the default's time beside it;
* times per call (CUDA events over 200 calls, median of 5) of ``nf4.matmul``, of bitsandbytes'
  ``matmul_4bit`` on the packed weight (what the ``4bit`` path ran before) and of a dense bf16
  ``F.linear`` (the dequantized copy's GEMM), with the bytes each reads and the bandwidth achieved.

    python bench/nf4.py --json bench/results/nf4_h200_DATE.json [--sweep]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from posttrain.engine import nf4  # noqa: E402

SHAPES = {"llama31-8b": {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate_proj/up_proj": (14336, 4096),
                         "down_proj": (4096, 14336)},
          "llama32-1b": {"q_proj/o_proj": (2048, 2048), "k_proj/v_proj": (512, 2048), "gate_proj/up_proj": (8192, 2048),
                         "down_proj": (2048, 8192)}}


def timed(fn, calls: int = 200, repeats: int = 5) -> float:
    """Median microseconds per call of ``fn`` (CUDA events around ``calls`` back-to-back calls)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def quantized(n: int, k: int):
    import bitsandbytes as bnb

    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64)
    return layer.cuda()


def main() -> None:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama31-8b")
    ap.add_argument("--json", required=True)
    ap.add_argument("--sweep", action="store_true", help="time launch settings at 32 rows")
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bitsandbytes": bnb.__version__,
              "model": args.model, "default_launch": nf4.LAUNCH, "shapes": {}}
    layers = {name: quantized(n, k) for name, (n, k) in SHAPES[args.model].items()}
    for name, layer in layers.items():
        w, qs = layer.weight, layer.weight.quant_state
        view = nf4.NF4Weight.of(w)
        dense = bnbf.dequantize_4bit(w.data, qs)
        entry = {"n": view.out_features, "k": view.in_features,
                 "dequantize_equal_to_bitsandbytes": bool(torch.equal(nf4.dequantize(view, torch.bfloat16), dense))}
        packed_bytes = view.packed.numel() + 4 * view.absmax.numel()  # what the kernel reads
        for m in (1, 8, 32, 64):
            x = torch.randn(m, view.in_features, dtype=torch.bfloat16, device="cuda")
            want = x.float() @ dense.float().T
            got = nf4.matmul(x, view).float()
            us = timed(lambda: nf4.matmul(x, view))
            us_bnb = timed(lambda: bnb.matmul_4bit(x, w.t(), quant_state=qs))
            us_dense = timed(lambda: F.linear(x, dense))
            entry[f"rows_{m}"] = {
                "max_rel_err": round(((got - want).abs().max() / want.abs().max()).item(), 6),
                "nf4_us": round(us, 2), "bnb_matmul_4bit_us": round(us_bnb, 2), "dense_bf16_us": round(us_dense, 2),
                "nf4_gb_s": round(packed_bytes / us / 1e3, 1), "dense_gb_s": round(dense.numel() * 2 / us_dense / 1e3, 1)}
        result["shapes"][name] = entry
        print(name, json.dumps(entry), flush=True)
    if args.sweep:
        grid = [(bn, bk, w, 2, 528, True, lut, scale) for (bn, bk, w) in ((32, 128, 4), (64, 256, 8), (64, 128, 4))
                for lut in ("gather", "select", "none") for scale in ("byte", "block")]
        xs = {name: torch.randn(32, layer.in_features, dtype=torch.bfloat16, device="cuda") for name, layer in layers.items()}
        views = {name: nf4.NF4Weight.of(layer.weight) for name, layer in layers.items()}
        totals = []
        for block_n, block_k, warps, stages, programs, join, lut, scale in grid:
            cfg = dict(block_n=block_n, block_k=block_k, num_warps=warps, num_stages=stages, programs=programs, join=join, lut=lut,
                       scale=scale)
            try:
                per = {name: timed(lambda name=name: nf4.matmul(xs[name], views[name], **cfg), calls=50, repeats=3) for name in layers}
            except Exception as e:  # e.g. more shared memory than the GPU has
                print("skipped", cfg, type(e).__name__, flush=True)
                continue
            totals.append((sum(per.values()), cfg, per))
        totals.sort(key=lambda t: t[0])
        default = next(t for t in totals if t[1] == nf4.LAUNCH)  # the default must run
        result["sweep_rows_32"] = {"best": [{"total_us": round(t, 2), **cfg, **{k: round(v, 2) for k, v in per.items()}}
                                            for t, cfg, per in totals if cfg["lut"] != "none"][:5],
                                   "all": [{"total_us": round(t, 2), **cfg} for t, cfg, per in totals],
                                   "default": {"total_us": round(default[0], 2), **default[1]}}
        print("sweep", json.dumps(result["sweep_rows_32"]), flush=True)
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
