"""Qwen2.5-VL vision MLP (1280 -> 3420 -> 1280, SiLU, biases) forward + backward on one GPU: stock, liger
silu_mul on the 3420-wide activations, and the aligned path of `model.kernels=[swiglu]` (padded to 3456).

    python benchmarks/bench_vision_mlp.py --rows 21120     # the vision patches of bench_sft's 3B step
"""

from __future__ import annotations

import argparse
import copy
import types

import torch


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def main():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

    from vltrain.kernels import swiglu

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=21120)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    # the released Qwen2.5-VL vision tower (3B/7B/72B): hidden 1280, intermediate 3420 (the config class's
    # default hidden_size is 3584, so it is set here)
    config = Qwen2_5_VLConfig(vision_config=dict(hidden_size=1280, intermediate_size=3420)).vision_config
    stock = Qwen2_5_VLMLP(config, bias=True).cuda().bfloat16()
    unaligned, aligned = copy.deepcopy(stock), copy.deepcopy(stock)
    aligned.forward = types.MethodType(swiglu._fused_swiglu_forward, aligned)
    op = swiglu.triton_can_run(torch.ones(1, device="cuda"), "liger_kernel.ops.swiglu", "LigerSiLUMulFunction")
    unaligned.forward = types.MethodType(lambda self, x: self.down_proj(op.apply(self.gate_proj(x), self.up_proj(x))),
                                         unaligned)
    x = torch.randn(args.rows, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    flops = 3 * 2 * 3 * args.rows * config.hidden_size * config.intermediate_size  # fwd + bwd, 3 matmuls
    print(f"{torch.cuda.get_device_name()} | rows {args.rows} | hidden {config.hidden_size} | intermediate {config.intermediate_size} "
          f"(aligned path pads {swiglu._alignment_pad(aligned)})")
    for name, mlp in (("stock", stock), ("liger silu_mul, 3420 wide", unaligned), ("aligned (kernels swiglu)", aligned)):
        ms = time_ms(lambda: mlp(x).sum().backward(), args.iters)
        print(f"{name:<28} {ms:8.2f} ms fwd+bwd  {flops / ms / 1e9:6.0f} TFLOP/s")


if __name__ == "__main__":
    main()
