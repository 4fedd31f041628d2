"""vision_positions: the vision tower's index / position tensors built on the host from one grid_thw read.

CPU, fp32: every family's tiny tower, patched, against the stock one on 2 images of different sizes and an
8-frame video (pixel values from the real processor): outputs (and DeepStack features) and the gradients
of every vision parameter and of the pixels within 1e-6 (in practice bit-equal); `SyncCounter` shows the
stock tower's many host reads and the patched one's single grid read (with `vision_varlen`, and under
gradient checkpointing, forward and backward); the host cache; idempotence; refusals; the whole-model
loss on a real SFT batch. GPU tests (`-m gpu`, bf16) run on an H200:
    pytest -m gpu tests/test_vision_positions.py -s
"""

from __future__ import annotations

import copy
import itertools
import time

import numpy as np
import pytest
import torch

from vltrain.families import FAMILIES
from vltrain.kernels import apply_kernels
from vltrain.kernels import vision_positions
from vltrain.models import enable_gradient_checkpointing
from vltrain.kernels.vision_positions import (
    VISION_TOWERS, SyncCounter, TowerLayout, build_host_inputs, patch_vision_positions, verify_tower,
)

from conftest import stock_and_copy
from vision_helpers import (cuda_syncs, loss_and_grads, preset_vision_tower, rel_err, sft_batch, tower_forward_backward,
                            vision_inputs, visual_of)

FAMILY_NAMES = sorted(FAMILIES)
ATOL = 1e-6
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same(outs, grads, ref_outs, ref_grads, atol=ATOL, min_grads=10):
    assert len(outs) == len(ref_outs)
    for got, want in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > min_grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


# Host reads of the stock tower's grid bookkeeping on these inputs (transformers 5.24, counted on CPU, where the
# counter also sees the CPU-side masks of Qwen2.5-VL's window loop): a floor for the assertions below.
STOCK_GRID_READS = {"qwen2_vl": 3, "qwen2_5_vl": 11, "qwen3_vl": 7, "qwen3_vl_moe": 7, "qwen3_5": 7, "qwen3_5_moe": 7}


def attention_reads(model) -> int:
    """Host reads of the stock sdpa attention: `lengths.tolist()` once each for q, k and v, per block."""
    return 3 * len(visual_of(model).blocks)


# --- the host builders against transformers' own helpers -------------------------------------------------


def test_host_builders_equal_transformers_helpers():
    """Every host-built tensor equals transformers.vision_utils' (exactly) over many grids: single frames
    and videos, sizes divisible by the window or not, up- and down-sampled position grids."""
    from transformers import vision_utils

    rng = np.random.default_rng(0)
    grid_lists = [((1, 2, 2),), ((1, 8, 12), (2, 4, 6))]
    grid_lists += [tuple((int(rng.integers(1, 4)), 2 * int(rng.integers(1, 30)), 2 * int(rng.integers(1, 30)))
                         for _ in range(int(rng.integers(1, 5)))) for _ in range(12)]
    for grids, (merger_window, side, align) in itertools.product(grid_lists, [(2, 8, True), (4, 48, False)]):
        grid = torch.tensor(grids)
        got = build_host_inputs(grids, TowerLayout(2, merger_window=merger_window, grid_side=side, align_corners=align))
        cu = vision_utils.get_vision_cu_seqlens(grid)
        window_index, cu_windows = vision_utils.get_vision_window_index(grid, 2, merger_window * 28, 14)
        indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
            grid, side, mode="bilinear", align_corners=align, spatial_merge_size=2)
        want = {"position_ids": vision_utils.get_vision_position_ids(grid, 2), "cu_seqlens": cu,
                "window_index": window_index, "cu_window_seqlens": cu_windows,
                "interp_indices": indices, "interp_weights": weights}
        for key, tensor in want.items():
            assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), (grids, key)
        assert got["max_seqlen"] == int((cu[1:] - cu[:-1]).max())
        assert got["max_window_seqlen"] == int((cu_windows[1:] - cu_windows[:-1]).max())


