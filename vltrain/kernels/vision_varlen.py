"""Qwen2.5-VL vision attention as one variable-length attention call over all windows.

Patches, on one model instance, `forward` of every vision block's `attn`
(`Qwen2_5_VLVisionAttention`). Under sdpa/eager the stock forward splits q/k/v at `cu_seqlens` and
calls attention once per window (or per image in the full-attention blocks) in a Python loop. The
patched forward makes one call for the whole packed sequence, whichever `cu_seqlens` the block gets:
- CUDA, fp16/bf16: `torch.nn.attention.varlen.varlen_attn` (torch >= 2.11), else flash-attn's
  `flash_attn_varlen_func` when installed;
- otherwise (CPU, fp32): one sdpa call with a block-diagonal boolean mask built from `cu_seqlens`.
  Exact, but the mask is (N, N): fine for tests and CPU, not the fast path.
The qkv projection, rotary embedding and output projection are the stock ones. Under sdpa transformers
passes no `max_seqlen`; the longest segment is then read from the device once per `cu_seqlens` tensor
(the same two tensors, windows and full, reach every block of a forward and its recompute) instead of
once per block.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from vltrain.attention import TensorKeyedCache, max_segment


def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


_MAX_SEQLEN = TensorKeyedCache(max_segment, size=4)  # windows and full, of the forward and its recompute


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int | None = None, scale: float | None = None):
    """Non-causal attention within each segment of `cu_seqlens`.

    q, k, v (N, heads, head_dim); cu_seqlens (S + 1,) cumulative segment lengths -> (N, heads, head_dim).
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if max_seqlen is None:
            max_seqlen = _MAX_SEQLEN.get(cu_seqlens)
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        max_seqlen = int(max_seqlen)
        if (varlen_attn := _torch_varlen_attn()) is not None:
            return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale)
        if (flash_varlen := _flash_attn_varlen()) is not None:
            return flash_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=False)
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
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    seq_length = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    attn_output = varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=self.scaling)
    return self.proj(attn_output.reshape(seq_length, -1))


def patch_vision_window_varlen(vision_blocks, path: str) -> list[str]:
    """Patch `attn.forward` of each block in `vision_blocks` (found at `path`); [] if already patched."""
    patched = 0
    for block in vision_blocks:
        attn = block.attn
        if getattr(attn.__dict__.get("forward"), "__func__", None) is _varlen_vision_attention_forward:
            continue
        attn.forward = types.MethodType(_varlen_vision_attention_forward, attn)
        patched += 1
    if not patched:
        return []
    return [f"vision_window_varlen: {path}.*.attn.forward ({patched} blocks)"]
