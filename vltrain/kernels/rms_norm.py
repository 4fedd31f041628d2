"""RMSNorm as one fused Triton kernel (liger's `LigerRMSNormFunction` op), forward and backward.

Patches, on one model instance, `forward` of every RMSNorm module whose class is listed in `RMS_NORMS`
for the model's family: LLM input/post-attention/final norms, Qwen3.x q_norm/k_norm, and the
Qwen2.5-VL vision norms (norm1/norm2/merger ln_q). The stock forward upcasts to fp32, squares,
averages, multiplies and casts back as ~8 separate elementwise kernels (and as many in backward);
the patched one is a single kernel each way. Not patched: Qwen3.5's gated norm in linear attention
(`*RMSNormGated`, it also applies a SiLU gate) and the vision LayerNorms of Qwen2-VL / Qwen3.x.

The two kinds of math, as in transformers 5.24 (checked against each listed class by
`verify_rms_norm_math` before a class is first patched, so a changed upstream formula raises instead
of silently diverging):
- "llama"  (Qwen2-VL, Qwen2.5-VL, Qwen3-VL[-MoE]): `w * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)`
  -> liger casting mode "llama", offset 0.
- "gemma"  (Qwen3.5[-MoE], zero-centred weight): `(x.float() * rsqrt(mean(x^2) + eps) * (1 + w.float()))
  .to(x.dtype)` -> liger casting mode "gemma", offset 1.0.

The patched forward runs liger only where Triton can (`triton_can_run`: a CUDA tensor, liger-kernel
installed) and, for "llama", only when x and the weight share a
dtype (the stock result then has the weight's dtype, which liger does not reproduce). Everywhere else
it calls the class's own forward, so CPU results are the stock ones bit for bit. liger's backward is
asked not to overwrite the incoming gradient (`in_place=False`): that gradient tensor may be shared
with another branch, and writing dX into it would corrupt that branch.
"""

from __future__ import annotations

import functools
import importlib
import types

import torch

# model_type -> ((modeling module's class name, eps attribute, casting mode, offset), ...)
RMS_NORMS: dict[str, tuple[tuple[str, str, str, float], ...]] = {
    "qwen2_vl": (("Qwen2VLRMSNorm", "variance_epsilon", "llama", 0.0),),
    "qwen2_5_vl": (("Qwen2_5_VLRMSNorm", "variance_epsilon", "llama", 0.0),),
    "qwen3_vl": (("Qwen3VLTextRMSNorm", "variance_epsilon", "llama", 0.0),),
    "qwen3_vl_moe": (("Qwen3VLMoeTextRMSNorm", "variance_epsilon", "llama", 0.0),),
    "qwen3_5": (("Qwen3_5RMSNorm", "eps", "gemma", 1.0),),
    "qwen3_5_moe": (("Qwen3_5MoeRMSNorm", "eps", "gemma", 1.0),),
}


@functools.cache
def _liger_op(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None


def triton_can_run(x: torch.Tensor, op_module: str, op_name: str):
    """liger's op `op_name` if it can run on `x` (a CUDA tensor, liger installed), else None. The Triton
    interpreter is not used: under TRITON_INTERPRET=1 (Triton 3.8) liger 0.8.5's kernels fail on their
    float arguments and libdevice's rsqrt; tests/test_kernels.py fills those two gaps to run the patched
    forwards on CPU. None while torch.compile traces (kernels "compile_layers"): dynamo cannot trace
    liger's autograd functions (torch 2.11), and inductor fuses the stock math itself."""
    if not x.is_cuda or torch.compiler.is_compiling():
        return None
    return _liger_op(op_module, op_name)


def reference_rms_norm(x, weight, eps: float, casting_mode: str, offset: float):
    """The math each casting mode stands for, written out in torch (x (..., H), weight (H,))."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting_mode == "llama":
        return (offset + weight) * normed.to(x.dtype)
    return (normed * (offset + weight.float())).to(x.dtype)


def _modeling_class(model_type: str, class_name: str):
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, class_name)


@functools.cache
def verify_rms_norm_math(cls, eps_attr: str, casting_mode: str, offset: float) -> None:
    """Raise if `cls.forward` is not `reference_rms_norm` with this mode and offset (bf16 and fp32, CPU).

    The probe draws from its own generator: the global RNG (seeded by `train.seed` for LoRA init and
    data order) is left as it was."""
    gen = torch.Generator().manual_seed(0)
    probe = cls(32, eps=1e-5)
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=gen))
    for dtype in (torch.bfloat16, torch.float32):
        probe = probe.to(dtype)
        x = torch.randn(5, 32, generator=gen).mul_(3).to(dtype)
        got = cls.forward(probe, x)
        want = reference_rms_norm(x, probe.weight, getattr(probe, eps_attr), casting_mode, offset)
        if got.dtype != want.dtype or not torch.equal(got, want):
            raise ValueError(f"rms_norm: {cls.__qualname__}.forward no longer computes the {casting_mode!r} "
                             f"RMSNorm (offset {offset}) this kernel replaces it with; not patching")


def _fused_rms_norm_forward(self, hidden_states):
    casting_mode, offset, eps_attr = self._vltrain_rms_norm
    op = triton_can_run(hidden_states, "liger_kernel.ops.rms_norm", "LigerRMSNormFunction")
    if op is None or (casting_mode == "llama" and hidden_states.dtype != self.weight.dtype):
        return type(self).forward(self, hidden_states)
    return op.apply(hidden_states, self.weight, getattr(self, eps_attr), offset, casting_mode, False)


def patch_rms_norm(model, model_type: str) -> list[str]:
    """Patch every listed RMSNorm instance under `model`; one entry per class, [] if none is new."""
    entries = []
    for class_name, eps_attr, casting_mode, offset in RMS_NORMS.get(model_type, ()):
        cls = _modeling_class(model_type, class_name)
        modules = [m for m in model.modules() if type(m) is cls]
        todo = [m for m in modules
                if getattr(m.__dict__.get("forward"), "__func__", None) is not _fused_rms_norm_forward]
        if not todo:
            continue
        verify_rms_norm_math(cls, eps_attr, casting_mode, offset)
        for module in todo:
            module._vltrain_rms_norm = (casting_mode, offset, eps_attr)
            module.forward = types.MethodType(_fused_rms_norm_forward, module)
        entries.append(f"rms_norm: {class_name}.forward x{len(todo)} (liger, casting {casting_mode!r}, "
                       f"offset {offset:g})")
    return entries


def count_rms_norms(model, model_type: str) -> int:
    classes = tuple(_modeling_class(model_type, c[0]) for c in RMS_NORMS.get(model_type, ()))
    return sum(type(m) in classes for m in model.modules())
