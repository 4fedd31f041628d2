"""The vision tower's index and position tensors built on the host, from ONE read of `grid_thw`.

Patches, on one model instance, `forward` of the vision tower (the family's class in `VISION_TOWERS`).
The stock forward (transformers 5.24) derives from `grid_thw`, on the device, with ops that read it to the
host one value at a time -- iterating `grid_thw.tolist()` per image, `repeat_interleave` with tensor
repeats, `.item()` for the longest segment, Qwen2.5-VL's window loop and `unique_consecutive` -- about
30 device -> host syncs per Qwen2.5-VL-3B step, each one stalling the host from queueing the next kernels:
- `position_ids` (N, 2): the (h, w) rotary position of every patch, in spatial-merge-block order;
- `cu_seqlens` (S + 1,) int32: one segment per image and per video frame, and its longest segment;
- Qwen2.5-VL: `window_index` (N / 4,) and `cu_window_seqlens` (its windowed blocks' segments) and the
  longest window;
- Qwen3-VL / Qwen3.5: `interp_indices`, `interp_weights` (N, 4): the bilinear resampling of the learned
  position-embedding grid to each image's grid.
The patched forward reads `grid_thw` once (`grid_thw.tolist()`, cached by tensor identity and in-place
version: a second call with the same, unmodified grid tensor reads nothing), builds all of the above with
numpy on the host -- cached per distinct grid list (the last 64), since the same grids come back step after
step -- copies each tensor to the device once per grid list (the last 16 kept there; from pinned memory,
non-blocking, when the device is CUDA) and calls the tower's own forward with them: transformers 5.24's
vision towers take exactly these precomputed tensors as keyword arguments (`transformers.vision_utils`:
each `get_vision_*` pops its key when given). Everything computed
from them on the device -- the rotary cos/sin from `inv_freq`, the window permutation and its inverse,
the position-embedding gather and weighted sum, the blocks, the merger and DeepStack -- is the stock code.
`max_seqlen` (and Qwen2.5-VL's `max_window_seqlen`) come from the host values, so the blocks receive
them and `vision_varlen`'s attention needs no read of its own; with `vision_varlen` (or flash attention)
the tower forward and its gradient-checkpointing recompute make no device -> host sync beyond the one
grid read. With the stock sdpa / eager attention each block still reads its segment lengths to the host
(`lengths.tolist()` in the attention's per-segment loop): that is what `vision_varlen` removes.

Before the first patch of a class, a small probe of that class (own config, shrunk, fp32 CPU) checks
that every host-built tensor equals what `transformers.vision_utils` computes, and that the class's
forward really consumes them (outputs equal to the stock forward's, blocks receiving the host
`max_seqlen`, no read of `grid_thw` beyond the patched one); a class that no longer does is refused with
a ValueError naming the model_type, as is a tower of another class or an unsupported interpolation mode.

Not covered: the reads outside the tower (the model's `get_image_features` splitting the features per
image, the mRoPE index), and the per-block reads of the stock sdpa attention named above.

`SyncCounter` counts, on any device, the ops that force a device -> host read on CUDA (the tests use it;
on CPU, where nothing syncs, it counts what would -- including a few reads of CPU tensors in stock code).
"""

from __future__ import annotations

import copy
import importlib
import types
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from vltrain.families import family_spec, get_module


@dataclass(frozen=True)
class TowerSpec:
    cls: str  # the vision tower class in transformers.models.<model_type>.modeling_<model_type>
    windows: bool = False  # Qwen2.5-VL: window_index / cu_window_seqlens / max_window_seqlen
    interpolation: bool = False  # Qwen3.x: interp_indices / interp_weights of the learned position grid

    @property
    def precomputed(self) -> tuple[str, ...]:
        """The keyword arguments the patched forward hands the tower's own forward."""
        return (("position_ids", "cu_seqlens", "max_seqlen")
                + (("window_index", "cu_window_seqlens", "max_window_seqlen") if self.windows else ())
                + (("interp_indices", "interp_weights") if self.interpolation else ()))