# --- the tower, every family: images of two sizes and a video in one call --------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_tower_matches_stock_and_reads_the_grid_once(family):
    """Alone (stock sdpa attention): the same outputs and gradients, and the only host reads left are the
    grid read and the stock attention's own per-block segment lengths."""
    stock, patched, processor = stock_and_copy(family)
    (entry,) = patch_vision_positions(patched, family)
    assert entry.startswith(f"vision_positions: model.visual.forward ({VISION_TOWERS[family].cls};")
    pixels, grid = vision_inputs(processor)
    with SyncCounter() as stock_syncs:
        ref_outs, ref_grads = tower_forward_backward(stock, pixels, grid)
    with SyncCounter() as syncs:
        outs, grads = tower_forward_backward(patched, pixels, grid)
    assert_same(outs, grads, ref_outs, ref_grads)
    assert syncs.events == ["Tensor.tolist"] * (1 + attention_reads(patched))
    assert stock_syncs.count - attention_reads(stock) >= STOCK_GRID_READS[family]  # gone with the patch
    assert set(stock_syncs.events) - {"Tensor.tolist"}  # repeat_interleave, .item(), unique_consecutive...


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_with_vision_varlen_one_read_per_step_also_under_gradient_checkpointing(family):
    """vision_varlen, then this patch: forward and backward make exactly one host read (the grid), in eval
    and in training with gradient checkpointing (the recompute adds none); the numbers are vision_varlen's."""
    stock, patched, processor = stock_and_copy(family)
    apply_kernels(stock, ["vision_varlen"])
    apply_kernels(patched, ["vision_varlen"])
    assert patch_vision_positions(patched, family)
    pixels, grid = vision_inputs(processor)
    with SyncCounter() as stock_syncs:
        ref_outs, ref_grads = tower_forward_backward(stock, pixels, grid)
    with SyncCounter() as syncs:
        outs, grads = tower_forward_backward(patched, pixels, grid)
    assert_same(outs, grads, ref_outs, ref_grads)
    assert syncs.events == ["Tensor.tolist"]
    assert stock_syncs.count >= STOCK_GRID_READS[family], stock_syncs.events

    for model in (stock, patched):
        enable_gradient_checkpointing(model)  # as training does: non-reentrant, every layer
        model.train()
    recomputed = []  # the checkpoint wraps the block's forward: hooks on its attention fire in the recompute too
    handle = visual_of(patched).blocks[0].attn.register_forward_pre_hook(lambda module, args: recomputed.append(1))
    with SyncCounter() as gc_syncs:
        outs, grads = tower_forward_backward(patched, pixels, grid.clone())
    handle.remove()
    assert len(recomputed) == 2, "the block was not recomputed in the backward"
    assert gc_syncs.events == ["Tensor.tolist"]
    ref_outs, ref_grads = tower_forward_backward(stock, pixels, grid)
    assert_same(outs, grads, ref_outs, ref_grads)


def test_patch_before_vision_varlen_and_max_seqlen_reaches_every_block():
    """The order of the two patches does not matter, and each block's attention receives the host
    max_seqlen of its own segments (Qwen2.5-VL: windows in windowed blocks, images in full blocks)."""
    from vltrain.kernels import vision_varlen

    _, patched, processor = stock_and_copy("qwen2_5_vl")
    patch_vision_positions(patched, "qwen2_5_vl")
    apply_kernels(patched, ["vision_varlen"])
    pixels, grid = vision_inputs(processor)
    seen = []
    varlen = vision_varlen.varlen_attention
    vision_varlen.varlen_attention = lambda q, k, v, cu, max_seqlen=None, scale=None: (
        seen.append((cu, max_seqlen)) or varlen(q, k, v, cu, max_seqlen, scale))
    try:
        with SyncCounter() as syncs:
            visual_of(patched)(pixels, grid_thw=grid)
    finally:
        vision_varlen.varlen_attention = varlen
    assert syncs.events == ["Tensor.tolist"]
    assert len(seen) == len(visual_of(patched).blocks)
    for cu, max_seqlen in seen:
        assert isinstance(max_seqlen, int) and max_seqlen == int((cu[1:] - cu[:-1]).max())
    full = visual_of(patched).fullatt_block_indexes
    frames = int(grid[:, 0].sum())
    assert [len(cu) - 1 == frames for cu, _ in seen] == [i in full for i in range(len(seen))]


