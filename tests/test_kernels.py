"""Kernel parity: every kernel vs the unpatched model, loss and gradients, on tiny models.

CPU tests run in fp32 with atol 1e-5. GPU tests (`-m gpu`, skipped without CUDA) run in bf16 through
liger's fused CE and torch's varlen attention, with the tolerances stated next to each one.

rms_norm and swiglu fall back to the stock forward on CPU, so on CPU the whole-model cases below only
show that patching keeps the stock numbers there. Their patched computation (liger's Triton ops, the
padded SwiGLU) is compared with the stock forward on CPU by running liger's kernels in Triton's
interpreter, in a subprocess (`TRITON_INTERPRET=1` must be set before Triton is imported): see
`interpreted` below.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vltrain.families import FAMILIES
from vltrain.kernels import KERNELS, OPT_IN, applicable_kernels, apply_kernels
from vltrain.kernels.fused_ce import chunked_linear_cross_entropy_sum
from vltrain.kernels.patch_embed import PatchLinear
from vltrain.kernels.rms_norm import RMS_NORMS, _modeling_class, count_rms_norms, verify_rms_norm_math
from vltrain.kernels.swiglu import swiglu_mlps
from vltrain.kernels.vision_varlen import masked_varlen_attention
from vltrain.tiny import build_tiny

from conftest import stock_and_copy
from vision_helpers import loss_and_grads, rel_err

FAMILY_NAMES = sorted(FAMILIES)
ATOL = 1e-5
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


_fresh = stock_and_copy


def _image(height, width, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


def _conversation(media, answer):
    return [
        {"role": "user", "content": [{"type": media}, {"type": "text", "text": "What colour is the shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def _with_labels(batch):
    """Labels = input ids with -100 on padding, on the prompt half, and on a span inside the answer."""
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    length = labels.shape[1]
    labels[:, : length // 2] = -100
    labels[0, length // 2 + 2 : length // 2 + 5] = -100
    batch["labels"] = labels
    return batch


def image_batch(processor, sizes=((56, 84), (112, 140))):
    answers = ["red circle", "the quick brown fox jumps over the lazy dog", "blue", "green square"]
    text = [processor.apply_chat_template(_conversation("image", a), tokenize=False) for a in answers[: len(sizes)]]
    images = [_image(h, w, seed) for seed, (h, w) in enumerate(sizes)]
    return _with_labels(dict(processor(text=text, images=images, return_tensors="pt", padding=True)))


def video_batch(processor):
    from transformers.video_utils import VideoMetadata

    text = [processor.apply_chat_template(_conversation("video", "a man is walking down the road"), tokenize=False)]
    frames = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    metadata = [VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3])]
    batch = processor(text=text, videos=[frames], video_metadata=metadata, do_sample_frames=False,
                      return_tensors="pt")
    return _with_labels(dict(batch))


def _to(batch, device, dtype):
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}


def assert_same_loss_and_grads(stock, patched, batch, atol=ATOL, **kwargs):
    ref, ref_grads = loss_and_grads(stock, batch, **kwargs)
    out, grads = loss_and_grads(patched, batch, **kwargs)
    torch.testing.assert_close(out.loss, ref.loss, atol=atol, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
    return out


# --- the ops, against plain torch ------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_chunked_linear_cross_entropy_matches_torch(chunk_size):
    torch.manual_seed(0)
    hidden = torch.randn(10, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (10,))
    loss = chunked_linear_cross_entropy_sum(hidden, weight, None, targets, chunk_size=chunk_size)
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_max_seqlen_is_read_once_per_cu_seqlens_tensor():
    from vltrain.kernels import vision_varlen

    from vltrain.attention import TensorKeyedCache, max_segment

    assert vision_varlen._MAX_SEQLEN.fn is max_segment  # what the vision kernel uses
    reads = []
    cache = TensorKeyedCache(lambda cu: reads.append(1) or max_segment(cu), size=2)
    windows, full = torch.tensor([0, 4, 10, 12]), torch.tensor([0, 12])
    for _ in range(5):  # blocks alternate between the two tensors, as in the vision tower
        assert cache.get(windows) == 6 and cache.get(full) == 12
    assert len(reads) == 2
    assert cache.get(torch.tensor([0, 4, 10, 12])) == 6 and len(reads) == 3  # equal values, new tensor: read
    assert len(cache.entries) == 2  # bounded


def test_masked_varlen_attention_matches_per_segment_loop():
    torch.manual_seed(0)
    q, k, v = (torch.randn(23, 2, 8) for _ in range(3))
    cu_seqlens = torch.tensor([0, 4, 5, 16, 23], dtype=torch.int32)
    out = masked_varlen_attention(q, k, v, cu_seqlens, scale=0.3)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        ref = F.scaled_dot_product_attention(*(t[start:end].transpose(0, 1) for t in (q, k, v)), scale=0.3)
        torch.testing.assert_close(out[start:end], ref.transpose(0, 1), atol=ATOL, rtol=0)


# --- every kernel vs the unpatched model, every family ---------------------------------------------

CASES = [(f, k) for f in FAMILY_NAMES for k in KERNELS if k in applicable_kernels(f) and k not in OPT_IN] + \
    [(f, "all") for f in FAMILY_NAMES]  # compile_layers: its own test (test_compile_layers.py), a compile is slow


@pytest.mark.parametrize("family,kernel", CASES)
def test_kernel_matches_stock_loss_and_grads(family, kernel):
    stock, patched, processor = _fresh(family)
    patches = apply_kernels(patched, [kernel])
    assert patches and patched._vltrain_kernels == patches
    out = assert_same_loss_and_grads(stock, patched, image_batch(processor))
    if kernel in ("fused_linear_ce", "all"):
        assert out.logits is None


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_fused_ce_num_items_in_batch_matches_stock(family):
    stock, patched, processor = _fresh(family)
    apply_kernels(patched, ["fused_linear_ce"])
    out = assert_same_loss_and_grads(stock, patched, image_batch(processor), num_items_in_batch=torch.tensor(37))
    assert out.loss.item() != 0


def test_fused_ce_moe_aux_loss_matches_stock():
    stock, patched, processor = _fresh("qwen3_vl_moe")
    apply_kernels(patched, ["fused_linear_ce"])
    out = assert_same_loss_and_grads(stock, patched, image_batch(processor), output_router_logits=True)
    assert out.aux_loss is not None


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_all_kernels_match_stock_on_video(family):
    stock, patched, processor = _fresh(family)
    apply_kernels(patched, ["all"])
    batch = video_batch(processor)
    assert "pixel_values_videos" in batch
    assert_same_loss_and_grads(stock, patched, batch)


def test_window_attention_matches_stock_on_images_of_different_sizes():
    stock, patched, processor = _fresh("qwen2_5_vl")
    apply_kernels(patched, ["vision_window_varlen"])
    batch = image_batch(processor, sizes=((56, 84), (112, 140), (28, 28), (84, 196)))
    grid = batch["image_grid_thw"]
    assert len({tuple(g) for g in grid.tolist()}) == 4
    from transformers.vision_utils import get_vision_window_index

    config = stock.config.vision_config
    _, cu_window_seqlens = get_vision_window_index(grid, spatial_merge_size=2, window_size=config.window_size,
                                                   patch_size=config.patch_size)
    assert len(torch.unique_consecutive(cu_window_seqlens)) - 1 > 2 * len(grid)  # many windows per image
    pixels = batch["pixel_values"].requires_grad_(True)
    outs = []
    for model in (stock, patched):
        visual = model.model.visual
        out = visual(pixels, grid_thw=grid).pooler_output
        (grad,) = torch.autograd.grad(out.square().sum(), pixels)
        outs.append((out, grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=ATOL, rtol=0)
    assert_same_loss_and_grads(stock, patched, batch)


# --- rms_norm and swiglu: what they patch, and the math they assume ----------------------------------


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_rms_norm_and_swiglu_patch_every_instance_and_no_other_module(family):
    _, patched, _ = _fresh(family)
    num_norms = count_rms_norms(patched, family)
    mlps = swiglu_mlps(patched, family)
    entries = apply_kernels(patched, ["rms_norm", "swiglu"] if mlps else ["rms_norm"])
    assert sum(int(e.split(" x")[1].split()[0]) for e in entries) == num_norms + len(mlps)
    patched_modules = {id(m) for m in patched.modules() if "forward" in m.__dict__}
    assert len(patched_modules) == num_norms + len(mlps)
    for module in patched.modules():
        name = type(module).__name__
        if "Gated" in name or isinstance(module, torch.nn.LayerNorm) or "Experts" in name:
            assert id(module) not in patched_modules, name
    if family.startswith("qwen3"):  # q_norm / k_norm over the head dim are RMSNorms too
        attn = next(m for m in patched.modules() if hasattr(m, "q_norm"))
        assert "forward" in attn.q_norm.__dict__ and "forward" in attn.k_norm.__dict__
    if family == "qwen2_5_vl":  # its vision tower uses RMSNorm and a SwiGLU MLP
        block = patched.model.visual.blocks[0]
        assert "forward" in block.norm1.__dict__ and "forward" in block.mlp.__dict__
        assert "forward" in patched.model.visual.merger.ln_q.__dict__
    if family == "qwen3_5_moe":
        assert all(type(m).__name__ == "Qwen3_5MoeMLP" for m in mlps)
        assert all(m is layer.mlp.shared_expert for m, layer in zip(mlps, patched.model.language_model.layers))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_rms_norm_math_is_verified_against_the_class(family):
    for class_name, eps_attr, mode, offset in RMS_NORMS[family]:
        cls = _modeling_class(family, class_name)
        verify_rms_norm_math(cls, eps_attr, mode, offset)  # the mode the kernel uses: passes
        wrong_mode, wrong_offset = ("gemma", 1.0) if mode == "llama" else ("llama", 0.0)
        with pytest.raises(ValueError, match="no longer computes"):
            verify_rms_norm_math(cls, eps_attr, wrong_mode, wrong_offset)


def test_cpu_fallback_of_rms_norm_and_swiglu_is_the_stock_forward_bit_for_bit():
    """On CPU the patched forwards call the class's own forward: identical results, not merely close."""
    stock, patched, processor = _fresh("qwen2_5_vl")
    apply_kernels(patched, ["rms_norm", "swiglu"])
    assert_same_loss_and_grads(stock, patched, image_batch(processor), atol=0)