VISION_TOWERS = {
    "qwen2_vl": TowerSpec("Qwen2VisionTransformerPretrainedModel"),
    "qwen2_5_vl": TowerSpec("Qwen2_5_VisionTransformerPretrainedModel", windows=True),
    "qwen3_vl": TowerSpec("Qwen3VLVisionModel", interpolation=True),
    "qwen3_vl_moe": TowerSpec("Qwen3VLMoeVisionModel", interpolation=True),
    "qwen3_5": TowerSpec("Qwen3_5VisionModel", interpolation=True),
    "qwen3_5_moe": TowerSpec("Qwen3_5MoeVisionModel", interpolation=True),
}


@dataclass(frozen=True)
class TowerLayout:
    """The scalars of one tower instance that its index tensors depend on (a cache key)."""

    merge: int  # spatial_merge_size
    merger_window: int = 0  # Qwen2.5-VL: window_size // merge // patch_size (merged tokens per window side)
    grid_side: int = 0  # Qwen3.x: sqrt(num_position_embeddings)
    align_corners: bool = True


def tower_layout(visual, model_type: str) -> TowerLayout:
    spec = _tower_spec(model_type)
    merge = int(visual.spatial_merge_size)
    if spec.windows:
        return TowerLayout(merge, merger_window=int(visual.window_size) // merge // int(visual.patch_size))
    if spec.interpolation:
        mode = getattr(visual, "interpolation_mode", None)
        if mode != "bilinear":
            raise ValueError(f"vision_positions: the {type(visual).__qualname__} of model_type {model_type!r} "
                             f"resamples its position grid with mode {mode!r}; only 'bilinear' is built here")
        return TowerLayout(merge, grid_side=int(visual.num_grid_per_side),
                           align_corners=bool(visual.interpolation_align_corners))
    return TowerLayout(merge)


# ------------------------------------------------------------------------------- host-side builders (numpy)
Grids = tuple[tuple[int, int, int], ...]


def _merge_order(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every patch of one h x w frame, in spatial-merge-block order."""
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w))
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w))
    block = (h // merge, merge, w // merge, merge)
    return (rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1),
            cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1))


def vision_position_ids(grids: Grids, merge: int) -> np.ndarray:
    """(N, 2) int64 (h, w) rotary positions of every patch (frames of a video repeat them)."""
    parts = [np.tile(np.stack(_merge_order(h, w, merge), -1), (t, 1)) for t, h, w in grids]
    return np.concatenate(parts).astype(np.int64)


def vision_cu_seqlens(grids: Grids) -> np.ndarray:
    """(S + 1,) int32 bounds of one attention segment per image and per video frame."""
    lengths = np.concatenate([np.full(t, h * w, dtype=np.int64) for t, h, w in grids])
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def vision_window_index(grids: Grids, merge: int, merger_window: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL: (N / merge**2,) int64 merged-token order grouped by window, and the (W + 1,) int32
    cumulative window lengths in patches (empty windows dropped)."""
    window_index, cu = [], [0]
    offset = 0
    for t, h, w in grids:
        llm_h, llm_w = h // merge, w // merge
        index = np.arange(t * llm_h * llm_w).reshape(t, llm_h, llm_w)
        pad_h = merger_window - llm_h % merger_window
        pad_w = merger_window - llm_w % merger_window
        num_h, num_w = (llm_h + pad_h) // merger_window, (llm_w + pad_w) // merger_window
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, num_h, merger_window, num_w, merger_window).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t, num_h * num_w, merger_window * merger_window)
        seqlens = (padded != -100).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * merge * merge + cu[-1]).tolist())
        offset += t * llm_h * llm_w
    cu = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], np.diff(cu) != 0])  # torch.unique_consecutive
    return np.concatenate(window_index).astype(np.int64), cu[keep].astype(np.int32)


