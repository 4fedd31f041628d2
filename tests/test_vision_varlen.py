"""vision_varlen: every family's vision attention as one varlen call, against the stock per-segment loop.

CPU, fp32, atol 1e-5: the patched path is the exact block-diagonal sdpa fallback (one call over the whole
packed sequence), the stock path is transformers' sdpa loop over images, video frames and (Qwen2.5-VL)
windows. Every CPU test checks the patched forward really ran (the stock class forward is made to raise
while the patched model runs). GPU tests (`-m gpu`, skipped without CUDA) compare bf16 on CUDA through
torch's varlen_attn with the stock sdpa path, and print a timing of a Qwen3-VL-4B-sized vision tower:
    pytest -m gpu tests/test_vision_varlen.py -s
"""

from __future__ import annotations

import contextlib
import copy
import time

import pytest
import torch

from vltrain.families import FAMILIES, family_spec
from vltrain.kernels import applicable_kernels, apply_kernels
from vltrain.kernels import vision_varlen
from vltrain.kernels.vision_varlen import VISION_ATTENTION, patch_vision_varlen, verify_vision_attention_math

from conftest import stock_and_copy
from vision_helpers import (loss_and_grads, preset_vision_tower, rel_err, sft_batch, tower_forward_backward, tower_outputs,
                            vision_inputs)

FAMILY_NAMES = sorted(FAMILIES)
ATOL = 1e-5
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = pytest.mark.usefixtures("one_thread")


_fresh = stock_and_copy


