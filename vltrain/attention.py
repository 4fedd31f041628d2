"""Attention over packed rows: several examples in one row, none attending to another.

`enable_packed_attention(model) -> list[str]` prepares ONE model instance for rows built by
`vltrain.data.packing` (position_ids (4, B, L) whose row 0 restarts at 0 at every example, no
attention_mask):
- the language model's attention implementation becomes "vltrain_varlen" (registered below in
  transformers' AttentionInterface; the vision tower keeps its own). Per call it finds the examples
  from the text position ids (a new example starts wherever row 0 is 0) and runs causal attention
  within each one:
    CUDA + fp16/bf16: flash-attn's `flash_attn_varlen_func` when installed, else torch's
    `torch.nn.attention.varlen.varlen_attn`; otherwise (CPU, fp32) one sdpa call with a
    block-diagonal causal mask -- exact, O(L^2) memory, for tests and CPU.
  Rows without packing (a single example per row) give the same result as the stock attention.
- Qwen3.5's gated-delta-net layers (linear attention: a causal conv1d and a recurrent state that
  would both carry over from one example to the next) restart at every example; their forward is
  patched on the instance:
    CUDA + flash-linear-attention installed: the whole row in one call of fla's varlen kernels
    (`causal_conv1d` and `chunk_gated_delta_rule` with `cu_seqlens`), the rest of the layer as stock.
    (transformers' own forward passes `cu_seqlens` to the delta rule but not to the conv, which would
    leak three tokens across examples.)
    otherwise: the row is cut at example boundaries, the pieces right-padded into batches (padding at
    most doubles a batch) and run through the stock forward once per batch. Exact: the layer is causal,
    so padding after an example cannot reach it.
- the model's `use_cache` is turned off: a packed row is for training and must not fill a cache.

Padding with an attention_mask is not supported in packed mode (the collator never pads: one row per
micro-batch); a mask that masks something raises.

Generation on a packed model: `stock_attention(model)` is a context manager under which this instance's
language model runs exactly as before packing -- its text attention back to the implementation it had
when `enable_packed_attention` was called (recorded then), its gated-delta-net layers on their stock
forward, `use_cache` on -- and everything is restored on exit, so the model trains packed afterwards.
`vltrain.generation.generate` enters it for the call. The packed attention itself keeps refusing a KV
cache and padding: inside a training forward those mean a mistake, and silently deferring to another
kernel there would hide it. A bare `model.generate` on a packed model still raises; wrap it in
`stock_attention(model)`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types

import torch
import torch.nn.functional as F

ATTN_NAME = "vltrain_varlen"


# ------------------------------------------------------------------------------- segment bookkeeping
def max_segment(cu_seqlens: torch.Tensor) -> int:
    """The longest segment of `cu_seqlens` (a device -> host sync when it lives on the GPU)."""
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def _cu_seqlens(text_positions: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens over the flattened (B * L) tokens and the longest example, from (B, L) positions."""
    cu = _segment_bounds(text_positions)
    return cu, max_segment(cu)


def _segment_bounds(text_positions: torch.Tensor) -> torch.Tensor:
    """int32 cu_seqlens over the flattened (B * L) tokens of (B, L) positions (an example starts at 0)."""
    batch, length = text_positions.shape
    flat = text_positions.reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    row_starts = torch.arange(batch, device=flat.device) * length
    starts = torch.unique(torch.cat([starts, row_starts]))  # every row starts an example
    return torch.cat([starts, torch.tensor([batch * length], device=flat.device)]).to(torch.int32)


class TensorKeyedCache:
    """`fn(tensor)` for the last `size` tensors, by identity: every layer of a forward (and its recompute)
    receives the same position / cu_seqlens tensor object, so the device -> host work in `fn` runs once.

    Holding a reference keeps each key tensor alive, so its memory cannot be reused while it is a key.
    """

    def __init__(self, fn, size: int = 1):
        self.fn, self.size, self.entries = fn, size, []

    def get(self, tensor: torch.Tensor):
        for key, value in self.entries:
            if key is tensor:
                return value
        value = self.fn(tensor)
        self.entries = (self.entries + [(tensor, value)])[-self.size:]
        return value


_CACHE = TensorKeyedCache(_cu_seqlens)


# ------------------------------------------------------------------------------- the attention op
@functools.cache  # looked up once: a failed import searches sys.path again on every try (~50 us, every layer)
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