def _axis_taps(index: np.ndarray, size: int, side: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (n, 2) into a `side`-long table and their float32 weights for positions `index` on an
    axis of `size` (the float32 operations, in order, of transformers' `_interpolation_axis_taps_weights`)."""
    f32 = np.float32
    index = index.astype(f32)
    if align_corners:
        src = index * f32(side - 1) / f32(max(size - 1, 1))
    else:
        src = (index + f32(0.5)) * f32(side) / f32(size) - f32(0.5)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(f32))
    return taps, np.maximum(f32(1) - distance, f32(0))


def vision_interpolation(grids: Grids, merge: int, side: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3.x: (N, 4) int64 indices into the flattened (side x side) position-embedding table and their
    (N, 4) float32 bilinear weights, patches in spatial-merge-block order."""
    indices, weights = [], []
    for t, h, w in grids:
        rows, cols = _merge_order(h, w, merge)
        h_taps, h_weights = _axis_taps(rows, h, side, align_corners)
        w_taps, w_weights = _axis_taps(cols, w, side, align_corners)
        frame_indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        frame_weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
        indices.append(np.tile(frame_indices, (t, 1)))
        weights.append(np.tile(frame_weights, (t, 1)))
    return np.concatenate(indices).astype(np.int64), np.concatenate(weights).astype(np.float32)


def _longest(cu: np.ndarray) -> int:
    return int(np.diff(cu).max())


def build_host_inputs(grids: Grids, layout: TowerLayout) -> dict:
    """The tower's precomputed keyword arguments for `grids`: CPU tensors and Python ints."""
    cu = vision_cu_seqlens(grids)
    inputs = {"position_ids": vision_position_ids(grids, layout.merge), "cu_seqlens": cu, "max_seqlen": _longest(cu)}
    if layout.merger_window:
        window_index, cu_windows = vision_window_index(grids, layout.merge, layout.merger_window)
        inputs.update(window_index=window_index, cu_window_seqlens=cu_windows,
                      max_window_seqlen=_longest(cu_windows))
    if layout.grid_side:
        inputs["interp_indices"], inputs["interp_weights"] = vision_interpolation(
            grids, layout.merge, layout.grid_side, layout.align_corners)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in inputs.items()}


def _to_device(host: dict, device: torch.device) -> dict:
    """One copy per tensor: from pinned memory and non-blocking on CUDA (the host never waits for it)."""
    if device.type == "cpu":
        return dict(host)
    pinned = device.type == "cuda"
    return {k: (v.pin_memory() if pinned else v).to(device, non_blocking=pinned) if torch.is_tensor(v) else v
            for k, v in host.items()}


class _LRU:
    """`build()` for the last `size` keys; `misses` counts the builds."""

    def __init__(self, size: int):
        self.size, self.entries, self.misses = size, OrderedDict(), 0

    def get(self, key, build):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        self.misses += 1
        value = self.entries[key] = build()
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


_HOST = _LRU(size=64)  # (layout, grids) -> CPU tensors and ints
_DEVICE = _LRU(size=16)  # (layout, grids, device) -> the same on the device


def _read_grids(grid_thw: torch.Tensor) -> Grids:
    if grid_thw.ndim != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"vision_positions: grid_thw must have shape (num_media, 3), got {tuple(grid_thw.shape)}")
    return tuple(tuple(int(v) for v in row) for row in grid_thw.tolist())  # the one device -> host read