def test_applying_kernels_leaves_the_global_rng_untouched():
    """LoRA init and data order draw from the global RNG seeded by `train.seed`: patching must not reseed or
    consume it (the rms_norm math check once ran `torch.manual_seed(0)`). Caches are cleared so every
    check that runs on a class's first patch runs here."""
    from vltrain.kernels import rms_norm

    rms_norm.verify_rms_norm_math.cache_clear()
    for family in FAMILY_NAMES:
        _, patched, _ = _fresh(family)
        torch.manual_seed(1234)
        torch.rand(3)
        cpu_state = torch.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        apply_kernels(patched, ["all", "compile_layers"])
        assert torch.equal(torch.get_rng_state(), cpu_state), family
        if cuda_states:
            assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_states)), family


# --- the patched rms_norm / swiglu computation on CPU: liger's kernels in Triton's interpreter ---------

# Runs in a subprocess with TRITON_INTERPRET=1. Two gaps of Triton 3.8's interpreter that liger 0.8.5's
# kernels hit are filled first (neither is liger's math): Python-float kernel arguments are passed
# unwrapped (`eps.to(tl.float32)` fails), and libdevice's extern `rsqrt` has no interpreted version
# (tl.math.rsqrt has). Then `triton_can_run` is told to hand out liger's op for CPU tensors too, counting
# each call, and every patched module class of each tiny family is run, stock and patched, on a few rows.
_INTERPRETED_CHILD = r"""
import collections, copy, json, sys
import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter

if isinstance(interpreter._implicit_cvt(1.0), float):
    _cvt = interpreter._implicit_cvt
    def _implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return _cvt(arg)
    interpreter._implicit_cvt = _implicit_cvt
import liger_kernel.ops.rms_norm as liger_rms_norm
liger_rms_norm.rsqrt = lambda x: tl.math.rsqrt(x)

sys.path.insert(0, sys.argv[1])
import test_kernels as tk
from vltrain.kernels import apply_kernels, rms_norm, swiglu

calls = collections.Counter()

class Counted:
    def __init__(self, op, name):
        self.op, self.name = op, name
    def apply(self, *args):
        calls[self.name] += 1
        return self.op.apply(*args)

def liger_on_cpu(x, op_module, op_name):
    op = rms_norm._liger_op(op_module, op_name)
    assert op is not None, op_name
    return Counted(op, op_name)

rms_norm.triton_can_run = swiglu.triton_can_run = liger_on_cpu

def run(module, x, dy):
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(dy)
    return {"output": y, "input grad": x.grad, **{n + " grad": p.grad for n, p in module.named_parameters()}}

def compare(family, name, stock, patched, dim, dtype):
    gen = torch.Generator().manual_seed(len(results))
    x = (torch.randn(2, 3, dim, generator=gen) * 2)
    x[0, 0] *= 1e-3  # mean(x^2) ~ eps: a wrong or missing eps shows
    dy = torch.randn(2, 3, dim, generator=gen)
    stock, patched = (copy.deepcopy(m).to(dtype) for m in (stock, patched))
    calls.clear()
    want = run(stock, x.to(dtype), dy.to(dtype))
    assert not calls, "the stock module called liger"
    linear_calls.clear()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: linear_calls.append(m) if type(m) is torch.nn.Linear else None)
    try:
        got = run(patched, x.to(dtype), dy.to(dtype))
    finally:
        hook.remove()
    errors = {k: ((got[k].float() - want[k].float()).abs().max().item(), want[k].float().abs().max().item())
              for k in want}
    results.append({"family": family, "module": name, "dtype": str(dtype), "calls": dict(calls),
                    "errors": errors, "dtypes_match": all(got[k].dtype == want[k].dtype for k in want),
                    "linear_modules_called": len(linear_calls)})

results, linear_calls = [], []
for family in sys.argv[2].split(","):
    stock, patched, _ = tk._fresh(family)
    with torch.no_grad():  # norm weights start at 1 (Qwen3.5: 0, for 1 + w): randomise them so they matter
        gen = torch.Generator().manual_seed(1)
        for (name, p), (_, q) in zip(stock.named_parameters(), patched.named_parameters()):
            if "norm" in name:
                q.copy_(p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0 if family.startswith("qwen3_5") else 1)))
    apply_kernels(patched, ["rms_norm", "swiglu"] if swiglu.swiglu_mlps(patched, family) else ["rms_norm"])
    seen = set()
    stock_modules = dict(stock.named_modules())
    for name, module in patched.named_modules():
        if "forward" not in module.__dict__:
            continue
        is_norm = hasattr(module, "_vltrain_rms_norm")
        dim = module.weight.shape[0] if is_norm else module.gate_proj.in_features
        if (type(module), dim) in seen:
            continue
        seen.add((type(module), dim))
        compare(family, name, stock_modules[name], module, dim, torch.float32)

# the padded path: a misaligned intermediate size (60 -> 64), biases, liger's silu_mul between padded matmuls
mlp = tk._vision_mlp(60)
padded = copy.deepcopy(mlp)
assert swiglu.patch_swiglu(padded, "qwen2_5_vl") and swiglu._alignment_pad(padded) == 4
compare("aligned", "vision mlp 60 -> 64", mlp, padded, 48, torch.float32)
print("RESULTS " + json.dumps(results))
"""

