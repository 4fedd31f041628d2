"""Speed kernels patched onto ONE model instance: `apply_kernels(model, names) -> list[str]`.

Kernels (module docstrings say exactly what each replaces):
- "fused_linear_ce"       (every family)   fused_ce.py: loss from hidden states, logits never built.
- "vision_varlen"         (every family)   vision_varlen.py: the vision attention as one varlen call over
                                            all images / frames / windows (no per-segment Python loop).
- "vision_window_varlen"  (qwen2_5_vl)     the old name of "vision_varlen" (configs written before it covered
                                            every family): the same patch, accepted on Qwen2.5-VL only.
- "vision_positions"      (every family)   vision_positions.py: the vision tower's position ids, windows and
                                            cu_seqlens built on the host from one read of grid_thw (with
                                            vision_varlen: one device -> host sync per vision forward instead
                                            of 9-17; Qwen3-VL-4B full SFT 8.9% faster on an H200).
- "visual_merge"          (every family)   visual_merge.py: the vision features put into the text embeddings
                                            (and Qwen3-VL's DeepStack adds) by integer index: no device -> host
                                            sync in the merge, forward or backward.
- "patch_embed_linear"    (every family)   patch_embed.py: the Conv3d patch embedding as a Linear.
- "rms_norm"              (every family)   rms_norm.py: every verified RMSNorm as liger's fused kernel.
- "swiglu"                (where a SiLU gate/up/down MLP exists) swiglu.py: silu(gate) * up fused.
- "float8", "float8_rowwise" (every family, opt-in) float8.py: the LLM decoder layers' linears as torchao
                                            Float8Linear (tensorwise / rowwise scales); needs torchao.
- "compile_layers"        (every family, opt-in) compile_layers.py: each LLM decoder layer torch.compile'd.
- "compile_vision"        (every family, opt-in) compile_layers.py: each vision tower block torch.compile'd.
- "all": every kernel that applies to the model's family, except the opt-in ones (and old names).

Kernels are applied in the order of KERNELS, whatever the order asked for (float8 swaps the linears before
compile_layers wraps the layers that call them).

Nothing is assigned on a class: forwards are bound methods set on the instance (a deepcopy rebinds them
to the copy) and submodules are swapped on the instance. Applying twice patches nothing new. Apply
before `accelerator.prepare` / FSDP / DeepSpeed wrapping, so their hooks see the final modules.
"""

from __future__ import annotations

from vltrain.families import family_spec, get_module
from vltrain.kernels.compile_layers import patch_compile_layers, patch_compile_vision
from vltrain.kernels.float8 import FLOAT8_RECIPES, patch_float8
from vltrain.kernels.fused_ce import patch_fused_linear_ce
from vltrain.kernels.patch_embed import patch_patch_embed_linear
from vltrain.kernels.rms_norm import patch_rms_norm
from vltrain.kernels.swiglu import SWIGLU_MLPS, patch_swiglu, swiglu_mlps
from vltrain.kernels.vision_positions import VISION_TOWERS, patch_vision_positions
from vltrain.kernels.vision_varlen import VISION_ATTENTION, patch_vision_varlen
from vltrain.kernels.visual_merge import MERGED_MODELS, patch_visual_merge

KERNELS = ("fused_linear_ce", "vision_varlen", "vision_window_varlen", "vision_positions", "visual_merge",
           "patch_embed_linear", "rms_norm", "swiglu",
           "float8", "float8_rowwise", "compile_layers", "compile_vision")
# not part of "all": compile_layers / compile_vision cost a compile at the start of every run; float8 changes the numerics
# (and was slower than bf16 on Qwen2.5-VL-3B, benchmarks/RESULTS.md)
OPT_IN = ("float8", "float8_rowwise", "compile_layers", "compile_vision")
OLD_NAMES = {"vision_window_varlen": "vision_varlen"}  # accepted where the old kernel applied; not in "all"
# Families whose default architecture has no SwiGLU MLP (Qwen3-VL-MoE: every LLM layer is MoE, GELU
# vision MLP). For a model instance the check is on its modules instead.
_NO_SWIGLU_BY_DEFAULT = ("qwen3_vl_moe",)

__all__ = ["KERNELS", "apply_kernels", "applicable_kernels"]


def applicable_kernels(model) -> list[str]:
    """The kernels that apply to this model (or, given a `model_type` string, its family's default
    architecture), in application order."""
    spec = family_spec(model)
    if isinstance(model, str):
        has_swiglu = bool(SWIGLU_MLPS.get(spec.model_type)) and spec.model_type not in _NO_SWIGLU_BY_DEFAULT
    else:
        has_swiglu = bool(swiglu_mlps(_base_model(model), spec.model_type))
    skip = {"vision_varlen": spec.model_type not in VISION_ATTENTION,
            "vision_positions": spec.model_type not in VISION_TOWERS,
            "visual_merge": spec.model_type not in MERGED_MODELS,
            "vision_window_varlen": not spec.window_attention, "swiglu": not has_swiglu}
    return [name for name in KERNELS if not skip.get(name, False)]


def _base_model(model):
    """The ForConditionalGeneration under a peft wrapper (or the model itself)."""
    return get_module(model, "")


def apply_kernels(model, kernels: list[str] | tuple[str, ...], *, strict: bool = True) -> list[str]:
    """Patch `kernels` onto this instance; return (and store as `model._vltrain_kernels`) what is patched.

    Raises ValueError for an unknown name, and -- with `strict` -- for a kernel that cannot apply to this
    family; with `strict=False` such a kernel is skipped. The returned list covers every patch applied
    to this instance so far, so a second identical call returns the same list.
    """
    if isinstance(kernels, str):
        kernels = [kernels]
    spec = family_spec(model)
    applicable = applicable_kernels(model)
    requested: list[str] = []
    for name in kernels:
        if name == "all":
            requested.extend(k for k in applicable if k not in OPT_IN and k not in OLD_NAMES)
        elif name not in KERNELS:
            raise ValueError(f"unknown kernel {name!r}; known: {list(KERNELS)} or 'all'")
        elif name not in applicable:
            if strict:
                raise ValueError(f"kernel {name!r} does not apply to model_type {spec.model_type!r}; "
                                 f"applicable: {applicable}")
        else:
            requested.append(OLD_NAMES.get(name, name))

    base = _base_model(model)
    patched: list[str] = list(getattr(model, "_vltrain_kernels", []))
    for name in sorted(dict.fromkeys(requested), key=KERNELS.index):  # de-duplicated, in table order
        if name == "fused_linear_ce":
            new = patch_fused_linear_ce(base)
        elif name == "vision_varlen":
            new = patch_vision_varlen(get_module(model, spec.vision_blocks), spec.vision_blocks, spec.model_type)
        elif name == "vision_positions":
            new = patch_vision_positions(model, spec.model_type)
        elif name == "visual_merge":
            new = patch_visual_merge(model, spec.model_type)
        elif name == "rms_norm":
            new = patch_rms_norm(base, spec.model_type)
        elif name == "swiglu":
            new = patch_swiglu(base, spec.model_type)
        elif name in FLOAT8_RECIPES:
            new = patch_float8(base, name)
        elif name == "compile_layers":
            new = [patch_compile_layers(base)]
        elif name == "compile_vision":
            new = [patch_compile_vision(base)]
        else:
            path = f"{spec.vision_module}.patch_embed"
            new = patch_patch_embed_linear(get_module(model, path), path)
        patched.extend(entry for entry in new if entry not in patched)
    model._vltrain_kernels = patched
    if base is not model:
        base._vltrain_kernels = patched
    return list(patched)
