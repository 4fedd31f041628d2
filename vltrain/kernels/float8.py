"""The LLM decoder layers' linears as torchao `Float8Linear` ("float8": tensorwise scales, "float8_rowwise").

Swaps, on one model instance, every plain `nn.Linear` of the LLM decoder layers that the family table names as
the layers' matmuls (`FamilySpec.llm_lora_regex()`: attention q/k/v/o, MLP gate/up/down, Qwen3.5's
linear-attention projections, the Qwen3.5-MoE shared expert) for torchao's `Float8Linear`: in training each
matmul -- forward, grad-input and grad-weight -- casts its operands to float8 with dynamic scales (e4m3 for
activations and weights, e5m2 for gradients under "tensorwise"; e4m3 everywhere under "rowwise") and runs
`torch._scaled_mm`, which on H100/H200 has twice the bf16 matmul rate. The weights stay in the model dtype
(the optimizer, checkpoints and exports see ordinary parameters: a converted model's state dict has the stock
keys), only the matmul operands are cast.

Not converted, on purpose:
- lm_head (the loss is sensitive to it; "fused_linear_ce" reads its weight directly), the vision tower and
  the merger (small matmuls, many of odd sizes), the routers and `shared_expert_gate` (they pick experts);
- linears whose in or out features are not multiples of 16 (`torch._scaled_mm` needs them): they stay
  as they are and the report names them (Qwen3.5's `linear_attn.in_proj_a/b` on small configs);
- MoE experts: fused 3-D parameters with their own forward, not `nn.Linear`; only real `nn.Linear`s convert.

A converted linear pads the token dim of its input to a multiple of 16 (`_padded_float8_linear`): packed rows and
padded batches have any length, `torch._scaled_mm` does not take them.

LoRA: apply before the adapters are added, as `vltrain.build.build_model` does (kernels are its step 3, LoRA
its step 5): the frozen base linears become `Float8Linear` (a `nn.Linear` subclass, which peft wraps like any
linear) and the adapters' own small matmuls stay in the model dtype. Applied to a model whose target linears
are already peft LoRA layers -- or 4/8-bit quantized ones (lora.bits < 16) -- it raises: converting a
LoRA layer's inner base would silently depend on peft internals, and a quantized weight cannot be cast.

Composes with "compile_layers" (apply_kernels applies the kernels in the order of its KERNELS table, float8
before compile_layers, so the compiled layers trace the float8 modules), "fused_linear_ce" (lm_head is not
touched), "rms_norm" and "swiglu" (swiglu calls gate/up/down as modules when they are not plain nn.Linear).
Eval and generation also run the float8 matmuls (unlike compile_layers, which runs the stock forward there).

Needs torchao (`pip install 'vltrain[fp8]'`) and, on CUDA, a GPU with fp8 matmuls (compute capability >= 8.9:
H100/H200, L40, RTX 4090); `check_float8_supported` says which was found. Without CUDA (tests, CPU runs) the
float8 matmuls are emulated (torchao `emulate=True`: the operands are quantized to float8 exactly as on the
GPU, then multiplied in high precision), so CPU results show the quantization but not the speed.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types

import torch
from torch import nn

from vltrain.families import family_spec

FLOAT8_RECIPES = {"float8": "tensorwise", "float8_rowwise": "rowwise"}  # kernel name -> torchao recipe
MIN_CAPABILITY = (8, 9)  # torch._scaled_mm: Ada (8.9) and Hopper (9.0) or newer


def _torchao_float8(kernel: str):
    """The torchao names this kernel uses, or the ValueError that says how to install torchao."""
    try:
        from torchao.float8 import Float8LinearConfig, ScalingGranularity, convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear  # not exported by torchao.float8 (0.18)
    except ImportError as e:
        raise ValueError(f"model.kernels=[{kernel}] needs torchao: pip install 'vltrain[fp8]' ({e})") from None
    return types.SimpleNamespace(Float8Linear=Float8Linear, Float8LinearConfig=Float8LinearConfig,
                                 ScalingGranularity=ScalingGranularity, convert=convert_to_float8_training)


def check_float8_supported(kernel: str = "float8", device=None) -> None:
    """ValueError when `kernel` cannot run: torchao missing, or -- on a CUDA device (`device`, or the current
    GPU when `device` is None and CUDA is available) -- a GPU without fp8 matmuls. Cheap: call it before the
    model loads."""
    _torchao_float8(kernel)
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ValueError(
            f"model.kernels=[{kernel}] needs a GPU with fp8 matmuls (compute capability >= 8.9: H100/H200, L40, "
            f"RTX 4090); found {torch.cuda.get_device_name(device)} ({capability[0]}.{capability[1]})")


def float8_config(recipe: str, *, emulate: bool):
    """torchao's Float8LinearConfig of `recipe` ("tensorwise" | "rowwise"), emulated or not."""
    float8 = _torchao_float8("float8")
    return dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)