INTERPRETED_FAMILIES = FAMILY_NAMES


@pytest.fixture(scope="module")
def interpreted():
    """Results of `_INTERPRETED_CHILD`: one entry per patched (module class, width) per family and dtype."""
    pytest.importorskip("liger_kernel")
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED_CHILD, str(tests), ",".join(INTERPRETED_FAMILIES)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tests.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS "):])


# fp32 only: the interpreter emulates bf16 badly (liger's RMSNorm weight gradient comes back NaN there, not
# on a GPU); bf16 is the GPU tests' job. Tolerance, as max |patched - stock| over max |stock|: 1e-6 (liger
# sums in another order).
INTERPRETED_TOL = {"torch.float32": 1e-6}


@pytest.mark.parametrize("family", INTERPRETED_FAMILIES)
def test_interpreted_liger_rms_norm_and_swiglu_match_stock(family, interpreted):
    """Every class the two kernels patch in this family, through its patched forward with liger's Triton
    op (interpreted) vs its stock forward: output, input gradient and weight gradients, random weights."""
    _, patched, _ = _fresh(family)
    norm_classes = {c[0] for c in RMS_NORMS[family]}
    mlp_classes = {type(m).__name__ for m in swiglu_mlps(patched, family)}
    checked = [r for r in interpreted if r["family"] == family]
    checked_classes = {type(patched.get_submodule(r["module"])).__name__ for r in checked}
    assert checked_classes == norm_classes | mlp_classes
    for r in checked:
        is_norm = type(patched.get_submodule(r["module"])).__name__ in norm_classes
        assert r["calls"] == {"LigerRMSNormFunction" if is_norm else "LigerSiLUMulFunction": 1}, r
        assert r["linear_modules_called"] == (0 if is_norm else 3), r  # aligned widths: gate/up/down as modules
        assert r["dtypes_match"], r
        for what, (err, scale) in r["errors"].items():
            assert err <= INTERPRETED_TOL[r["dtype"]] * scale, (r["module"], r["dtype"], what, err, scale)


