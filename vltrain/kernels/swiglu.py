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

Numerics: liger computes silu in fp32 and rounds once (stock bf16 rounds after silu and again after
the multiply), so bf16 results differ by about one bf16 ulp. Where Triton cannot run (CPU, or liger not
installed) the class's own forward runs, so CPU results are stock.
"""

from __future__ import annotations

import importlib
import types

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


def _fused_swiglu_forward(self, x):
    op = triton_can_run(x, "liger_kernel.ops.swiglu", "LigerSiLUMulFunction")
    if op is None:
        return type(self).forward(self, x)
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
    for mlp in swiglu_mlps(model, model_type):
        if getattr(mlp.__dict__.get("forward"), "__func__", None) is _fused_swiglu_forward:
            continue
        mlp.forward = types.MethodType(_fused_swiglu_forward, mlp)
        counts[type(mlp).__name__] = counts.get(type(mlp).__name__, 0) + 1
    return [f"swiglu: {name}.forward x{n} (liger silu_mul)" for name, n in counts.items()]
