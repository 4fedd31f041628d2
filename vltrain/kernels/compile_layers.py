"""Each LLM decoder layer's computation through `torch.compile` ("compile_layers"); each vision block's
("compile_vision").

Patches, on one model instance, `forward` of every LLM decoder layer: in training (module in train mode,
grad enabled) the layer's own computation runs as a `torch.compile(dynamic=True)` function, so inductor
fuses the elementwise work left between the matmuls (residual adds, rotary embedding, casts, norms) and
the step launches far fewer kernels -- which matters most where it is bound by Python/launch overhead
(small micro-batches, LoRA). Dynamic shapes: one compile serves every packed row length (a couple of
recompiles at first for 0/1 specialisation); all layers of a model share one compiled code object.

Gradient checkpointing stays outside the compiled function: a checkpointed layer calls
`layer._gradient_checkpointing_func(compiled, ...)` exactly as transformers' own wrapper does, so the
recompute reruns the compiled code. (Compiling the layer's outer call instead would not work: the
packed attention is a deliberate graph break, and dynamo runs a checkpoint region containing a graph
break entirely eager.) Eval mode and no-grad calls (generation, evaluation) run the stock forward.

Runs eager inside the compiled function (`torch.compiler.disable` in vltrain.attention): the packed
varlen attention (its example boundaries are data-dependent) and Qwen3.5's per-example linear
attention. The vision tower's blocks are compiled the same way by "compile_vision" (also opt-in): the
varlen vision attention between the matmuls runs eager there, the norms, rotary embedding, residuals and
activations around it are fused. For families whose step is bound by launching the tower's many small
kernels (Qwen2-VL, Qwen3-VL: benchmarks/RESULTS.md).

Eager's bf16 numerics are kept (inductor's `emulate_precision_casts`): by default inductor drops the
round-to-bf16 between two ops it fuses. That is closer to exact arithmetic, but it trains differently from
the eager model: a LoRA layer's bf16 output `base(x) + scaling * B(A(x))` keeps, fused, the adapter's
contribution that eager rounds away while it is small (B starts at zero), so compiled LoRA learned several
times faster per step than the eager and HF runs at lr 1e-5 (benchmarks/RESULTS.md, round 9).

Costs: the first steps compile (about a minute on a GPU). Not part of "all": ask for it by name
(`model.kernels=[all,compile_layers]`). The SFT recipe refuses it with sharded parameters (FSDP,
ZeRO-3), where it has not been tested.
"""

from __future__ import annotations

import functools
import types

import torch

from vltrain.families import family_spec, get_module


# inductor keeps eager's round-to-bf16 between fused ops (the module docstring says why)
EAGER_NUMERICS = {"emulate_precision_casts": True}


def _stock_forward(layer):
    """The layer class's forward without transformers' checkpointing wrapper."""
    forward = type(layer).forward
    return getattr(forward, "__wrapped__", forward)


def _compiled_layer_forward(self, *args, **kwargs):
    if not (self.training and torch.is_grad_enabled()):
        return _stock_forward(self)(self, *args, **kwargs)
    if self.gradient_checkpointing:
        return self._gradient_checkpointing_func(functools.partial(self._vltrain_compiled, **kwargs), *args)
    return self._vltrain_compiled(*args, **kwargs)


def patch_compile_layers(model) -> str:
    """"compile_layers": every LLM decoder layer (the path in the family table)."""
    base = get_module(model, "")
    return _compile_each(base, family_spec(base).llm_layers, "layers")


def patch_compile_vision(model) -> str:
    """"compile_vision": every vision tower block, the same way. The varlen attention in them runs eager
    (vltrain.kernels.vision_varlen: `torch.compiler.disable`); the patch embedding, rotary tables, window
    permutation and merger stay outside (they run once per tower call, not per block)."""
    base = get_module(model, "")
    return _compile_each(base, family_spec(base).vision_blocks, "blocks")


def _compile_each(base, path: str, what: str) -> str:
    layers = base.get_submodule(path)
    for layer in layers:
        if getattr(layer.__dict__.get("forward"), "__func__", None) is _compiled_layer_forward:
            continue
        stock = types.MethodType(_stock_forward(layer), layer)
        layer._vltrain_compiled = torch.compile(stock, dynamic=True, options=EAGER_NUMERICS)
        layer.forward = types.MethodType(_compiled_layer_forward, layer)  # deepcopy rebinds it
    kernel = "compile_layers" if what == "layers" else "compile_vision"
    return f"{kernel}: {path}.*.forward ({len(layers)} {what}) torch.compile'd, dynamic shapes, eager's bf16 rounding"