def test_interpreted_aligned_swiglu_matches_stock(interpreted):
    """The padded SwiGLU (intermediate 60 zero-padded to 64, biases) with liger's silu_mul between F.linear
    calls -- no Linear module is called -- gives the stock output and gradients (fp32)."""
    (r,) = [r for r in interpreted if r["family"] == "aligned"]
    assert r["calls"] == {"LigerSiLUMulFunction": 1} and r["linear_modules_called"] == 0, r
    assert set(r["errors"]) == {"output", "input grad", "gate_proj.weight grad", "gate_proj.bias grad",
                                "up_proj.weight grad", "up_proj.bias grad", "down_proj.weight grad",
                                "down_proj.bias grad"}
    for what, (err, scale) in r["errors"].items():
        assert err <= INTERPRETED_TOL["torch.float32"] * scale, (what, err, scale)


# --- instance-only, idempotent, strict ---------------------------------------------------------------


def test_kernels_leave_other_instances_and_the_class_untouched():
    stock, patched, processor = _fresh("qwen2_5_vl")
    classes = {type(m): m.forward.__func__ for m in stock.modules() if hasattr(m, "forward")}
    apply_kernels(patched, ["all"])
    assert {type(m): type(m).forward for m in stock.modules()} == classes  # class forwards unchanged
    for module in stock.modules():
        assert "forward" not in module.__dict__
    assert isinstance(stock.model.visual.patch_embed.proj, torch.nn.Conv3d)
    assert not hasattr(stock, "_vltrain_kernels")
    assert stock(**image_batch(processor)).logits is not None
    fresh, _ = build_tiny("qwen2_5_vl")
    assert "forward" not in fresh.__dict__ and isinstance(fresh.model.visual.patch_embed.proj, torch.nn.Conv3d)