class _GridReads:
    """The grid list of the last `size` grid tensors, by identity and in-place version: a tower forward
    re-run on the same, unmodified grid tensor (an outer activation checkpoint) reads nothing."""

    def __init__(self, size: int = 4):
        self.size, self.entries = size, []

    def get(self, grid_thw: torch.Tensor) -> Grids:
        for key, version, grids in self.entries:
            if key is grid_thw and version == grid_thw._version:
                return grids
        grids = _read_grids(grid_thw)
        self.entries = [e for e in self.entries if e[0] is not grid_thw][-(self.size - 1):]
        self.entries.append((grid_thw, grid_thw._version, grids))
        return grids

    def remember(self, grid_thw: torch.Tensor, grids: Grids) -> None:
        """Record `grids` as the rows of `grid_thw` (a tensor built from grids already read): nothing is read."""
        self.entries = [e for e in self.entries if e[0] is not grid_thw][-(self.size - 1):]
        self.entries.append((grid_thw, grid_thw._version, grids))


_GRIDS = _GridReads()


def host_grids(grid_thw: torch.Tensor) -> Grids:
    """The rows of `grid_thw` as host ints, read from the device once per tensor (and in-place version): the patched
    tower's read, shared with visual_merge's per-medium split."""
    return _GRIDS.get(grid_thw)


def concat_grids(*grid_thw: torch.Tensor) -> torch.Tensor:
    """`torch.cat(grid_thw)` whose host grid list is known from the parts' (cached) reads: reading it reads nothing."""
    joined = torch.cat(grid_thw)
    _GRIDS.remember(joined, tuple(row for grid in grid_thw for row in host_grids(grid)))
    return joined


def device_inputs(grids: Grids, layout: TowerLayout, device: torch.device) -> dict:
    """The precomputed keyword arguments for `grids` on `device` (built and copied once per grid list)."""
    for t, h, w in grids:
        if min(t, h, w) <= 0 or h % layout.merge or w % layout.merge:
            raise ValueError(f"vision_positions: grid (t, h, w) = {(t, h, w)} is not positive with h and w "
                             f"multiples of spatial_merge_size {layout.merge}")
    host = _HOST.get((layout, grids), lambda: build_host_inputs(grids, layout))
    return _DEVICE.get((layout, grids, torch.device(device)), lambda: _to_device(host, torch.device(device)))


# ------------------------------------------------------------------------------- the patched forward
def _host_positions_forward(self, hidden_states, grid_thw, **kwargs):
    grids = host_grids(grid_thw)
    precomputed = device_inputs(grids, self._vltrain_positions_layout, hidden_states.device)
    return self._vltrain_positions_inner(hidden_states, grid_thw, **{**precomputed, **kwargs})


def _tower_spec(model_type: str) -> TowerSpec:
    if model_type not in VISION_TOWERS:
        raise ValueError(f"vision_positions: no vision tower is known for model_type {model_type!r}; "
                         f"known: {sorted(VISION_TOWERS)}")
    return VISION_TOWERS[model_type]


def _tower_class(model_type: str) -> type:
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, _tower_spec(model_type).cls)


def _is_patched(visual) -> bool:
    return getattr(visual.__dict__.get("forward"), "__func__", None) is _host_positions_forward


# ------------------------------------------------------------------------------- counting syncs
_DATA_DEPENDENT = {"nonzero", "unique_consecutive", "_unique", "_unique2", "unique_dim", "masked_select"}