# --- the cache ---------------------------------------------------------------------------------------------


def test_same_grids_build_nothing_new_and_the_same_grid_tensor_reads_nothing(monkeypatch):
    # fresh caches: the module-level ones hold the grids of every earlier test that ran `all` in this process
    monkeypatch.setattr(vision_positions, "_HOST", vision_positions._LRU(size=64))
    monkeypatch.setattr(vision_positions, "_DEVICE", vision_positions._LRU(size=16))
    _, patched, processor = stock_and_copy("qwen3_vl")
    patch_vision_positions(patched, "qwen3_vl")
    apply_kernels(patched, ["vision_varlen"])
    visual = visual_of(patched)
    pixels, grid = vision_inputs(processor)
    visual(pixels, grid_thw=grid)
    host, device = vision_positions._HOST.misses, vision_positions._DEVICE.misses
    with SyncCounter() as syncs:
        visual(pixels, grid_thw=grid.clone())  # a new grid tensor with the same values: read once, built never
    assert syncs.events == ["Tensor.tolist"]
    assert (vision_positions._HOST.misses, vision_positions._DEVICE.misses) == (host, device)
    with SyncCounter() as syncs:
        visual(pixels, grid_thw=grid)  # the same grid tensor (a tower re-run): not even read
    assert syncs.count == 0
    grid[-1, 0] = 2  # written in place (2 of the video's 4 temporal groups): read again, new positions
    fewer_frames = pixels[: int(grid.prod(-1).sum())]
    with SyncCounter() as syncs:
        visual(fewer_frames, grid_thw=grid)
    assert syncs.events == ["Tensor.tolist"] and vision_positions._HOST.misses == host + 1
    grid[-1, 0] = 4
    smaller = grid[:2].clone()
    visual(pixels[: int(smaller.prod(-1).sum())], grid_thw=smaller)
    assert (vision_positions._HOST.misses, vision_positions._DEVICE.misses) == (host + 2, device + 2)


# --- the whole model on a real SFT batch ---------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("kernels", [["vision_varlen"], ["all"]])
def test_whole_model_loss_and_grads_match_stock_on_an_sft_batch(family, kernels, media_dir, mixed_data, monkeypatch):
    stock, patched, processor = stock_and_copy(family)
    reported = apply_kernels(patched, kernels)
    if "all" in kernels:  # part of "all"
        assert any(entry.startswith("vision_positions") for entry in reported)
    else:
        assert patch_vision_positions(patched, family)
    batch = sft_batch(family, processor, media_dir, mixed_data)
    ref, ref_grads = loss_and_grads(stock, batch)
    built = []
    device_inputs = vision_positions.device_inputs
    monkeypatch.setattr(vision_positions, "device_inputs",
                        lambda grids, *args: built.append(grids) or device_inputs(grids, *args))
    out, grads = loss_and_grads(patched, batch)
    grids = [tuple(map(tuple, batch[key].tolist())) for key in ("image_grid_thw", "video_grid_thw")]
    # the patched tower ran, on the images and on the video (with "all": visual_merge's one call over both)
    assert set(built) == ({grids[0] + grids[1]} if "all" in kernels else set(grids))
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


# --- idempotence, instance only, refusals ---------------------------------------------------------------------