def test_patch_embed_linear_keeps_state_dict_and_parameters():
    stock, patched, _ = _fresh("qwen3_vl")
    conv = patched.model.visual.patch_embed.proj
    before = {k: v.shape for k, v in patched.state_dict().items()}
    apply_kernels(patched, ["patch_embed_linear"])
    assert isinstance(patched.model.visual.patch_embed.proj, PatchLinear)
    assert patched.model.visual.patch_embed.proj.weight is conv.weight
    assert {k: v.shape for k, v in patched.state_dict().items()} == before
    stock.load_state_dict(patched.state_dict())


def test_idempotent():
    _, patched, processor = _fresh("qwen2_5_vl")
    first = apply_kernels(patched, ["all"])
    forward, attn_forward = patched.forward, patched.model.visual.blocks[0].attn.forward
    assert apply_kernels(patched, ["all"]) == first
    assert apply_kernels(patched, ["fused_linear_ce", "patch_embed_linear"]) == first
    assert patched.forward.__func__ is forward.__func__
    assert patched.model.visual.blocks[0].attn.forward.__func__ is attn_forward.__func__
    assert len(first) == 9 and all(":" in entry for entry in first)  # rms_norm 1 class, swiglu 2, vision_positions,
    assert sum(entry.startswith("visual_merge: ") for entry in first) == 1  # visual_merge (no DeepStack here)