class SyncCounter:
    """Within: `events` lists every op that forces a device -> host read on CUDA, on any device.

    Counted: `Tensor.tolist()` (one read per call), `aten._local_scalar_dense` (`.item()`, `int(t)`,
    iterating a tensor), the data-dependent-shape ops (nonzero, unique*, masked_select, repeat_interleave
    with tensor `repeats` and no `output_size`, indexing with a boolean mask) and copies from a non-CPU
    device to the CPU. Ops run by a counted op (a tolist's own copy) are not counted again."""

    def __init__(self):
        self.events: list[str] = []
        self._in_tolist = False
        counter = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types_, args=(), kwargs=None):
                if getattr(func, "__name__", None) != "tolist" or counter._in_tolist:
                    return func(*args, **(kwargs or {}))
                counter.events.append("Tensor.tolist")
                counter._in_tolist = True
                try:
                    return func(*args, **(kwargs or {}))
                finally:
                    counter._in_tolist = False

        class _Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not counter._in_tolist and _forces_read(func, args, kwargs):
                    counter.events.append(str(func.overloadpacket.__name__))
                return func(*args, **kwargs)

        self._modes = (_Functions(), _Ops())

    @property
    def count(self) -> int:
        return len(self.events)

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def _forces_read(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name == "_local_scalar_dense" or name in _DATA_DEPENDENT:
        return True
    if name == "repeat_interleave":
        repeats = kwargs.get("repeats", args[1] if len(args) > 1 else args[0])
        return torch.is_tensor(repeats) and kwargs.get("output_size") is None
    if name == "index":
        return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))
    if name in ("_to_copy", "copy_"):
        source = args[1] if name == "copy_" else args[0]
        target = args[0].device if name == "copy_" else kwargs.get("device")
        return (torch.is_tensor(source) and source.device.type not in ("cpu", "meta")
                and target is not None and torch.device(target).type == "cpu")
    return False


# ------------------------------------------------------------------------------- verification and patching
_VERIFIED: set[type] = set()  # tower classes whose forward consumed the host tensors on a probe

_PROBE_GRIDS = ((1, 8, 12), (2, 4, 6))  # partial and empty Qwen2.5-VL windows; up- and down-sampled grids
_PROBE_SIZES = {"depth": 2, "embed_dim": 16, "hidden_size": 16, "out_hidden_size": 16, "intermediate_size": 32,
                "num_heads": 2}


def _stock_inputs(grid: torch.Tensor, visual, model_type: str) -> dict:
    """What transformers' own helpers compute for `grid` (CPU), under the same keys."""
    from transformers import vision_utils

    merge = visual.spatial_merge_size
    cu, _ = vision_utils.get_vision_attention_seqlens(grid, visual.config)
    out = {"position_ids": vision_utils.get_vision_position_ids(grid, merge), "cu_seqlens": cu,
           "max_seqlen": int((cu[1:] - cu[:-1]).max())}
    if _tower_spec(model_type).windows:
        window_index, cu_windows = vision_utils.get_vision_window_index(
            grid, spatial_merge_size=merge, window_size=visual.window_size, patch_size=visual.patch_size)
        out.update(window_index=window_index, cu_window_seqlens=cu_windows,
                   max_window_seqlen=int((cu_windows[1:] - cu_windows[:-1]).max()))
    if _tower_spec(model_type).interpolation:
        out["interp_indices"], out["interp_weights"] = vision_utils.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=merge)
    return out


