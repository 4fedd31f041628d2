"""Vision attention of every Qwen-VL family as one variable-length attention call over the packed sequence.

Patches, on one model instance, `forward` of every vision block's `attn` (the family's class in
`VISION_ATTENTION`). Under sdpa/eager the stock forward splits q/k/v at `cu_seqlens` and calls attention
once per segment in a Python loop -- per image and per video frame (every family), per window (Qwen2.5-VL's
windowed blocks) -- after reading the segment lengths to the host (`lengths.tolist()`, a device -> host
sync in every block). The patched forward makes one call for the whole packed sequence, whichever
`cu_seqlens` the block gets:
- CUDA, fp16/bf16: `vltrain.attention.flash_varlen` (flash-attn's `flash_attn_varlen_func` when installed,
  else torch's own flash varlen kernels, else `torch.nn.attention.varlen.varlen_attn`);
- otherwise (CPU, fp32): one sdpa call with a block-diagonal boolean mask built from `cu_seqlens`.
  Exact, but the mask is (N, N): fine for tests and CPU, not the fast path.
The qkv projection, the family's own `apply_rotary_pos_emb_vision` and the output projection are the stock
ones. `max_seqlen` is the one transformers passes (it does under flash attention); under sdpa it passes
None and the longest segment is read from the device once per `cu_seqlens` tensor (the same tensors --
images/frames, and Qwen2.5-VL's windows -- reach every block of a forward and its recompute) instead of
once per block.

What differs per family is only which class and which rotary function (`VISION_ATTENTION`); in
transformers 5.24 all six forwards share one layout: fused qkv (N, 3 * heads * head_dim) split as
(N, 3, heads, head_dim), rotary on q and k with (N, head_dim) cos/sin, `self.scaling` = head_dim**-0.5,
no dropout. Before the first patch of a class its stock forward is run against the patched one on a small
probe of that class (own weights, 3 segments, fp32 CPU); a class whose forward no longer computes the same
thing is refused with a ValueError naming the model_type, as is a block whose `attn` is another class.
"""

from __future__ import annotations

import copy
import importlib
import types

import torch
import torch.nn.functional as F

from vltrain.attention import TensorKeyedCache, flash_varlen, max_segment

# model_type -> the vision attention class in transformers.models.<model_type>.modeling_<model_type>; the
# rotary function is that module's `apply_rotary_pos_emb_vision`.
VISION_ATTENTION = {
    "qwen2_vl": "VisionAttention",
    "qwen2_5_vl": "Qwen2_5_VLVisionAttention",
    "qwen3_vl": "Qwen3VLVisionAttention",
    "qwen3_vl_moe": "Qwen3VLMoeVisionAttention",
    "qwen3_5": "Qwen3_5VisionAttention",
    "qwen3_5_moe": "Qwen3_5MoeVisionAttention",
}

_MAX_SEQLEN = TensorKeyedCache(max_segment, size=4)  # images/frames and windows, of the forward and its recompute


