"""Length estimates from headers (vltrain.data.lengths) equal the encoded Examples' lengths, for SFT, DPO pairs and
classification, images and videos, with and without pixel limits and truncation; unmeasurable samples are encoded
and counted; token-budget batches are the same either way."""

from __future__ import annotations

import functools
import json
import time

import pytest

from vltrain.data.dataset import SFTDataset
from vltrain.data.labels import ClassificationDataset, LabelSpec
from vltrain.data.lengths import estimate_lengths, image_size
from vltrain.data.loader import build_loader
from vltrain.data.media import MediaOptions, load_image
from vltrain.data.packing import TokenBudgetBatchSampler, encoded_lengths, example_length, example_lengths
from vltrain.data.pairs import PairDataset
from vltrain.families import family_spec
from vltrain.tiny import build_tiny_processor, tiny_config

from conftest import mixed_records, write_image, write_video

IMAGE_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
# (image_min_pixels, image_max_pixels, resized w x h): none, a cap that shrinks the larger images, a floor that
# grows the small ones, a fixed size
LIMITS = {"none": {}, "max": {"image_max_pixels": 160 * 120}, "min": {"image_min_pixels": 300 * 300},
          "resized": {"image_resized_width": 100, "image_resized_height": 60}}


@functools.lru_cache(maxsize=None)
def _processor(model_type):
    return build_tiny_processor(model_type)


def _media(model_type, **overrides):
    return MediaOptions(image_factor=family_spec(model_type).image_factor, **overrides)


@pytest.fixture
def sized_data(media_dir):
    """The mixed records (text, one image, two images of different sizes over two turns, video) plus larger
    images of odd sizes, a multi-turn text sample and a JPEG."""
    write_image(media_dir / "wide.png", (333, 121), seed=3)
    write_image(media_dir / "tall.jpg", (150, 410), seed=4)
    records = mixed_records() + [
        {"id": "odd", "image": ["wide.png", "tall.jpg"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nCompare them."}, {"from": "gpt", "value": "one is wider"}]},
        {"id": "chat", "conversations": [
            {"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello! How can I help?"},
            {"from": "human", "value": "Count to five."}, {"from": "gpt", "value": "1 2 3 4 5"}]},
    ]
    path = media_dir / "sized.json"
    path.write_text(json.dumps(records))
    return path


def _sft(model_type, path, max_seq_length=4096, **media):
    return SFTDataset(path, _processor(model_type), _media(model_type, **media), max_seq_length=max_seq_length,
                      image_folder=str(path.parent))


def _encoded(ds):
    return [example_length(ds[i]) for i in range(len(ds))]


# ------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("limits", LIMITS)
@pytest.mark.parametrize("model_type", IMAGE_FAMILIES)
def test_sft_estimate_equals_the_encoded_length(model_type, limits, sized_data):
    ds = _sft(model_type, sized_data, nframes=4, video_max_pixels=64 * 64, **LIMITS[limits])
    estimate = estimate_lengths(ds)
    assert estimate.lengths == _encoded(ds) and estimate.encoded == []
    if limits != "none":  # the limit changed the sizes of the large images' sample (index 4)
        assert estimate.lengths[4] != estimate_lengths(_sft(model_type, sized_data, nframes=4)).lengths[4]


@pytest.mark.parametrize("limits", LIMITS)
def test_image_size_is_the_loaded_images_size(limits, media_dir):
    for name, size in (("wide.png", (333, 121)), ("tall.png", (150, 410)), ("big.png", (900, 700))):
        write_image(media_dir / name, size, seed=5)
        for model_type in ("qwen2_5_vl", "qwen3_vl"):
            opts = _media(model_type, **LIMITS[limits])
            height, width = image_size(str(media_dir / name), opts)
            assert load_image(str(media_dir / name), opts).size == (width, height)


# ------------------------------------------------------------------------------------------ videos
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("options", [{"nframes": 4, "video_max_pixels": 64 * 64}, {"fps": 3.0}, {}])
def test_video_estimate_equals_the_encoded_length(model_type, options, media_dir):
    """Files (conftest's mpeg4 clip, a longer 30-frame one) and frame folders; Qwen3.x writes a `<t seconds>` text
    per temporal group, so the timestamps of the sampled frames count too."""
    write_video(media_dir / "long.mp4", num_frames=30, fps=10, size=(96, 80))
    frames = media_dir / "frames"
    frames.mkdir()
    for k in range(7):
        write_image(frames / f"frame_{k}.png", (72, 56), seed=k)
    records = [{"id": name, "video": video, "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Things move."}]}
        for name, video in (("clip", "clip.mp4"), ("long", "long.mp4"), ("frames", "frames"))]
    path = media_dir / "videos.json"
    path.write_text(json.dumps(records))
    ds = _sft(model_type, path, **options)
    estimate = estimate_lengths(ds)
    assert estimate.lengths == _encoded(ds) and estimate.encoded == []