def _probe_attention(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    """Stand-in attention for the probe: uses the rotary cos and records what the block was given."""
    self._vltrain_seen.append((cu_seqlens, max_seqlen))
    return self.proj(hidden_states * position_embeddings[0][:, :1])


def verify_tower(model_type: str, visual) -> None:
    """Raise ValueError unless, on a probe of `type(visual)` (its config shrunk, fp32 CPU, own generator):
    the host-built tensors equal transformers' helpers, and the patched forward gives the stock outputs,
    passes the host max_seqlen to every block and reads the grid only once."""
    cls = type(visual)
    if cls in _VERIFIED:
        return
    config = copy.deepcopy(visual.config)
    config._attn_implementation = "sdpa"
    for name, value in _PROBE_SIZES.items():
        if hasattr(config, name):
            setattr(config, name, value)
    for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        if getattr(config, name, None):  # one full-attention / DeepStack block of the two
            setattr(config, name, [1])
    where = f"vision_positions: {cls.__qualname__} (model_type {model_type!r})"
    try:
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            probe = cls._from_config(config, dtype=torch.float32)
        layout = tower_layout(probe, model_type)
        grid = torch.tensor(_PROBE_GRIDS)
        want_inputs = _stock_inputs(grid, probe, model_type)
    except ValueError:
        raise
    except Exception as err:  # renamed attributes or helpers: refuse, do not guess
        raise ValueError(f"{where} no longer has the attributes or transformers.vision_utils helpers this "
                         f"kernel assumes ({type(err).__name__}: {err}); not patching") from err
    got_inputs = build_host_inputs(_PROBE_GRIDS, layout)
    assert tuple(got_inputs) == _tower_spec(model_type).precomputed == tuple(want_inputs)
    for key, want in want_inputs.items():
        got = got_inputs[key]
        same = got.dtype == want.dtype and torch.equal(got, want) if torch.is_tensor(want) else got == want
        if not same:
            raise ValueError(f"{where}: the host-built {key} differs from transformers.vision_utils'; not patching")

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for block in probe.blocks:
            block.attn._vltrain_seen = []
            block.attn.forward = types.MethodType(_probe_attention, block.attn)
        in_channels = getattr(config, "in_channels", getattr(config, "in_chans", 3))
        dim = in_channels * config.temporal_patch_size * config.patch_size ** 2
        pixels = torch.randn(int(grid.prod(-1).sum()), dim, generator=gen)
        try:
            want = cls.forward(probe, pixels, grid_thw=grid)
            for block in probe.blocks:
                block.attn._vltrain_seen.clear()
            probe._vltrain_positions_layout = layout
            probe._vltrain_positions_inner = types.MethodType(cls.forward, probe)
            with SyncCounter() as syncs:
                got = _host_positions_forward(probe, pixels, grid.clone())
        except Exception as err:
            raise ValueError(f"{where}.forward no longer runs with the precomputed keyword arguments "
                             f"({type(err).__name__}: {err}); not patching") from err
    outputs = [(want.last_hidden_state, got.last_hidden_state), (want.pooler_output, got.pooler_output)]
    outputs += list(zip(getattr(want, "deepstack_features", None) or [],
                        getattr(got, "deepstack_features", None) or []))
    if not all(a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in outputs):
        raise ValueError(f"{where}.forward gives other outputs with the host-built tensors; not patching")
    if syncs.count > 1:
        raise ValueError(f"{where}.forward still derives positions from grid_thw itself ({syncs.count} host "
                         f"reads: {sorted(set(syncs.events))}); not patching")
    seen = [entry for block in probe.blocks for entry in block.attn._vltrain_seen]
    if len(seen) != len(probe.blocks) or any(m is None or m != int((cu[1:] - cu[:-1]).max()) for cu, m in seen):
        raise ValueError(f"{where}.forward no longer hands the host max_seqlen to its blocks; not patching")
    _VERIFIED.add(cls)


def patch_vision_positions(model, model_type: str) -> list[str]:
    """Patch the vision tower's `forward` on this instance; [] if it is patched already.

    `model` is the whole model (a peft wrapper too: the tower is found at the family's `vision_module`)
    or the vision tower itself. Raises ValueError (naming `model_type`) for an unknown family, a tower of
    another class, or a class whose forward no longer takes the host-built tensors (checked on a probe);
    nothing is patched then."""
    cls = _tower_class(model_type)
    if isinstance(model, cls):
        visual, path = model, type(model).__name__
    else:
        path = family_spec(model_type).vision_module
        visual = get_module(model, path)
    if type(visual) is not cls:
        raise ValueError(f"vision_positions: {path} is a {type(visual).__qualname__}, not the {cls.__qualname__} "
                         f"of model_type {model_type!r}; cannot patch it")
    if _is_patched(visual):
        return []
    layout = tower_layout(visual, model_type)
    verify_tower(model_type, visual)
    visual._vltrain_positions_layout = layout
    visual._vltrain_positions_inner = visual.forward  # the class forward (or an instance patch before this one)
    visual.forward = types.MethodType(_host_positions_forward, visual)
    built = ", ".join(_tower_spec(model_type).precomputed)
    return [f"vision_positions: {path}.forward ({cls.__qualname__}; host-built {built})"]