def test_idempotent_and_instance_only():
    stock, patched, _ = stock_and_copy("qwen2_5_vl")
    first = patch_vision_positions(patched, "qwen2_5_vl")
    forward = visual_of(patched).forward
    assert patch_vision_positions(patched, "qwen2_5_vl") == []
    assert patch_vision_positions(visual_of(patched), "qwen2_5_vl") == []  # the tower itself is accepted too
    assert visual_of(patched).forward == forward and forward.__self__ is visual_of(patched)
    assert "forward" not in visual_of(stock).__dict__  # the class is untouched
    assert first and "window_index, cu_window_seqlens, max_window_seqlen" in first[0]
    twin = copy.deepcopy(patched)
    assert visual_of(twin).forward.__self__ is visual_of(twin)  # rebound to the copy
    assert visual_of(twin)._vltrain_positions_inner.__self__ is visual_of(twin)


def test_through_a_peft_wrapper_with_vision_lora():
    """LoRA on the vision attention (peft swaps the Linears, the tower class stays): found through the
    wrapper, same outputs and gradients (the adapters' too)."""
    from peft import LoraConfig, get_peft_model

    stock, patched, processor = stock_and_copy("qwen2_vl")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r"model\.visual\.blocks\.\d+\.attn\.(qkv|proj)",
                      init_lora_weights=False)
    torch.manual_seed(0)
    stock = get_peft_model(stock, lora)
    torch.manual_seed(0)
    patched = get_peft_model(patched, copy.deepcopy(lora))
    (entry,) = patch_vision_positions(patched, "qwen2_vl")
    assert entry.startswith("vision_positions: model.visual.forward")
    pixels, grid = vision_inputs(processor)
    outs, grads = tower_forward_backward(patched.base_model.model, pixels, grid)
    ref_outs, ref_grads = tower_forward_backward(stock.base_model.model, pixels, grid)
    assert sum("lora_" in name for name in grads) == 8  # A and B of qkv and proj, 2 blocks; the base is frozen
    assert_same(outs, grads, ref_outs, ref_grads, min_grads=8)


def test_refuses_another_tower_class_and_unknown_families():
    _, qwen3, _ = stock_and_copy("qwen3_vl")
    with pytest.raises(ValueError, match=r"model\.visual is a Qwen3VLVisionModel, not the Qwen2Vision.*'qwen2_vl'"):
        patch_vision_positions(qwen3, "qwen2_vl")
    with pytest.raises(ValueError, match="no vision tower is known for model_type 'llava'"):
        patch_vision_positions(qwen3, "llava")
    visual_of(qwen3).interpolation_mode = "bicubic"
    with pytest.raises(ValueError, match="model_type 'qwen3_vl'.*mode 'bicubic'"):
        patch_vision_positions(qwen3, "qwen3_vl")
    assert "forward" not in visual_of(qwen3).__dict__


def test_refuses_a_class_whose_forward_ignores_or_misuses_the_host_tensors(monkeypatch):
    """The probe catches a stock forward that recomputes the positions itself (the kwargs dropped) and
    one that computes something else with them."""
    _, patched, _ = stock_and_copy("qwen2_vl")
    cls = type(visual_of(patched))
    stock_forward = cls.forward
    monkeypatch.setattr(vision_positions, "_VERIFIED", set())
    precomputed = ("position_ids", "cu_seqlens", "max_seqlen")

    def dropping(self, hidden_states, grid_thw, **kwargs):
        return stock_forward(self, hidden_states, grid_thw, **{k: v for k, v in kwargs.items() if k not in precomputed})

    monkeypatch.setattr(cls, "forward", dropping)
    with pytest.raises(ValueError, match=r"Qwen2VisionTransformerPretrainedModel \(model_type 'qwen2_vl'\).*still "
                                         r"derives positions from grid_thw"):
        patch_vision_positions(patched, "qwen2_vl")

    def shifted(self, hidden_states, grid_thw, **kwargs):
        if "position_ids" in kwargs:
            kwargs["position_ids"] = kwargs["position_ids"] + 1
        return stock_forward(self, hidden_states, grid_thw, **kwargs)

    monkeypatch.setattr(cls, "forward", shifted)
    with pytest.raises(ValueError, match="gives other outputs with the host-built tensors"):
        patch_vision_positions(patched, "qwen2_vl")
    assert "forward" not in visual_of(patched).__dict__
    monkeypatch.setattr(cls, "forward", stock_forward)
    assert patch_vision_positions(patched, "qwen2_vl")


