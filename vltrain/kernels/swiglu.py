"""SwiGLU MLPs with silu(gate) * up as one fused Triton kernel (liger's `LigerSiLUMulFunction` op).

Patches, on one model instance, `forward` of every MLP module whose class is listed in `SWIGLU_MLPS`
for the model's family and whose `act_fn` is SiLU: the LLM MLPs of every family, the Qwen2.5-VL vision
MLP, and the Qwen3.5-MoE `shared_expert`. The stock forward is
`down_proj(act_fn(gate_proj(x)) * up_proj(x))`: a SiLU kernel and a multiply kernel forward, four
elementwise kernels backward, and the SiLU output kept alive for backward. The patched forward is
`down_proj(silu_mul(gate_proj(x), up_proj(x)))` with one kernel each way, keeping only the two
projections. gate/up/down are called as modules, so LoRA wrappers and FSDP/ZeRO-3 hooks on them
work unchanged. Not patched: MoE experts (fused 3-D weights, their own forward), the GELU vision
MLPs of Qwen2-VL and Qwen3.x.

Aligned matmuls: an intermediate size that is not a multiple of 8 (the Qwen2.5-VL vision MLP: 3420)
gives bf16 activations whose rows are not 16-byte aligned, and cuBLAS then falls back from the Hopper
(TMA) matmul kernels to slow sm80 ones for every matmul that touches them (the 3B profile: ~250 ms of a
1.75 s step). Measured on an H100 (`benchmarks/bench_vision_mlp.py`, 21,120 rows, bf16, forward +
backward): 8.42 ms stock, 3.29 ms padded. Where the three projections are plain `nn.Linear`s
with their full weights and no hooks (not LoRA-wrapped, quantized, ZeRO-3-partitioned or offloaded:
the padded path reads the weights instead of calling the modules) the patched forward pads
the intermediate dimension with zero rows/columns up to a multiple of 64 (`_aligned_swiglu`): padded
gate/up outputs are 0, silu(0) * 0 = 0, and the zero columns of the padded down weight add nothing, so
the output is the same; the weights' gradients come back through the pad, sliced to their shapes.
Costs three small weight copies per call and ~1% more MLP FLOPs.

Numerics: liger computes silu in fp32 and rounds once (stock bf16 rounds after silu and again after
the multiply), so bf16 results differ by about one bf16 ulp. Where Triton cannot run (CPU, or liger not
installed) the class's own forward runs, so CPU results are stock.
"""

from __future__ import annotations

import importlib
import types

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation
from torch import nn

from vltrain.kernels.rms_norm import triton_can_run

# model_type -> modeling module's MLP class names with the gate/up/down SwiGLU forward (transformers 5.24)
SWIGLU_MLPS: dict[str, tuple[str, ...]] = {
    "qwen2_vl": ("Qwen2MLP",),
    "qwen2_5_vl": ("Qwen2MLP", "Qwen2_5_VLMLP"),
    "qwen3_vl": ("Qwen3VLTextMLP",),
    "qwen3_vl_moe": ("Qwen3VLMoeTextMLP",),  # only in `mlp_only_layers`; the default config has none
    "qwen3_5": ("Qwen3_5MLP",),
    "qwen3_5_moe": ("Qwen3_5MoeMLP",),  # the shared expert
}


def _is_silu(act) -> bool:
    return isinstance(act, (SiLUActivation, nn.SiLU))


ALIGN = 64  # pad a misaligned intermediate size up to a multiple of this


def _alignment_pad(mlp) -> int:
    """Zero rows to add to the intermediate dimension of `mlp` (0 when it is aligned or cannot be padded)."""
    projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    size = mlp.gate_proj.weight.shape[0] if type(mlp.gate_proj) is nn.Linear else 0
    if size % 8 == 0 or any(type(p) is not nn.Linear or hasattr(p.weight, "ds_id")  # ZeRO-3 partitioned
                            or type(p.weight).__name__ == "DTensor"
                            or p._forward_pre_hooks or p._forward_hooks or hasattr(p, "_hf_hook")  # offloading
                            for p in projections):
        return 0
    return -size % ALIGN


def _aligned_swiglu(mlp, x, silu_mul, pad: int):
    """down(silu_mul(gate(x), up(x))) with the intermediate dimension zero-padded by `pad` (module doc)."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    rows = lambda t: None if t is None else F.pad(t, (0, 0, 0, pad) if t.ndim == 2 else (0, pad))  # noqa: E731
    hidden = silu_mul(F.linear(x, rows(gate.weight), rows(gate.bias)), F.linear(x, rows(up.weight), rows(up.bias)))
    return F.linear(hidden, F.pad(down.weight, (0, pad)), down.bias)


def _torch_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _fused_swiglu_forward(self, x):
    op = triton_can_run(x, "liger_kernel.ops.swiglu", "LigerSiLUMulFunction")
    if op is None:
        return type(self).forward(self, x)
    pad = _alignment_pad(self)
    if pad:
        return _aligned_swiglu(self, x, op.apply, pad)
    return self.down_proj(op.apply(self.gate_proj(x), self.up_proj(x)))


def swiglu_mlps(model, model_type: str) -> list[nn.Module]:
    """The modules under `model` that the swiglu kernel replaces (patched or not)."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    classes = tuple(getattr(module, name) for name in SWIGLU_MLPS.get(model_type, ()))
    return [m for m in model.modules()
            if type(m) in classes and _is_silu(getattr(m, "act_fn", None))
            and all(isinstance(getattr(m, p, None), nn.Module) for p in ("gate_proj", "up_proj", "down_proj"))]


def patch_swiglu(model, model_type: str) -> list[str]:
    """Patch every SwiGLU MLP under `model`; one entry per class, [] if none is new."""
    counts: dict[str, int] = {}
    widths: dict[str, tuple[int, int]] = {}  # class -> (intermediate size, its alignment pad)
    for mlp in swiglu_mlps(model, model_type):
        if getattr(mlp.__dict__.get("forward"), "__func__", None) is _fused_swiglu_forward:
            continue
        mlp.forward = types.MethodType(_fused_swiglu_forward, mlp)
        counts[type(mlp).__name__] = counts.get(type(mlp).__name__, 0) + 1
        widths[type(mlp).__name__] = (mlp.gate_proj.weight.shape[0], _alignment_pad(mlp))
    return [f"swiglu: {name}.forward x{n} (liger silu_mul" +
            (f"; intermediate {widths[name][0]} padded to {sum(widths[name])} on CUDA)" if widths[name][1] else ")")
            for name, n in counts.items()]