def assert_same_loss_and_grads(stock, patched, batch, atol=ATOL):
    ref, ref_grads = loss_and_grads(stock, batch)
    with only_patched_attention(patched) as calls:
        out, grads = loss_and_grads(patched, batch)
    assert calls, "the patched vision attention never ran"
    torch.testing.assert_close(out.loss, ref.loss, atol=atol, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@contextlib.contextmanager
def only_patched_attention(model):
    """Within: the family's stock attention forward raises (so the per-segment loop cannot run) and every
    varlen call is recorded as its number of segments."""
    cls = vision_varlen._attention_class_and_rotary(family_spec(model).model_type)[0]
    stock_forward, varlen = cls.forward, vision_varlen.varlen_attention
    calls: list[int] = []

    def refuse(*args, **kwargs):
        raise AssertionError(f"stock {cls.__qualname__}.forward ran")

    def counted(q, k, v, cu_seqlens, *args, **kwargs):
        calls.append(len(cu_seqlens) - 1)
        return varlen(q, k, v, cu_seqlens, *args, **kwargs)

    cls.forward, vision_varlen.varlen_attention = refuse, counted
    try:
        yield calls
    finally:
        cls.forward, vision_varlen.varlen_attention = stock_forward, varlen


# --- the vision tower, every family: images of two sizes and a video in one call ---------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_vision_tower_matches_stock_on_images_and_video(family):
    stock, patched, processor = _fresh(family)
    entries = apply_kernels(patched, ["vision_varlen"])
    assert entries == [f"vision_varlen: model.visual.blocks.*.attn.forward (2 blocks, {VISION_ATTENTION[family]})"]
    pixels, grid = vision_inputs(processor)
    assert grid[:, 0].tolist()[-1] == 4 and len({tuple(g) for g in grid.tolist()}) == 3
    ref_outs, ref_grads = tower_forward_backward(stock, pixels, grid)
    with only_patched_attention(patched) as calls:
        outs, grads = tower_forward_backward(patched, pixels, grid)
    num_segments = int(grid[:, 0].sum())  # one per image and per temporal group of the video
    depth = len(patched.model.visual.blocks)
    if family_spec(family).window_attention:  # windowed blocks see more, smaller segments
        assert len(calls) == depth and max(calls) > num_segments and min(calls) == num_segments
    else:
        assert calls == [num_segments] * depth
    for got, want in zip(outs, ref_outs, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


def test_masked_path_differs_from_unsegmented_attention():
    """The CPU parity above is not vacuous: attention over the whole packed sequence (segments ignored)
    gives a different vision tower output."""
    stock, patched, processor = _fresh("qwen3_vl")
    apply_kernels(patched, ["vision_varlen"])
    pixels, grid = vision_inputs(processor)
    want = tower_outputs(stock.model.visual(pixels, grid_thw=grid))[1]
    whole = vision_varlen.masked_varlen_attention
    vision_varlen.masked_varlen_attention = lambda q, k, v, cu, scale=None: whole(
        q, k, v, torch.tensor([0, q.shape[0]]), scale)
    try:
        got = tower_outputs(patched.model.visual(pixels, grid_thw=grid))[1]
    finally:
        vision_varlen.masked_varlen_attention = whole
    assert (got - want).abs().max() > 20 * ATOL


# --- the whole model on a real SFT batch, alone and with every other kernel ------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("kernels", [["vision_varlen"], ["all"]])
def test_whole_model_loss_and_grads_match_stock_on_an_sft_batch(family, kernels, media_dir, mixed_data):
    stock, patched, _ = _fresh(family)
    entries = apply_kernels(patched, kernels)
    assert [e for e in entries if e.startswith("vision_varlen:")]
    if kernels == ["all"]:
        assert {e.split(":")[0] for e in entries} >= {"vision_varlen", "fused_linear_ce", "patch_embed_linear"}
    assert_same_loss_and_grads(stock, patched, sft_batch(family, stock_and_copy(family)[2], media_dir, mixed_data))


def test_packed_rows_match_stock(media_dir, mixed_data):
    """Packed rows (the LLM's own varlen attention) with the vision kernel: same loss and gradients."""
    from vltrain.attention import enable_packed_attention
    from vltrain.data.dataset import SFTDataset
    from vltrain.data.media import MediaOptions
    from vltrain.data.packing import PackCollator
    from vltrain.progress import model_inputs

    stock, patched, processor = _fresh("qwen2_vl")
    media = MediaOptions(image_factor=28, image_max_pixels=64 * 64 * 2, video_max_pixels=64 * 64, nframes=4)
    dataset = SFTDataset(mixed_data, processor, media, max_seq_length=1024, image_folder=str(media_dir))
    batch = model_inputs(PackCollator(stock.config)([dataset[i] for i in range(len(dataset))]))
    for model in (stock, patched):
        enable_packed_attention(model)
    apply_kernels(patched, ["vision_varlen"])
    assert_same_loss_and_grads(stock, patched, batch)


# --- names, idempotence, refusals --------------------------------------------------------------------------


def test_every_family_has_the_kernel_in_all_and_the_old_name_only_on_qwen2_5_vl():
    for family in FAMILY_NAMES:
        assert "vision_varlen" in applicable_kernels(family)
        assert ("vision_window_varlen" in applicable_kernels(family)) == (family == "qwen2_5_vl")
    _, old, _ = _fresh("qwen2_5_vl")
    _, new, _ = _fresh("qwen2_5_vl")
    assert apply_kernels(old, ["vision_window_varlen"]) == apply_kernels(new, ["vision_varlen"])
    assert apply_kernels(old, ["vision_varlen", "all"])[0] == apply_kernels(new, ["all"])[0]
    assert sum(e.startswith("vision_varlen:") for e in old._vltrain_kernels) == 1
    _, qwen2, _ = _fresh("qwen2_vl")
    with pytest.raises(ValueError, match="vision_window_varlen.*does not apply.*qwen2_vl"):
        apply_kernels(qwen2, ["vision_window_varlen"])


def test_idempotent_and_instance_only():
    stock, patched, _ = _fresh("qwen3_5")
    first = apply_kernels(patched, ["vision_varlen"])
    forwards = [b.attn.forward for b in patched.model.visual.blocks]
    assert apply_kernels(patched, ["vision_varlen"]) == first
    assert patch_vision_varlen(patched.model.visual.blocks, "model.visual.blocks", "qwen3_5") == []
    assert [b.attn.forward for b in patched.model.visual.blocks] == forwards
    assert all(b.attn.forward.__self__ is b.attn for b in patched.model.visual.blocks)
    assert all("forward" not in b.attn.__dict__ for b in stock.model.visual.blocks)  # the class is untouched
    twin = copy.deepcopy(patched)
    assert all(b.attn.forward.__self__ is b.attn for b in twin.model.visual.blocks)  # rebound to the copy


def test_refuses_a_block_attention_of_another_class():
    _, patched, _ = _fresh("qwen3_vl")
    _, other, _ = _fresh("qwen2_vl")
    patched.model.visual.blocks[1].attn = other.model.visual.blocks[0].attn
    with pytest.raises(ValueError, match=r"blocks\.1\.attn is a VisionAttention.*'qwen3_vl'"):
        apply_kernels(patched, ["vision_varlen"])
    assert "forward" not in patched.model.visual.blocks[0].attn.__dict__  # nothing patched
    with pytest.raises(ValueError, match="no vision attention is known for model_type 'llava'"):
        patch_vision_varlen(patched.model.visual.blocks, "model.visual.blocks", "llava")


def test_refuses_a_class_whose_stock_forward_changed(monkeypatch):
    """The probe check catches a stock forward that no longer computes what the patch does (here: a
    different softmax scale), and one whose signature changed."""
    _, patched, _ = _fresh("qwen2_5_vl")
    cls = type(patched.model.visual.blocks[0].attn)
    stock_forward = cls.forward
    monkeypatch.setattr(vision_varlen, "_VERIFIED", set())

    def rescaled(self, *args, **kwargs):
        scaling = self.scaling
        self.scaling = scaling * 2
        try:
            return stock_forward(self, *args, **kwargs)
        finally:
            self.scaling = scaling

    monkeypatch.setattr(cls, "forward", rescaled)
    with pytest.raises(ValueError, match="Qwen2_5_VLVisionAttention.forward .model_type 'qwen2_5_vl'. no longer computes"):
        apply_kernels(patched, ["vision_varlen"])
    monkeypatch.setattr(cls, "forward", lambda self, hidden_states, grid: hidden_states)
    with pytest.raises(ValueError, match="no longer runs as this kernel assumes"):
        apply_kernels(patched, ["vision_varlen"])
    assert not hasattr(patched, "_vltrain_kernels")
    monkeypatch.setattr(cls, "forward", stock_forward)
    assert apply_kernels(patched, ["vision_varlen"])


def test_probe_leaves_the_global_rng_untouched(monkeypatch):
    monkeypatch.setattr(vision_varlen, "_VERIFIED", set())
    _, patched, _ = _fresh("qwen2_vl")
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    verify_vision_attention_math("qwen2_vl", patched.model.visual.blocks[0].attn)
    assert vision_varlen._VERIFIED and torch.equal(torch.get_rng_state(), state)


def test_max_seqlen_from_transformers_is_passed_on():
    """Under flash attention transformers passes `max_seqlen`; the patched forward hands it to the varlen
    call (None under sdpa: the cached read then fills it on CUDA)."""
    _, patched, _ = _fresh("qwen3_vl")
    apply_kernels(patched, ["vision_varlen"])
    attn = patched.model.visual.blocks[0].attn
    seen = []
    varlen = vision_varlen.varlen_attention
    vision_varlen.varlen_attention = lambda q, k, v, cu, max_seqlen=None, scale=None: (
        seen.append((max_seqlen, scale)) or varlen(q, k, v, cu, max_seqlen, scale))
    try:
        x = torch.randn(10, attn.qkv.in_features)
        rope = (torch.ones(10, attn.head_dim), torch.zeros(10, attn.head_dim))
        attn(x, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), position_embeddings=rope, max_seqlen=6)
        attn(x, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), position_embeddings=rope)
    finally:
        vision_varlen.varlen_attention = varlen
    assert seen == [(6, attn.scaling), (None, attn.scaling)]