def test_probe_leaves_the_global_rng_untouched(monkeypatch):
    monkeypatch.setattr(vision_positions, "_VERIFIED", set())
    _, patched, _ = stock_and_copy("qwen3_5")
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    verify_tower("qwen3_5", visual_of(patched))
    assert vision_positions._VERIFIED and torch.equal(torch.get_rng_state(), state)


def test_bad_grids_are_refused_by_name():
    _, patched, _ = stock_and_copy("qwen2_vl")
    patch_vision_positions(patched, "qwen2_vl")
    with pytest.raises(ValueError, match=r"grid \(t, h, w\) = \(1, 3, 4\).*spatial_merge_size 2"):
        visual_of(patched)(torch.zeros(12, 1176), grid_thw=torch.tensor([[1, 3, 4]]))
    with pytest.raises(ValueError, match=r"grid_thw must have shape \(num_media, 3\), got \(3,\)"):
        visual_of(patched)(torch.zeros(4, 1176), grid_thw=torch.tensor([1, 2, 2]))


# --- the counter itself ------------------------------------------------------------------------------------------


def test_sync_counter_counts_the_ops_that_read_the_device():
    g = torch.tensor([[1, 4, 6], [2, 8, 8]])
    with SyncCounter() as syncs:
        g.tolist()
        g[0, 0].item()
        int(g[1, 2])
        torch.repeat_interleave(g[:, 1], g[:, 0])
        torch.unique_consecutive(g.flatten())
        g.flatten()[g.flatten() > 4]
        torch.nonzero(g)
    assert syncs.events == ["Tensor.tolist", "_local_scalar_dense", "_local_scalar_dense", "repeat_interleave",
                            "unique_consecutive", "index", "nonzero"]
    with SyncCounter() as syncs:
        torch.repeat_interleave(g[:, 1], g[:, 0], output_size=3)
        g[:, 0] * g[:, 1]
        g[torch.tensor([1, 0])]
        torch.cumsum(g.flatten(), 0)
    assert syncs.count == 0


# --- GPU, bf16 ----------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gpu_bf16_matches_stock_and_runs_without_sync(family):
    """bf16 on CUDA, both with vision_varlen: the host-built index tensors equal the stock GPU helpers'
    exactly, so outputs and gradients match the stock tower closely (2% / 5% relative L2, the bf16
    tolerances of tests/test_vision_varlen.py; in practice bit-equal). With the grid on the device: one host
    read per call (SyncCounter); with the grid tensor seen before, the forward runs under
    `torch.cuda.set_sync_debug_mode("error")`."""
    from transformers import vision_utils

    stock, patched, processor = stock_and_copy(family, dtype=torch.bfloat16, device="cuda")
    apply_kernels(stock, ["vision_varlen"])
    apply_kernels(patched, ["vision_varlen"])
    patch_vision_positions(patched, family)
    pixels, grid = vision_inputs(processor)
    pixels, grid = pixels.to("cuda", torch.bfloat16), grid.to("cuda")
    layout = visual_of(patched)._vltrain_positions_layout
    built = vision_positions.device_inputs(tuple(map(tuple, grid.tolist())), layout, pixels.device)
    assert built["position_ids"].is_cuda and torch.equal(built["position_ids"],
                                                         vision_utils.get_vision_position_ids(grid, 2))
    if "interp_weights" in built:
        visual = visual_of(stock)
        indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
            grid, visual.num_grid_per_side, mode="bilinear", align_corners=visual.interpolation_align_corners,
            spatial_merge_size=2)
        assert torch.equal(built["interp_indices"], indices) and torch.equal(built["interp_weights"], weights)
    ref_outs, ref_grads = tower_forward_backward(stock, pixels, grid)
    with SyncCounter() as syncs:
        outs, grads = tower_forward_backward(patched, pixels, grid.clone())
    assert syncs.events == ["Tensor.tolist"]
    for got, want in zip(outs, ref_outs, strict=True):
        assert rel_err(got, want) < 2e-2
    errors = {name: rel_err(grads[name], ref_grads[name]) for name in ref_grads}
    assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:5]

    visual = visual_of(patched)
    visual(pixels, grid_thw=grid)  # the grid tensor is read here, once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = visual(pixels, grid_thw=grid)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rel_err(out.pooler_output, ref_outs[1]) < 2e-2