def recipe_of(module) -> str:
    """The recipe a converted module was built with (rowwise scales are "axiswise" in torchao's config)."""
    granularity = module.config.cast_config_input.scaling_granularity
    return "rowwise" if granularity is _torchao_float8("float8").ScalingGranularity.AXISWISE else "tensorwise"


def float8_targets(model) -> list[str]:
    """Names of the modules the kernel looks at in `model` (the ForConditionalGeneration, not a peft wrapper):
    the family's LLM decoder-layer linears, converted or not."""
    pattern = re.compile(family_spec(model).llm_lora_regex())
    return [name for name, _ in model.named_modules() if pattern.match(name)]


def _fits_scaled_mm(linear: nn.Linear) -> bool:
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


@functools.cache
def _padded_float8_linear():
    """Float8Linear that pads its input's token dim (-2) to a multiple of 16 and cuts the output back.

    The grad-weight matmul (grad_out^T @ input) contracts over the tokens, and `torch._scaled_mm` needs that
    dimension to be a multiple of 16: a packed row of 7,528 tokens failed in the backward on the H200
    (2026-12-02). Zero rows add nothing to the weight gradient and their outputs are dropped, so the result is
    the unpadded one; the cost is one copy of the input when its length is not already a multiple of 16."""
    base = _torchao_float8("float8").Float8Linear

    class PaddedFloat8Linear(base):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pad = -x.shape[-2] % 16
            if not pad:
                return super().forward(x)
            return super().forward(nn.functional.pad(x, (0, 0, 0, pad)))[..., : x.shape[-2], :]

    return PaddedFloat8Linear


def _refusal(kernel: str, name: str, module) -> ValueError:
    kind = type(module).__name__
    if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
        why = ("is a peft LoRA layer: apply the kernel before adding adapters (vltrain.build.build_model does; "
               "the frozen base linear is then converted and the adapters stay in the model dtype)")
    elif "4bit" in kind or "8bit" in kind:
        why = "is quantized (lora.bits < 16): float8 needs the 16-bit base"
    else:
        why = "is not a plain nn.Linear"
    return ValueError(f"kernel {kernel!r}: {name} ({kind}) {why}")


def patch_float8(base, kernel: str = "float8") -> list[str]:
    """Convert the LLM decoder-layer linears of `base` (the ForConditionalGeneration: apply_kernels passes the
    model under a peft wrapper) to Float8Linear (module docstring); one entry describing every converted linear
    (so a second call returns the same entry and converts nothing)."""
    recipe = FLOAT8_RECIPES[kernel]
    float8 = _torchao_float8(kernel)
    check_float8_supported(kernel)
    spec = family_spec(base)
    names = float8_targets(base)
    to_convert, skipped = set(), []
    for name in names:
        module = base.get_submodule(name)
        if isinstance(module, float8.Float8Linear):
            if recipe_of(module) != recipe:
                raise ValueError(f"kernel {kernel!r}: {name} is already float8 {recipe_of(module)}; ask for one of "
                                 f"{sorted(FLOAT8_RECIPES)}, not both")
        elif type(module) is not nn.Linear:
            raise _refusal(kernel, name, module)
        elif _fits_scaled_mm(module):
            to_convert.add(name)
        else:
            skipped.append(name)
    if to_convert:
        config = float8_config(recipe, emulate=not torch.cuda.is_available())
        float8.convert(base, config=config, module_filter_fn=lambda _, fqn: fqn in to_convert)
        for name in to_convert:
            base.get_submodule(name).__class__ = _padded_float8_linear()
    num_converted = sum(isinstance(base.get_submodule(name), float8.Float8Linear) for name in names)
    assert num_converted == len(names) - len(skipped), "every target is converted or skipped"
    entry = f"{kernel}: {num_converted} Linear layers of {spec.llm_layers} ({recipe})"
    if skipped:
        kinds = sorted({name.split(".", len(spec.llm_layers.split(".")) + 1)[-1] for name in skipped})
        entry += f"; {len(skipped)} kept (features not multiples of 16: {', '.join(kinds)})"
    if spec.moe:
        entry += "; MoE experts are fused 3-D weights, not nn.Linear: not converted"
    return [entry]