# --- GPU, bf16, against the stock sdpa path ------------------------------------------------------------------


@contextlib.contextmanager
def counted_torch_varlen():
    """Counts the calls of the fast path (`vltrain.attention.flash_varlen` that returned a result), so a GPU
    test can show it ran."""
    fn = vision_varlen.flash_varlen
    calls = []
    vision_varlen.flash_varlen = lambda *a, **k: (out := fn(*a, **k)) is not None and calls.append(1) or out
    try:
        yield calls
    finally:
        vision_varlen.flash_varlen = fn


def _no_fast_path() -> bool:
    from vltrain import attention

    return attention._torch_varlen() is None and not attention._aten_flash_usable(torch.cuda.current_device())


@gpu
@needs_cuda
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gpu_bf16_vision_varlen_matches_stock(family, media_dir, mixed_data):
    """bf16 tolerances (as tests/test_kernels.py): vision outputs within 2% relative L2 error of the stock
    sdpa loop, pixel / vision parameter gradients within 5%; whole model loss within 2e-2 absolute and each
    gradient within 5%."""
    if _no_fast_path():
        pytest.skip("neither torch's flash kernels nor torch.nn.attention.varlen.varlen_attn is usable here")
    stock, patched, processor = _fresh(family, dtype=torch.bfloat16, device="cuda")
    apply_kernels(patched, ["vision_varlen"])
    pixels, grid = vision_inputs(processor)
    pixels, grid = pixels.to("cuda", torch.bfloat16), grid.to("cuda")
    ref_outs, ref_grads = tower_forward_backward(stock, pixels, grid)
    with counted_torch_varlen() as calls:
        outs, grads = tower_forward_backward(patched, pixels, grid)
    assert len(calls) == len(patched.model.visual.blocks)
    for got, want in zip(outs, ref_outs, strict=True):
        assert rel_err(got, want) < 2e-2
    errors = {name: rel_err(grads[name], ref_grads[name]) for name in ref_grads}
    assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:5]

    batch = {k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda"))
             for k, v in sft_batch(family, stock_and_copy(family)[2], media_dir, mixed_data).items()}
    ref, ref_grads = loss_and_grads(stock, batch)
    out, grads = loss_and_grads(patched, batch)
    assert abs(out.loss.item() - ref.loss.item()) < 2e-2
    errors = {name: rel_err(grads[name], ref_grads[name]) for name in ref_grads}
    assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