class _AtenFlashVarlen(torch.autograd.Function):
    """torch's own flash-attention varlen kernels, `aten._flash_attention_forward` / `_backward`, called from a
    plain autograd Function: the kernels `torch.nn.attention.varlen.varlen_attn` runs, without its
    `torch.library` custom-op dispatch, which cost about 1 ms of host time per call on an H200 machine
    (Qwen2-VL-2B profile, benchmarks/RESULTS.md round 6) while the step waited on the host."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen: int, causal: bool, scale):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, causal, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed, offset)
        ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_seqlen, ctx.max_seqlen, 0.0, ctx.causal, seed,
            offset, scale=ctx.scale)
        return dq, dk, dv, None, None, None, None


@functools.cache
def _aten_flash_usable(device_index: int) -> bool:
    """torch's flash kernels exist and run on this GPU (Ampere or newer) and flash sdpa is not switched off."""
    return (hasattr(torch.ops.aten, "_flash_attention_forward") and torch.backends.cuda.flash_sdp_enabled()
            and torch.cuda.get_device_capability(device_index) >= (8, 0))


def flash_varlen(q, k, v, cu_seqlens, max_seqlen: int, *, causal: bool, scale: float | None = None):
    """Attention within each segment of `cu_seqlens` on CUDA, fp16/bf16: q (N, Hq, D), k/v (N, Hkv, D) with Hq a
    multiple of Hkv; cu_seqlens (S + 1,) int32 on the device; `max_seqlen` a host int -> (N, Hq, D).

    flash-attn's `flash_attn_varlen_func` when installed, else torch's flash kernels directly
    (`_AtenFlashVarlen`), else `torch.nn.attention.varlen.varlen_attn`; None when none of them is there."""
    if (flash := _flash_varlen()) is not None:
        return flash(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal)
    if _aten_flash_usable(q.device.index if q.device.index is not None else torch.cuda.current_device()):
        return _AtenFlashVarlen.apply(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    if (varlen := _torch_varlen()) is not None:
        return _torch_varlen_call(varlen, q, k, v, cu_seqlens, max_seqlen, causal, scale)
    return None


def _torch_varlen_call(varlen, q, k, v, cu_seqlens, max_seqlen, causal, scale):
    params = _parameters(varlen)
    kwargs = {"scale": scale}
    if causal:
        kwargs.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


@functools.cache
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def causal_varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, scale: float | None = None):
    """Causal attention within each segment of `cu_seqlens`.

    q (N, Hq, D), k/v (N, Hkv, D) with Hq a multiple of Hkv; cu_seqlens (S + 1,) int32 -> (N, Hq, D).
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if (out := flash_varlen(q, k, v, cu_seqlens, max_seqlen, causal=True, scale=scale)) is not None:
            return out
    return masked_causal_varlen_attention(q, k, v, cu_seqlens, scale)


def masked_causal_varlen_attention(q, k, v, cu_seqlens, scale: float | None = None):
    """The portable fallback: one sdpa call with a block-diagonal causal mask (same shapes as above)."""
    n = q.shape[0]
    positions = torch.arange(n, device=q.device)
    segment = torch.searchsorted(cu_seqlens[1:].to(q.device).long(), positions, right=True)
    mask = (segment[:, None] == segment[None, :]) & (positions[:, None] >= positions[None, :])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)


@torch.compiler.disable  # eager inside a compiled layer (kernels "compile_layers"): boundaries are data
def packed_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             position_ids=None, **kwargs):
    """AttentionInterface entry: query (B, Hq, L, D), key/value (B, Hkv, L, D) -> ((B, L, Hq, D), None)."""
    batch, _, length, _ = query.shape
    if query.shape[2] != key.shape[2]:
        raise ValueError("packed attention is for training (no KV cache): query and key lengths differ")
    if position_ids is None:
        position_ids = torch.arange(length, device=query.device).expand(batch, -1)
    cu, max_len = _CACHE.get(position_ids)
    if dropout and module.training:
        raise ValueError("packed attention does not implement attention dropout")
    flat = lambda t: t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[3])  # noqa: E731
    out = causal_varlen_attention(flat(query), flat(key), flat(value), cu, max_len, scale=scaling)
    return out.reshape(batch, length, query.shape[1], query.shape[3]), None


def _no_mask(*args, attention_mask=None, **kwargs):
    """No mask tensor: segments come from the position ids, and a packed row holds no padding."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("packed attention got an attention_mask that masks tokens: packed rows must not be padded "
                         "(use vltrain.data.packing.PackCollator, or a model without enable_packed_attention)")
    return None