def test_deepcopy_of_patched_model_is_patched_and_independent():
    stock, patched, processor = _fresh("qwen2_5_vl")
    apply_kernels(patched, ["all"])
    twin = copy.deepcopy(patched)
    assert twin.forward.__self__ is twin and twin.lm_head.forward.__self__ is twin.lm_head
    assert_same_loss_and_grads(stock, twin, image_batch(processor))


def test_unknown_or_inapplicable_kernel_raises():
    _, patched, _ = _fresh("qwen2_vl")
    with pytest.raises(ValueError, match="unknown kernel"):
        apply_kernels(patched, ["flash_everything"])
    with pytest.raises(ValueError, match="does not apply"):
        apply_kernels(patched, ["vision_window_varlen"])
    assert not hasattr(patched, "_vltrain_kernels")
    assert apply_kernels(patched, ["vision_window_varlen"], strict=False) == []
    assert [e.split(":")[0] for e in apply_kernels(patched, ["all"])] == [
        "fused_linear_ce", "fused_linear_ce", "vision_varlen", "vision_positions", "visual_merge", "patch_embed_linear",
        "rms_norm", "swiglu"]
    _, moe, _ = _fresh("qwen3_vl_moe")  # every LLM layer is MoE, vision MLPs are GELU: no SwiGLU MLP
    assert "swiglu" not in applicable_kernels(moe)
    with pytest.raises(ValueError, match="does not apply"):
        apply_kernels(moe, ["swiglu"])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_generation_unchanged(family):
    stock, patched, processor = _fresh(family)
    apply_kernels(patched, ["all"])
    conversation = _conversation("image", "")[:1]
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    batch = dict(processor(text=[text], images=[_image(56, 84, 0)], return_tensors="pt"))
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    torch.testing.assert_close(patched.generate(**batch, **kwargs), stock.generate(**batch, **kwargs))


# --- GPU, bf16: liger fused CE and torch varlen attention -------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gpu_bf16_all_kernels_match_stock(family):
    """bf16 tolerances: loss within 2e-2 absolute; each gradient within 5% relative L2 error (liger's
    fp32-accumulated CE and bf16 varlen attention reorder the bf16 sums the stock path does)."""
    pytest.importorskip("liger_kernel")
    stock, patched, processor = _fresh(family, dtype=torch.bfloat16, device="cuda")
    apply_kernels(patched, ["all"])
    batch = _to(image_batch(processor), "cuda", torch.bfloat16)
    ref, ref_grads = loss_and_grads(stock, batch, num_items_in_batch=torch.tensor(37))
    out, grads = loss_and_grads(patched, batch, num_items_in_batch=torch.tensor(37))
    assert abs(out.loss.item() - ref.loss.item()) < 2e-2
    assert grads.keys() == ref_grads.keys()
    errors = {name: rel_err(grads[name], ref_grads[name]) for name in grads}
    assert max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