@torch.compiler.disable  # eager inside a compiled block (kernels "compile_vision"): the flash call and its lengths
def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int | None = None, scale: float | None = None):
    """Non-causal attention within each segment of `cu_seqlens`.

    q, k, v (N, heads, head_dim); cu_seqlens (S + 1,) cumulative segment lengths -> (N, heads, head_dim).
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if max_seqlen is None:
            max_seqlen = _MAX_SEQLEN.get(cu_seqlens)
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        max_seqlen = int(max_seqlen)
        if (out := flash_varlen(q, k, v, cu, max_seqlen, causal=False, scale=scale)) is not None:
            return out
    return masked_varlen_attention(q, k, v, cu_seqlens, scale)


def masked_varlen_attention(q, k, v, cu_seqlens, scale: float | None = None):
    """The portable fallback: one sdpa call with a block-diagonal mask (same shapes as above)."""
    positions = torch.arange(q.shape[0], device=q.device)
    segment = torch.searchsorted(cu_seqlens[1:].to(q.device), positions, right=True)
    mask = segment[:, None] == segment[None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, scale=scale,
    )
    return out.squeeze(0).transpose(0, 1)


def _varlen_vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None,
                                     **kwargs):
    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = self._vltrain_vision_rotary(q, k, cos, sin)
    attn_output = varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=self.scaling)
    return self.proj(attn_output.reshape(seq_length, -1))


def _attention_class_and_rotary(model_type: str):
    if model_type not in VISION_ATTENTION:
        raise ValueError(f"vision_varlen: no vision attention is known for model_type {model_type!r}; "
                         f"known: {sorted(VISION_ATTENTION)}")
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, VISION_ATTENTION[model_type]), module.apply_rotary_pos_emb_vision


_VERIFIED: set[type] = set()  # attention classes whose stock forward matched the patched one


def verify_vision_attention_math(model_type: str, attn) -> None:
    """Raise ValueError unless the stock forward of `type(attn)` equals the patched forward on a probe.

    The probe is a fresh instance of the class (2 heads of 8, from a copy of `attn.config` under sdpa, so
    the stock path is the per-segment loop), run on 3 segments with random rotary angles, fp32 on CPU. It
    draws from its own generator: the global RNG (seeded by `train.seed`) is left as it was."""
    cls, rotary = _attention_class_and_rotary(model_type)
    if cls in _VERIFIED:
        return
    config = copy.deepcopy(attn.config)
    config._attn_implementation = "sdpa"
    config.embed_dim = config.hidden_size = 16  # the attention width is embed_dim (Qwen2-VL) or hidden_size
    config.num_heads = 2
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        probe = cls(config=config).float()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        probe._vltrain_vision_rotary = rotary
        hidden = torch.randn(12, 16, generator=gen)
        angles = torch.randn(12, 4, generator=gen) * 3
        position_embeddings = (torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin())
        cu_seqlens = torch.tensor([0, 3, 8, 12], dtype=torch.int32)
        try:
            want = cls.forward(probe, hidden, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings)
        except Exception as err:  # a changed signature or layout: refuse, do not guess
            raise ValueError(f"vision_varlen: {cls.__qualname__}.forward (model_type {model_type!r}) no longer "
                             f"runs as this kernel assumes ({type(err).__name__}: {err}); not patching") from err
        got = _varlen_vision_attention_forward(probe, hidden, cu_seqlens, position_embeddings)
    if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
        raise ValueError(f"vision_varlen: {cls.__qualname__}.forward (model_type {model_type!r}) no longer "
                         "computes the fused-qkv, rotary, per-segment attention this kernel replaces; not patching")
    _VERIFIED.add(cls)


def _is_patched(attn) -> bool:
    return getattr(attn.__dict__.get("forward"), "__func__", None) is _varlen_vision_attention_forward


def patch_vision_varlen(vision_blocks, path: str, model_type: str) -> list[str]:
    """Patch `attn.forward` of each block in `vision_blocks` (found at `path`); [] if all are patched already.

    Raises ValueError (naming `model_type`) when a block's attention is not the family's class, uses
    attention dropout, or the class's forward no longer matches what the patch computes; nothing is
    patched then."""
    cls, rotary = _attention_class_and_rotary(model_type)
    todo = []
    for i, block in enumerate(vision_blocks):
        attn = block.attn
        if type(attn) is not cls:
            raise ValueError(f"vision_varlen: {path}.{i}.attn is a {type(attn).__qualname__}, not the "
                             f"{cls.__qualname__} of model_type {model_type!r}; cannot patch it")
        if getattr(attn, "attention_dropout", 0.0):
            raise ValueError(f"vision_varlen: {path}.{i}.attn has attention_dropout={attn.attention_dropout} "
                             f"(model_type {model_type!r}); the varlen call has no dropout")
        if not _is_patched(attn):
            todo.append(attn)
    if not todo:
        return []
    verify_vision_attention_math(model_type, todo[0])
    for attn in todo:
        attn._vltrain_vision_rotary = rotary
        attn.forward = types.MethodType(_varlen_vision_attention_forward, attn)
    return [f"vision_varlen: {path}.*.attn.forward ({len(todo)} blocks, {cls.__qualname__})"]