def register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTN_NAME, packed_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, _no_mask)


# ------------------------------------------------------------------------------- linear attention
def _padded_groups(lengths: list[int], max_waste: float = 2.0) -> list[list[int]]:
    """Indices of pieces grouped (longest first) so that each group, right-padded to its longest piece,
    holds at most `max_waste` x its real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * lengths[group[0]] <= max_waste * (sum(lengths[j] for j in group) + lengths[i]):
            group.append(i)
        else:
            groups.append([i])
    return groups


@functools.cache  # asked once per layer per forward: a missing package must not be searched for each time
def _fla_ops():
    """flash-linear-attention's varlen (causal_conv1d, chunk_gated_delta_rule), or None if not installed."""
    try:
        from fla.modules.causal_conv1d import causal_conv1d
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    return causal_conv1d, chunk_gated_delta_rule


def _linear_segments(text_positions: torch.Tensor):
    """(cu_seqlens int64 on the device, the same on the CPU, example starts per row) of (B, L) positions."""
    cu = _segment_bounds(text_positions)
    cu_cpu = cu.cpu().long()
    length = text_positions.shape[1]
    starts = [[int(c) - row * length for c in cu_cpu if row * length <= c < (row + 1) * length]
              for row in range(text_positions.shape[0])]
    return cu.long(), cu_cpu, starts


_LINEAR_CACHE = TensorKeyedCache(_linear_segments)


def varlen_gated_delta_forward(self, hidden_states, cu_seqlens, cu_seqlens_cpu, conv_fn, delta_fn):
    """Qwen3.5 GatedDeltaNet forward over (B, L) rows holding the examples of `cu_seqlens` (over the
    flattened B * L tokens), each from a zero conv and recurrent state. `conv_fn` / `delta_fn` take fla's
    `causal_conv1d` / `chunk_gated_delta_rule` arguments; the rest follows the stock forward
    (transformers 5.24, `Qwen3_5GatedDeltaNet.forward` without a cache)."""
    batch, length, _ = hidden_states.shape
    x = hidden_states.reshape(1, batch * length, -1)
    tokens = x.shape[1]
    segments = dict(cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
    mixed, _ = conv_fn(self.in_proj_qkv(x), weight=self.conv1d.weight.squeeze(1), bias=self.conv1d.bias,
                       activation=self.activation, **segments)
    query, key, value = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    beta = self.in_proj_b(x).sigmoid()
    g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)
    out, _ = delta_fn(query.reshape(1, tokens, -1, self.head_k_dim), key.reshape(1, tokens, -1, self.head_k_dim),
                      value.reshape(1, tokens, -1, self.head_v_dim), g=g, beta=beta,
                      use_qk_l2norm_in_kernel=True, **segments)
    out = self.norm(out.reshape(-1, self.head_v_dim), self.in_proj_z(x).reshape(-1, self.head_v_dim))
    return self.out_proj(out.reshape(batch, length, -1))