# ------------------------------------------------------------------------------------------ truncation, skips
def test_truncation_and_skips_follow_the_encoder(media_dir, sized_data):
    """A small max_seq_length truncates the long multi-turn samples (the cut turn's labels dropped) and skips the
    ones whose media end beyond it; a skipped sample takes its replacement's length, as the dataset gives it."""
    full = estimate_lengths(_sft("qwen2_5_vl", sized_data, nframes=4, video_max_pixels=64 * 64)).lengths
    limit = sorted(full)[2]
    ds = _sft("qwen2_5_vl", sized_data, max_seq_length=limit, nframes=4, video_max_pixels=64 * 64)
    encoded = _encoded(ds)
    assert max(encoded) <= limit and encoded != full  # something was truncated or replaced
    assert any(ds[i]["truncated"] for i in range(len(ds))) and any(ds[i]["skipped"] for i in range(len(ds)))
    assert estimate_lengths(ds).lengths == encoded


def test_unreadable_headers_are_encoded_and_counted(media_dir):
    """A file that is not an image, a missing file, and a URL cannot be measured from a header: those samples are
    encoded (and the encoder skips the broken ones, so they take their replacement's length)."""
    (media_dir / "broken.png").write_bytes(b"not an image at all")
    records = mixed_records() + [
        {"id": "broken", "image": "broken.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "nothing"}]},
        {"id": "missing", "image": "nowhere.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "nothing"}]},
    ]
    path = media_dir / "broken.json"
    path.write_text(json.dumps(records))
    ds = _sft("qwen2_vl", path, nframes=4, video_max_pixels=64 * 64)
    estimate = estimate_lengths(ds)
    assert estimate.encoded == [4, 5]
    assert estimate.lengths == _encoded(ds)
    assert estimate.lengths[4] == estimate.lengths[5] == estimate.lengths[0]  # both replaced by sample 0 (wraps)
    assert "2 encoded instead" in estimate.summary()


# ------------------------------------------------------------------------------------------ other datasets
def test_pair_estimate_counts_prompt_plus_chosen_plus_rejected(media_dir):
    write_image(media_dir / "wide.png", (333, 121), seed=3)
    pairs = [
        {"id": "img", "image": "wide.png", "prompt": "<image>\nDescribe it.", "chosen": "A wide noisy picture.",
         "rejected": "A cat."},
        {"id": "two", "image": ["a.png", "b.png"], "prompt": "<image>\nFirst.\n<image>\nWhich is wider?",
         "chosen": "The second one.", "rejected": "The first one, clearly, by far."},
        {"id": "vid", "video": "clip.mp4", "prompt": "<video>\nWhat happens?", "chosen": "It gets brighter.",
         "rejected": "Nothing."},
        {"id": "same", "prompt": "Say hi.", "chosen": "hi", "rejected": "hi"},  # unusable: skipped, replaced
        {"id": "conv", "prompt": [
            {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image", "image": "b.png"}]}],
         "chosen": "A rectangle.", "rejected": "A circle."},
    ]
    path = media_dir / "pairs.json"
    path.write_text(json.dumps(pairs))
    for model_type in ("qwen2_vl", "qwen3_vl"):
        ds = PairDataset(path, _processor(model_type), _media(model_type, nframes=4, video_max_pixels=64 * 64),
                         max_seq_length=4096, image_folder=str(media_dir))
        encoded = _encoded(ds)
        assert encoded[3] == encoded[4]  # the unusable pair is replaced by the next one
        assert estimate_lengths(ds).lengths == encoded
    short = PairDataset(path, _processor("qwen2_vl"), _media("qwen2_vl", nframes=4, video_max_pixels=64 * 64),
                        max_seq_length=sorted(encoded)[1] // 2, image_folder=str(media_dir))
    assert estimate_lengths(short).lengths == _encoded(short)  # sequences beyond the limit skip their pairs


def test_classification_estimate_truncates_like_the_encoder(media_dir):
    write_image(media_dir / "wide.png", (333, 121), seed=3)
    records = [{"id": "a", "image": "a.png", "prompt": "Which shape?", "label": 0},
               {"id": "w", "image": "wide.png", "prompt": "Which shape is this, " * 20, "label": 1},
               {"id": "t", "prompt": "No image here. " * 10, "label": 2},
               {"id": "v", "video": "clip.mp4", "prompt": "<video>\nWhich shape moves?", "label": 1}]
    path = media_dir / "cls.json"
    path.write_text(json.dumps(records))
    spec = LabelSpec("single_label", 3)
    lengths = None
    for max_seq_length in (4096, 60):
        ds = ClassificationDataset(path, _processor("qwen2_5_vl"),
                                   _media("qwen2_5_vl", nframes=4, video_max_pixels=64 * 64), spec=spec,
                                   max_seq_length=max_seq_length, image_folder=str(media_dir))
        encoded = _encoded(ds)
        assert estimate_lengths(ds).lengths == encoded
        if lengths is not None:
            assert encoded != lengths and max(encoded) <= 60  # the long prompts were cut
        lengths = encoded


def test_a_dataset_of_another_class_is_encoded(sized_data):
    class Custom(SFTDataset):
        pass

    ds = Custom(sized_data, _processor("qwen2_vl"), _media("qwen2_vl", nframes=4, video_max_pixels=64 * 64),
                max_seq_length=4096, image_folder=str(sized_data.parent))
    estimate = estimate_lengths(ds)
    assert not estimate.estimated and estimate.lengths == _encoded(ds)
    assert "measured by encoding" in estimate.summary()


# ------------------------------------------------------------------------------------------ token budget
def test_token_budget_batches_are_the_same_on_both_paths(sized_data, capsys):
    ds = _sft("qwen3_vl", sized_data, nframes=4, video_max_pixels=64 * 64, image_max_pixels=160 * 120)
    estimated, encoded = example_lengths(ds), example_lengths(ds, estimate=False)
    assert "estimated from media headers" in capsys.readouterr().out
    assert estimated == encoded == encoded_lengths(ds, num_workers=1)
    budget = max(estimated) + min(estimated)
    for seed in (0, 1):
        a = list(TokenBudgetBatchSampler(estimated, budget, seed=seed))
        b = list(TokenBudgetBatchSampler(encoded, budget, seed=seed))
        assert a == b and 1 < len(a) < len(ds)


def test_build_loader_estimates_in_workers(sized_data, capsys):
    """The token-budget loader measures by estimate (in a worker here) and its micro-batches hold the encoded
    lengths within the budget."""
    from vltrain.config import DataConfig

    ds = _sft("qwen2_5_vl", sized_data, nframes=4, video_max_pixels=64 * 64)
    lengths = _encoded(ds)
    budget = max(lengths) + min(lengths)
    data_cfg = DataConfig(num_workers=1, packing=True, max_tokens_per_batch=budget, max_seq_length=16)
    loader = build_loader(ds, data_cfg, ds.processor, tiny_config("qwen2_5_vl"), micro_batch_size=1, shuffle=True)
    assert f"lengths of {len(ds)} samples estimated from media headers" in capsys.readouterr().out
    length_of = dict(zip((c.sample_id for c in ds.conversations), lengths))
    seen = []
    for batch in loader:
        assert batch["input_ids"].shape[1] == sum(length_of[i] for i in batch["id"]) <= budget
        seen += batch["id"]
    assert sorted(seen) == sorted(length_of)


def test_large_jpegs_estimate_fast(tmp_path):
    """20 JPEGs of 1280x960: the estimate equals the encoded lengths; both timings printed (not asserted; the
    200-image comparison is `python benchmarks/bench_data.py --lengths_only`)."""
    records = []
    for k in range(20):
        write_image(tmp_path / f"{k}.jpg", (1280, 960), seed=k)
        records.append({"id": str(k), "image": f"{k}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe." + " more" * k}, {"from": "gpt", "value": "noise"}]})
    path = tmp_path / "big.json"
    path.write_text(json.dumps(records))
    ds = _sft("qwen2_5_vl", path, max_seq_length=8192)
    start = time.perf_counter()
    estimated = example_lengths(ds)
    middle = time.perf_counter()
    encoded = example_lengths(ds, estimate=False)
    end = time.perf_counter()
    print(f"20 JPEGs 1280x960: estimate {middle - start:.3f}s, encode {end - middle:.3f}s")
    assert estimated == encoded and min(encoded) > 1000  # ~1,500 image tokens each: no pixel limit shrank them
