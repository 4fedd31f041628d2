"""visual_merge: the vision features put into the text embeddings (and DeepStack's adds) by integer index.

CPU, fp32, every family's tiny model: patched against stock on a real SFT batch (text, one image, two
images, a video; padded, so the mRoPE positions come from the model, and packed, positions from the
collator): loss and every gradient equal within 1e-5; `SyncCounter` shows that the merge's host reads are
gone (forward and backward); the placeholder check still fails a mismatched batch; greedy generation
is unchanged; idempotence, instance only, refusals. GPU test (`-m gpu`, bf16, H200):
    pytest -m gpu tests/test_visual_merge.py -s
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from vltrain.attention import enable_packed_attention
from vltrain.families import FAMILIES, family_spec, get_module
from vltrain.kernels import apply_kernels
from vltrain.kernels import visual_merge
from vltrain.kernels.vision_positions import SyncCounter
from vltrain.kernels.visual_merge import DEEPSTACK, MERGED_MODELS, patch_visual_merge

from conftest import stock_and_copy
from test_dpo import _collate, _dataset, pair_data  # noqa: F401 (pair_data: a fixture)
from vision_helpers import cuda_syncs, loss_and_grads, rel_err, sft_batch

FAMILY_NAMES = sorted(FAMILIES)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = pytest.mark.usefixtures("one_thread")


def packed_batch(model_type, processor, media_dir, mixed_data):
    """The same records as one packed row (position_ids (4, 1, L) from the collator), as the SFT loop gets."""
    from vltrain.data.dataset import SFTDataset
    from vltrain.data.media import MediaOptions
    from vltrain.data.packing import PackCollator
    from vltrain.families import family_spec
    from vltrain.progress import model_inputs
    from vltrain.tiny import tiny_config

    media = MediaOptions(image_factor=family_spec(model_type).image_factor, image_max_pixels=64 * 64 * 2,
                         video_max_pixels=64 * 64, nframes=4)
    dataset = SFTDataset(mixed_data, processor, media, max_seq_length=1024, image_folder=str(media_dir))
    collate = PackCollator(tiny_config(model_type, processor.tokenizer))
    return model_inputs(collate([dataset[i] for i in range(len(dataset))]))


def assert_same_loss_and_grads(stock, patched, batch):
    ref, ref_grads = loss_and_grads(stock, batch)
    out, grads = loss_and_grads(patched, batch)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 20
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_loss_and_grads_match_stock_on_an_sft_batch(family, layout, media_dir, mixed_data):
    stock, patched, processor = stock_and_copy(family)
    reported = patch_visual_merge(patched, family)
    assert reported[0].startswith("visual_merge: ") and len(reported) == (2 if family in DEEPSTACK else 1)
    if layout == "packed":
        batch = packed_batch(family, processor, media_dir, mixed_data)
        enable_packed_attention(stock), enable_packed_attention(patched)
        assert batch["input_ids"].shape[0] == 1 and batch["position_ids"].shape[:2] == (4, 1)
    else:
        batch = sft_batch(family, processor, media_dir, mixed_data)
        assert batch["input_ids"].shape[0] == 4 and "position_ids" not in batch
    called = []
    inner = patched.model._vltrain_merge_inner
    patched.model._vltrain_merge_inner = lambda **kw: called.append(1) or inner(**kw)
    with tower_calls(stock) as stock_calls, tower_calls(patched) as calls:
        assert_same_loss_and_grads(stock, patched, batch)
    assert not called  # the merged path ran, not the stock fallback
    assert batch["pixel_values"] is not None and batch["pixel_values_videos"] is not None
    assert (len(stock_calls), len(calls)) == (2, 1)  # images and videos: one tower pass instead of two


class tower_calls:
    """Context manager: the list of the vision tower's forward calls while active."""

    def __init__(self, model):
        self.visual = get_module(model, family_spec(model).vision_module)

    def __enter__(self):
        calls = []
        self.handle = self.visual.register_forward_hook(lambda *args: calls.append(1))
        return calls

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_one_tower_call_gives_each_modality_what_its_own_call_gives(family, media_dir, mixed_data):
    """Every field of the image and the video outputs (last hidden state, merged features, DeepStack's) of the
    single tower call, per medium, equals stock get_image_features / get_video_features'."""
    stock, patched, processor = stock_and_copy(family)
    patch_visual_merge(patched, family)
    batch = sft_batch(family, processor, media_dir, mixed_data)
    args = [batch[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")]
    with torch.no_grad(), tower_calls(patched) as calls:
        got = visual_merge._media_features(patched.model, *args)
        want = {"image": stock.model.get_image_features(*args[:2], return_dict=True),
                "video": stock.model.get_video_features(*args[2:], return_dict=True)}
    assert len(calls) == 1
    for name in ("image", "video"):
        fields = {k for k, v in want[name].items() if v is not None}
        assert fields == {k for k, v in got[name].items() if v is not None} and "pooler_output" in fields
        for key in fields:
            g, w = got[name][key], want[name][key]
            if key == "pooler_output":  # per medium
                assert len(g) == len(w) == len(batch[f"{name}_grid_thw"])
            for a, b in zip(g if isinstance(g, (list, tuple)) else [g], w if isinstance(w, (list, tuple)) else [w]):
                for x, y in zip(a if isinstance(a, (list, tuple)) else [a], b if isinstance(b, (list, tuple)) else [b]):
                    torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_dummy_video_costs_no_second_tower_pass(family, media_dir, mixed_data):
    """The SFT loop's loss on a batch of images without a video, and on a text-only one: complete_modalities'
    dummies ride along the one tower call; loss and gradients as stock's (which runs the tower twice)."""
    from loops.sft import sft_loss
    from vltrain.data.dataset import PadCollator, SFTDataset
    from vltrain.data.media import MediaOptions
    from vltrain.progress import model_inputs

    stock, patched, processor = stock_and_copy(family)
    patch_visual_merge(patched, family)
    media = MediaOptions(image_factor=family_spec(family).image_factor, image_max_pixels=64 * 64 * 2,
                         video_max_pixels=64 * 64, nframes=4)
    dataset = SFTDataset(mixed_data, processor, media, max_seq_length=1024, image_folder=str(media_dir))
    examples = [dataset[i] for i in range(len(dataset))]
    collate = PadCollator(processor.tokenizer.pad_token_id)
    images = [e for e in examples if "pixel_values" in e and "pixel_values_videos" not in e]
    text = [e for e in examples if "pixel_values" not in e and "pixel_values_videos" not in e]
    assert images and text
    for kind, part in (("images only", images), ("text only", text)):
        batch = model_inputs(collate(part))
        assert "pixel_values_videos" not in batch and ("pixel_values" in batch) == (kind == "images only")
        num_tokens = int((batch["labels"][:, 1:] != -100).sum())
        results = {}
        for name, model in (("stock", stock), ("patched", patched)):
            model.zero_grad(set_to_none=True)
            with tower_calls(model) as calls:
                loss = sft_loss(model, batch, num_tokens)
                loss.backward()
            results[name] = loss.detach(), {n: q.grad for n, q in model.named_parameters() if q.grad is not None}, len(calls)
        (ref_loss, ref_grads, ref_calls), (got_loss, got_grads, got_calls) = results["stock"], results["patched"]
        assert (ref_calls, got_calls) == (2, 1), kind
        torch.testing.assert_close(got_loss, ref_loss, atol=1e-5, rtol=0)
        assert got_grads.keys() == ref_grads.keys() and any("visual" in k for k in got_grads)
        for key, grad in got_grads.items():
            torch.testing.assert_close(grad, ref_grads[key], atol=1e-5, rtol=0, msg=lambda m: f"{kind} {key}: {m}")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_no_host_read_left_in_the_merge_forward_or_backward(family, media_dir, mixed_data):
    """The tower with vision_varlen and vision_positions, a packed row: what visual_merge leaves is the tower's
    one grid read per modality (its split shares it) and the reads of the packed text attention."""
    without, with_merge, processor = stock_and_copy(family)
    kernels = ["vision_varlen", "vision_positions"]
    apply_kernels(without, kernels), apply_kernels(with_merge, kernels + ["visual_merge"])
    events = {}
    for name, model in (("without", without), ("with", with_merge)):
        batch = packed_batch(family, processor, media_dir, mixed_data)  # new grid tensors: nothing cached
        enable_packed_attention(model)
        with SyncCounter() as forward:
            loss = model(**batch).loss
        with SyncCounter() as backward:
            loss.backward()
        events[name] = forward.events, backward.events
    (fwd, bwd), (ref_fwd, ref_bwd) = events["with"], events["without"]
    assert not Counter(fwd) - Counter(ref_fwd)  # nothing new
    assert ref_fwd.count("Tensor.tolist") == 4 and fwd.count("Tensor.tolist") == 2  # the stock split's reads gone
    assert ref_fwd.count("_local_scalar_dense") - fwd.count("_local_scalar_dense") >= 4  # the count checks gone
    assert "index" not in fwd and bwd == []
    if family in DEEPSTACK:  # stock: boolean indexing in every DeepStack layer, forward and backward
        assert ref_fwd.count("index") >= 4 and ref_bwd.count("index") >= 6


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("packing", [False, True])
def test_preference_batches_keep_one_tower_pass_per_unique_medium(family, packing, pair_data):
    """DPO's pair batches (vltrain.vision.shared_media wraps get_*_features: the tower runs on the unique media,
    the features are handed out per occurrence): the same log-probs as stock, and the tower ran once per modality."""
    from loops.dpo import pair_logps

    stock, patched, processor = stock_and_copy(family)
    patch_visual_merge(patched, family)
    if packing:
        enable_packed_attention(stock), enable_packed_attention(patched)
    ds = _dataset(family, processor, pair_data)
    batch = _collate(stock, processor, packing)([ds[i] for i in range(len(ds))])
    assert len(batch["image_source"]) > int(batch["image_source"].max()) + 1  # some media occur more than once
    calls = []
    hook = patched.model.visual.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        want, got = pair_logps(stock, batch), pair_logps(patched, batch)
    hook.remove()
    assert len(calls) == 2  # images, videos
    torch.testing.assert_close(got.chosen, want.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.rejected, want.rejected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_a_placeholder_count_that_does_not_match_the_features_is_refused(family, media_dir, mixed_data):
    _, patched, processor = stock_and_copy(family)
    patch_visual_merge(patched, family)
    batch = sft_batch(family, processor, media_dir, mixed_data)
    ids = batch["input_ids"].clone()
    first = (ids == patched.config.image_token_id).nonzero()[0]
    ids[first[0], first[1]] = processor.tokenizer.pad_token_id
    with pytest.raises(RuntimeError, match="visual_merge: the image placeholder tokens of the batch do not match"):
        patched(**{**batch, "input_ids": ids})


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_generation_and_the_stock_conventions_are_unchanged(family, media_dir, mixed_data):
    stock, patched, processor = stock_and_copy(family)
    patch_visual_merge(patched, family)
    batch = sft_batch(family, processor, media_dir, mixed_data)
    batch.pop("labels")
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert torch.equal(stock.generate(**batch, **kwargs), patched.generate(**batch, **kwargs))
    with torch.no_grad():  # return_dict=False: the stock forward's tuple
        ref, out = stock.model(**batch, return_dict=False), patched.model(**batch, return_dict=False)
    assert isinstance(out, tuple) and torch.equal(out[0], ref[0])
    if family in DEEPSTACK:  # a caller of the stock mask convention still gets the stock add
        text = patched.model.language_model
        hidden, mask = torch.randn(2, 5, 8), torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
        embeds = torch.randn(4, 8)
        want = text._vltrain_deepstack_inner(hidden, mask, embeds)
        torch.testing.assert_close(text._deepstack_process(hidden, mask, embeds), want, atol=0, rtol=0)
        index = mask.reshape(-1).nonzero().squeeze(1)
        torch.testing.assert_close(text._deepstack_process(hidden, index, embeds), want, atol=0, rtol=0)


def test_idempotent_instance_only_and_part_of_all():
    stock, patched, _ = stock_and_copy("qwen3_vl")
    first = apply_kernels(patched, ["all"])
    assert sum(entry.startswith("visual_merge") for entry in first) == 2
    assert patch_visual_merge(patched, "qwen3_vl") == []
    assert patch_visual_merge(patched.model, "qwen3_vl") == []  # the multimodal model itself is accepted too
    assert "forward" not in stock.model.__dict__ and "_deepstack_process" not in stock.model.language_model.__dict__
    twin = copy.deepcopy(patched)
    assert twin.model.forward.__self__ is twin.model  # rebound to the copy
    assert set(MERGED_MODELS) == set(FAMILIES)


def test_refuses_unknown_families_other_classes_and_a_changed_forward(monkeypatch):
    _, patched, _ = stock_and_copy("qwen2_vl")
    with pytest.raises(ValueError, match="no multimodal model is known for model_type 'llama'"):
        patch_visual_merge(patched, "llama")
    with pytest.raises(ValueError, match="not the Qwen2_5_VLModel of model_type 'qwen2_5_vl'"):
        patch_visual_merge(patched, "qwen2_5_vl")
    cls = type(patched.model)

    def forward(self, input_ids=None, pixel_values=None, extra_thing=None, **kwargs):
        return None

    monkeypatch.setattr(cls, "forward", forward)
    with pytest.raises(ValueError, match="Qwen2VLModel.forward of model_type 'qwen2_vl' takes"):
        patch_visual_merge(patched, "qwen2_vl")
    assert "forward" not in patched.model.__dict__


@gpu
@needs_cuda
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gpu_bf16_matches_stock_and_the_merge_makes_no_sync(family, media_dir, mixed_data):
    """bf16 tolerances (as tests/test_vision_positions.py): loss within 0.5%, every gradient within 5% relative L2
    error; fewer CUDA syncs per forward + backward than the stock merge (H200, 2026-12-02: 37 -> 5 on Qwen3-VL,
    13 -> 5 on Qwen2-VL)."""
    stock, patched, processor = stock_and_copy(family, dtype=torch.bfloat16, device="cuda")
    kernels = ["vision_varlen", "vision_positions"]
    apply_kernels(stock, kernels), apply_kernels(patched, kernels + ["visual_merge"])
    batch = {k: v.cuda() for k, v in packed_batch(family, processor, media_dir, mixed_data).items()}
    for key in ("pixel_values", "pixel_values_videos"):
        batch[key] = batch[key].to(torch.bfloat16)
    enable_packed_attention(stock), enable_packed_attention(patched)
    (ref, ref_grads), (out, grads) = loss_and_grads(stock, batch), loss_and_grads(patched, batch)
    ref_loss, loss = ref.loss, out.loss
    print(f"\n{family}: bf16 loss, stock merge {float(ref_loss):.6f}, visual_merge {float(loss):.6f}")
    assert abs(float(loss) - float(ref_loss)) <= 5e-3 * abs(float(ref_loss)), (float(loss), float(ref_loss))
    errors = {name: rel_err(grad, ref_grads[name]) for name, grad in grads.items()}
    assert grads.keys() == ref_grads.keys() and max(errors.values()) < 5e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    syncs = {}
    for name, model in (("stock", stock), ("patched", patched)):
        def step():
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
        step()
        syncs[name] = cuda_syncs(step)
    print(f"\n{family}: CUDA syncs per forward+backward, stock merge {syncs['stock']}, visual_merge {syncs['patched']}")
    assert syncs["patched"] < syncs["stock"]