@torch.compiler.disable
def _segmented_linear_attn_forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    stock_forward = functools.partial(type(self).forward, self)
    positions = getattr(self, "_vltrain_text_positions", None)
    if positions is None:
        return stock_forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    cu, cu_cpu, starts = _LINEAR_CACHE.get(positions)
    if all(len(row_starts) <= 1 for row_starts in starts):
        return stock_forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    # Several examples in a row: each must start from a zero conv/recurrent state. A cache is never
    # used: its state after a packed row would mean nothing.
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("packed rows cannot continue from a KV cache")
    ops = _fla_ops() if hidden_states.is_cuda else None
    if ops is not None:
        return varlen_gated_delta_forward(self, hidden_states, cu, cu_cpu, *ops)
    # Without fla: the examples are cut out, right-padded into batches (the layer is causal along the
    # sequence, so padding after an example cannot change its outputs) and run through the stock
    # forward together -- one call per batch, not per example.
    pieces = []
    for row, row_starts in enumerate(starts):
        bounds = sorted({0, *row_starts}) + [hidden_states.shape[1]]
        pieces += [hidden_states[row, a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    outputs: list[torch.Tensor | None] = [None] * len(pieces)
    for group in _padded_groups([len(p) for p in pieces]):
        batch = torch.nn.utils.rnn.pad_sequence([pieces[i] for i in group], batch_first=True)
        out = stock_forward(batch, cache=None, attention_mask=None, **kwargs)
        for k, i in enumerate(group):
            outputs[i] = out[k, : len(pieces[i])]
    return torch.cat(outputs, dim=0).reshape(hidden_states.shape[0], hidden_states.shape[1], -1)


def _set_segments(language_model, args, kwargs):
    """Forward pre-hook on the language model: hand each linear-attention layer the text positions
    (row 0 of the (4, B, L) mRoPE ids), from which it finds where examples start."""
    positions = kwargs.get("position_ids")
    text = positions[0] if positions is not None and positions.ndim == 3 and positions.shape[0] == 4 else None
    if getattr(language_model, "_vltrain_stock_attention", False):
        text = None  # inside stock_attention(): every layer runs its stock forward
    for layer in language_model.layers:
        if hasattr(layer, "linear_attn"):
            layer.linear_attn._vltrain_text_positions = text


def _patch_linear_attention(language_model) -> int:
    patched = 0
    for layer in language_model.layers:
        module = getattr(layer, "linear_attn", None)
        if module is None or getattr(module.__dict__.get("forward"), "__func__", None) is _segmented_linear_attn_forward:
            continue
        module.forward = types.MethodType(_segmented_linear_attn_forward, module)  # deepcopy rebinds it
        patched += 1
    if patched and not getattr(language_model, "_vltrain_segment_hook", False):
        language_model.register_forward_pre_hook(_set_segments, with_kwargs=True)
        language_model._vltrain_segment_hook = True
    return patched


# ------------------------------------------------------------------------------- entry
def enable_packed_attention(model) -> list[str]:
    """Make this instance's language model attend within packed examples only; returns what changed."""
    from vltrain.families import family_spec, get_module

    spec = family_spec(model)
    register_packed_attention()
    base = get_module(model, "")
    done = []
    if base.config.text_config._attn_implementation != ATTN_NAME:
        base._vltrain_stock_text_attn = base.config.text_config._attn_implementation  # for stock_attention()
        vision_impl = base.config.vision_config._attn_implementation
        base.set_attn_implementation({"text_config": ATTN_NAME, "vision_config": vision_impl})
        if base.config.text_config._attn_implementation != ATTN_NAME:
            raise ValueError(f"could not set the text attention of {type(base).__name__} to {ATTN_NAME}")
        done.append(f"packed attention: {spec.llm_module} -> {ATTN_NAME}")
    if spec.linear_attention:
        n = _patch_linear_attention(get_module(model, spec.llm_module))
        if n:
            how = "varlen (flash-linear-attention) on CUDA" if _fla_ops() else "per example (padded batches)"
            done.append(f"packed attention: {n} gated-delta-net layers restart at every example: {how}")
    if getattr(base.config.text_config, "use_cache", False):
        base.config.text_config.use_cache = False
        done.append("use_cache off (packed rows are for training)")
    return done


@contextlib.contextmanager
def stock_attention(model):
    """While active, this packed instance's language model runs as it did before `enable_packed_attention`
    (its recorded text attention, stock gated-delta-net layers, `use_cache` on): for generation with a KV
    cache and left padding. Restores the packed setup on exit. Does nothing on an unpacked model."""
    from vltrain.families import family_spec, get_module

    base = get_module(model, "")
    text_config = base.config.text_config
    if text_config._attn_implementation != ATTN_NAME:
        yield
        return
    # "sdpa" when the packed attention was asked for at load time (nothing recorded to go back to)
    stock = getattr(base, "_vltrain_stock_text_attn", "sdpa")
    language_model = get_module(model, family_spec(model).llm_module)
    vision_impl = base.config.vision_config._attn_implementation
    use_cache = text_config.use_cache
    base.set_attn_implementation({"text_config": stock, "vision_config": vision_impl})
    text_config.use_cache = True
    language_model._vltrain_stock_attention = True
    try:
        yield
    finally:
        language_model._vltrain_stock_attention = False
        text_config.use_cache = use_cache
        base.set_attn_implementation({"text_config": ATTN_NAME, "vision_config": vision_impl})