@gpu
@needs_cuda
def test_gpu_bf16_window_attention_matches_stock():
    """bf16 tolerance: vision tower output within 2% relative L2 error of the stock sdpa window loop."""
    stock, patched, processor = _fresh("qwen2_5_vl", dtype=torch.bfloat16, device="cuda")
    apply_kernels(patched, ["vision_window_varlen"])
    batch = _to(image_batch(processor, sizes=((56, 84), (112, 140), (28, 28), (84, 196))), "cuda", torch.bfloat16)
    outs = [m.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
            for m in (stock, patched)]
    assert rel_err(outs[1], outs[0]) < 2e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gpu_bf16_rms_norm_op_matches_stock(family):
    """bf16, 4096 x 2048 rows through one norm of the family's class, random weights. Tolerance: output,
    input gradient and weight gradient each within 1% relative L2 error of the stock class forward
    (liger's reductions run in a different order; the weight gradient is accumulated in fp32)."""
    pytest.importorskip("liger_kernel")
    class_name, eps_attr, _, _ = RMS_NORMS[family][0]
    cls = _modeling_class(family, class_name)
    torch.manual_seed(0)
    stock = cls(2048, eps=1e-6).to("cuda", torch.bfloat16)
    with torch.no_grad():
        stock.weight.normal_(0.0 if family.startswith("qwen3_5") else 1.0, 0.3)
    patched = copy.deepcopy(stock)
    from vltrain.kernels.rms_norm import patch_rms_norm

    assert patch_rms_norm(patched, family) and "forward" in patched.__dict__
    x = (torch.randn(4096, 2048, device="cuda") * 2).to(torch.bfloat16)
    dy = torch.randn_like(x)
    results = []
    for module in (stock, patched):
        xi = x.clone().requires_grad_(True)
        module.weight.grad = None
        y = module(xi)
        y.backward(dy)
        results.append((y, xi.grad, module.weight.grad))
    for got, want in zip(results[1], results[0]):
        assert got.dtype == want.dtype
        assert rel_err(got, want) < 1e-2


@gpu
@needs_cuda
def test_gpu_bf16_swiglu_op_matches_stock():
    """bf16 Qwen2.5-VL vision MLP (bias) and LLM MLP, 4096 rows: output and every gradient within 1%
    relative L2 error (liger rounds silu(a) * b once, the stock path twice)."""
    pytest.importorskip("liger_kernel")
    from vltrain.kernels.swiglu import patch_swiglu

    stock, patched, processor = _fresh("qwen2_5_vl", dtype=torch.bfloat16, device="cuda")
    patch_swiglu(patched, "qwen2_5_vl")
    for path in ("model.visual.blocks.0.mlp", "model.language_model.layers.0.mlp"):
        mlps = [m.get_submodule(path) for m in (stock, patched)]
        assert "forward" in mlps[1].__dict__
        x = torch.randn(4096, mlps[0].gate_proj.in_features, device="cuda", dtype=torch.bfloat16)
        outs = []
        for mlp in mlps:
            xi = x.clone().requires_grad_(True)
            mlp.zero_grad(set_to_none=True)
            y = mlp(xi)
            y.square().sum().backward()
            outs.append([y, xi.grad] + [p.grad for p in mlp.parameters()])
        for got, want in zip(outs[1], outs[0]):
            assert rel_err(got, want) < 1e-2