@gpu
@needs_cuda
def test_gpu_timing_qwen3_vl_4b_vision_forward_backward():
    """Prints (no assertion on speed) stock sdpa vs vision_varlen forward+backward of a Qwen3-VL-4B-sized
    vision tower (24 blocks, 1024 wide) on 8 images of 448x448 and a 32-frame 448x448 video (8 x 784 +
    16 x 784 patches, 24 segments). The outputs must agree within 2% relative L2 error."""
    if _no_fast_path():
        pytest.skip("neither torch's flash kernels nor torch.nn.attention.varlen.varlen_attn is usable here")
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    stock = preset_vision_tower("qwen3_vl_4b", Qwen3VLVisionConfig, Qwen3VLVisionModel)
    patched = copy.deepcopy(stock)
    (entry,) = patch_vision_varlen(patched.blocks, "blocks", "qwen3_vl")
    config = stock.config
    dim = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    grid = torch.tensor([[1, 28, 28]] * 8 + [[16, 28, 28]], device="cuda")
    pixels = torch.randn(int(grid.prod(-1).sum()), dim, device="cuda", dtype=torch.bfloat16)

    def step(model):
        x = pixels.clone().requires_grad_(True)
        out = model(x, grid_thw=grid).pooler_output
        out.float().square().mean().backward()
        return out.detach()

    results = {}
    for name, model in (("stock sdpa", stock), ("vision_varlen", patched)):
        for _ in range(2):
            out = step(model)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            step(model)
        torch.cuda.synchronize()
        results[name] = ((time.perf_counter() - start) / 5 * 1e3, out)
    stock_ms, patched_ms = results["stock sdpa"][0], results["vision_varlen"][0]
    print(f"\n{entry}\nQwen3-VL-4B vision fwd+bwd, {pixels.shape[0]} patches in {int(grid[:, 0].sum())} segments: "
          f"stock sdpa {stock_ms:.1f} ms, vision_varlen {patched_ms:.1f} ms ({stock_ms / patched_ms:.2f}x)")
    assert rel_err(results["vision_varlen"][1], results["stock sdpa"][1]) < 2e-2