@gpu
@needs_cuda
def test_gpu_timing_qwen2_5_vl_3b_vision_forward_backward():
    """Prints (no assertion on speed) the forward+backward time and CUDA sync count of a Qwen2.5-VL-3B-sized
    vision tower (32 blocks, 1280 wide, windows of 112 px) on 8 images of 448x448 and a 16-frame 448x448
    video, with vision_varlen, without and with vision_positions. Outputs agree within 2% relative L2."""
    from vltrain.kernels.vision_varlen import patch_vision_varlen

    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    stock = preset_vision_tower("qwen2_5_vl_3b", Qwen2_5_VLVisionConfig, Qwen2_5_VisionTransformerPretrainedModel)
    patch_vision_varlen(stock.blocks, "blocks", "qwen2_5_vl")
    patched = copy.deepcopy(stock)
    (entry,) = patch_vision_positions(patched, "qwen2_5_vl")
    config = stock.config
    dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    grid_cpu = torch.tensor([[1, 32, 32]] * 8 + [[8, 32, 32]])
    pixels = torch.randn(int(grid_cpu.prod(-1).sum()), dim, device="cuda", dtype=torch.bfloat16)

    def step(model):
        grid = grid_cpu.to("cuda")  # a fresh device grid every step, as the collator's batch
        x = pixels.clone().requires_grad_(True)
        out = model(x, grid_thw=grid).pooler_output
        out.float().square().mean().backward()
        return out.detach()

    results = {}
    for name, model in (("vision_varlen", stock), ("vision_varlen + vision_positions", patched)):
        for _ in range(3):
            out = step(model)
        syncs = cuda_syncs(lambda: step(model))
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            step(model)
        torch.cuda.synchronize()
        results[name] = ((time.perf_counter() - start) / 10 * 1e3, syncs, out)
    (base_ms, base_syncs, base_out), (ms, syncs, out) = results.values()
    print(f"\n{entry}\nQwen2.5-VL-3B vision fwd+bwd, {pixels.shape[0]} patches: vision_varlen {base_ms:.1f} ms "
          f"({base_syncs} CUDA syncs), + vision_positions {ms:.1f} ms ({syncs} CUDA syncs) ({base_ms / ms:.2f}x)")
    assert rel_err(out, base_out) < 2e-2
    assert syncs < base_syncs


def test_the_kernel_table_applies_vision_positions_in_all_and_by_name():
    """`vision_positions` is part of `all` (measured on an H200: Qwen3-VL-4B full SFT 8.9% faster, same loss);
    asked for by name through apply_kernels it patches the tower as `all` does and is reported once."""
    _, patched, _ = stock_and_copy("qwen2_5_vl")
    reported = apply_kernels(patched, ["all"])
    assert sum("vision_positions" in entry for entry in reported) == 1
    _, alone, _ = stock_and_copy("qwen2_5_vl")
    by_name = apply_kernels(alone, ["vision_positions"])
    assert by_name and all("vision" in entry for entry in by_name) and set(by_name) <= set(reported)
    reported = apply_kernels(patched, ["all", "vision_positions"])
    assert apply_kernels(patched, ["vision_positions"]) == reported  # idempotent through the table