def _vision_mlp(intermediate: int, dtype=torch.float32, device="cpu", hidden: int = 48):
    """A Qwen2.5-VL vision MLP (SiLU, biases) with these sizes, random weights."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

    config = Qwen2_5_VLConfig(vision_config=dict(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu"))
    torch.manual_seed(0)
    return Qwen2_5_VLMLP(config.vision_config, bias=True).to(device=device, dtype=dtype)


def test_aligned_swiglu_pads_only_misaligned_plain_linears():
    from peft import LoraConfig, get_peft_model
    from vltrain.kernels.swiglu import _alignment_pad

    assert _alignment_pad(_vision_mlp(3420)) == 36  # Qwen2.5-VL's vision MLP -> 3456
    assert _alignment_pad(_vision_mlp(60)) == 4
    assert _alignment_pad(_vision_mlp(64)) == 0 and _alignment_pad(_vision_mlp(3424)) == 0  # rows 16-byte aligned
    wrapped = get_peft_model(torch.nn.Sequential(_vision_mlp(60)), LoraConfig(r=2, target_modules=["up_proj"]))
    assert _alignment_pad(wrapped.base_model.model[0]) == 0  # a LoRA layer's weight is not padded
    hooked = _vision_mlp(60)
    hooked.down_proj.register_forward_pre_hook(lambda module, args: None)
    assert _alignment_pad(hooked) == 0  # hooks (offloading, user hooks) must still see their module called


def test_aligned_swiglu_matches_stock_output_and_grads():
    """fp32 on CPU: the zero-padded gate/up/down give the stock output and the stock gradients of the input,
    the weights and the biases (atol 1e-5); the padded intermediate never leaks into parameter shapes."""
    from vltrain.kernels.swiglu import _aligned_swiglu, _alignment_pad, _torch_silu_mul

    mlp = _vision_mlp(60)
    x = torch.randn(37, 48)
    results = []
    for run in ("stock", "aligned"):
        xi = x.clone().requires_grad_(True)
        mlp.zero_grad(set_to_none=True)
        y = mlp(xi) if run == "stock" else _aligned_swiglu(mlp, xi, _torch_silu_mul, _alignment_pad(mlp))
        y.square().sum().backward()
        results.append([y, xi.grad] + [p.grad for p in mlp.parameters()])
    for got, want in zip(results[1], results[0]):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


@gpu
@needs_cuda
def test_gpu_bf16_swiglu_misaligned_intermediate_matches_stock():
    """bf16, the real Qwen2.5-VL vision MLP width (1280 -> 3420), 8192 rows: the patched forward takes
    the padded path and matches stock within 1% relative L2 error in output and every gradient."""
    pytest.importorskip("liger_kernel")
    from vltrain.kernels.swiglu import _fused_swiglu_forward

    stock = _vision_mlp(3420, torch.bfloat16, "cuda", hidden=1280)
    patched = copy.deepcopy(stock)
    patched.forward = _fused_swiglu_forward.__get__(patched)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    x = torch.randn(8192, 1280, device="cuda", dtype=torch.bfloat16)
    outs = []
    try:
        for mlp in (stock, patched):
            calls.clear()
            xi = x.clone().requires_grad_(True)
            y = mlp(xi)
            y.square().sum().backward()
            outs.append([y, xi.grad] + [p.grad for p in mlp.parameters()])
            if mlp is patched:
                assert "Linear" not in calls  # the padded path calls F.linear, not the Linear modules
    finally:
        handle.remove()
    for got, want in zip(outs[1], outs[0]):
        assert got.shape == want.shape and rel_err(got, want) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gpu_bf16_rms_norm_swiglu_match_stock(family):
    """Whole tiny model, bf16, only these two kernels: loss within 1e-2 absolute, each gradient within
    3% relative L2 error."""
    pytest.importorskip("liger_kernel")
    stock, patched, processor = _fresh(family, dtype=torch.bfloat16, device="cuda")
    apply_kernels(patched, ["rms_norm", "swiglu"] if swiglu_mlps(patched, family) else ["rms_norm"])
    batch = _to(image_batch(processor), "cuda", torch.bfloat16)
    ref, ref_grads = loss_and_grads(stock, batch)
    out, grads = loss_and_grads(patched, batch)
    assert abs(out.loss.item() - ref.loss.item()) < 1e-2
    errors = {name: rel_err(grads[name], ref_grads[name]) for name in grads}
    assert max(errors.values()) < 3e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
