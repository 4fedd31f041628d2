"""The classification data layer: records and labels, the dataset on a tiny processor (image, multi-image, video,
text-only, skips, truncation), the collator padded and packed, the class-balanced sampler, the synthetic set."""

from __future__ import annotations

import functools
import json
import pickle
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vltrain import synthetic
from vltrain.data.formats import DataFormatError
from vltrain.data.labels import (DEFAULT_PROMPT, ClassBalancedSampler, ClassificationDataset, ClsCollator, LabelSpec,
                                 label_counts, load_cls_records, parse_label)
from vltrain.data.loader import build_loader, resolve_synthetic_data
from vltrain.data.media import MediaOptions
from vltrain.synthetic import COLOURS, SHAPES, write_shape_classes
from vltrain.tiny import build_tiny_processor, tiny_config

MEDIA = MediaOptions(image_factor=28, image_max_pixels=64 * 64 * 2, video_max_pixels=64 * 64, nframes=4)
SHAPE_SPEC = LabelSpec("single_label", 3, ("circle", "square", "triangle"))
UPSTREAM = {"id": "06bc8b5e", "image": "image_2.jpg", "prompt": "Question: What is in the image? \n Options: ...",
            "label": "3"}


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


def _parts(conv):
    return [(p.kind, p.value) for t in conv.turns for p in t.parts]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor("qwen2_vl")


# ------------------------------------------------------------------------------------------ records
def test_the_upstream_record_loads_unchanged(tmp_path):
    [conv] = load_cls_records(_write(tmp_path / "up.json", [UPSTREAM]), LabelSpec("single_label", 5), "unused")
    assert conv.sample_id == "06bc8b5e" and not conv.has_reply and [t.role for t in conv.turns] == ["user"]
    assert _parts(conv) == [("image", "image_2.jpg"), ("text", UPSTREAM["prompt"])]
    assert conv.extra == {"target": 3}


def test_class_names_map_by_the_classes_list_and_the_default_prompt_applies(tmp_path):
    spec = LabelSpec("single_label", 3, ["cat", "dog", "7"])  # a list from YAML becomes a tuple
    records = [{"id": "a", "image": ["x.png", "y.png"], "label": "dog", "note": "kept"},
               {"id": "b", "label": "7"},  # a class NAMED "7" wins over the (out of range) id 7
               {"id": "c", "label": "2"},  # no class named "2": the id
               {"id": "d", "video": "v.mp4", "prompt": "Look: <video> which?", "label": 0}]
    a, b, c, d = load_cls_records(_write(tmp_path / "names.jsonl", records), spec, "Which animal?")
    assert spec.classes == ("cat", "dog", "7") and spec.name(1) == "dog"
    assert LabelSpec("single_label", 3).name(1) == "1"
    assert [conv.extra["target"] for conv in (a, b, c, d)] == [1, 2, 2, 0]
    assert _parts(a) == [("image", "x.png"), ("image", "y.png"), ("text", "Which animal?")]
    assert a.extra == {"note": "kept", "target": 1}
    assert _parts(b) == [("text", "Which animal?")]
    assert _parts(d) == [("text", "Look: "), ("video", "v.mp4"), ("text", " which?")]


@pytest.mark.parametrize("label", [3, -1, "fish", "-1", True, None, 1.5, [0], {"id": 1}])
def test_a_label_outside_the_classes_names_the_file_sample_and_value(tmp_path, label):
    path = _write(tmp_path / "bad.json", [{"id": "ok", "label": 0}, {"id": "b1", "image": "a.png", "label": label}])
    with pytest.raises(DataFormatError) as error:
        load_cls_records(path, SHAPE_SPEC, DEFAULT_PROMPT)
    message = str(error.value)
    assert f"{path}: sample 1 (id='b1')" in message and repr(label) in message


def test_missing_label_and_reserved_fields_are_errors(tmp_path):
    cases = [({"id": "m", "prompt": "x"}, "missing field 'label'"),
             ({"id": "m", "prompt": "x", "labels": 1}, "name the class label 'label'"),
             ({"id": "m", "prompt": "x", "label": 1, "labels": 1}, "name the class label 'label'"),
             ({"id": "m", "prompt": "x", "label": 1, "target": 2}, "field 'target' would overwrite"),
             ({"id": "m", "prompt": "x", "label": 1, "input_ids": [1]}, "field 'input_ids' would overwrite"),
             ({"id": "m", "prompt": 3, "label": 1}, "field 'prompt' must be a string"),
             ({"id": "m", "prompt": "<image><image>", "image": "a.png", "label": 1}, "prompt: more <image>")]
    for record, expected in cases:
        with pytest.raises(DataFormatError, match=rf"r.json: sample 0 \(id='m'\):? .*{expected}"):
            load_cls_records(_write(tmp_path / "r.json", [record]), SHAPE_SPEC, DEFAULT_PROMPT)


def test_conversation_and_messages_records_are_prompt_only(tmp_path):
    records = [{"id": "c", "image": "a.png", "label": "square", "conversations": [
                   {"from": "human", "value": "Name the shape."}]},
               {"id": "m", "label": 2, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
                   {"type": "image", "image": "b.png"}, {"type": "text", "text": "Shape?"}]}]}]
    c, m = load_cls_records(_write(tmp_path / "conv.json", records), SHAPE_SPEC, DEFAULT_PROMPT)
    assert _parts(c) == [("image", "a.png"), ("text", "Name the shape.")] and c.extra == {"target": 1}
    assert [t.role for t in m.turns] == ["system", "user"] and m.images == ["b.png"] and m.extra == {"target": 2}
    replied = {"id": "r", "label": 0, "conversations": [{"from": "human", "value": "Shape?"},
                                                        {"from": "gpt", "value": "circle"}]}
    with pytest.raises(DataFormatError, match=r"sample 0 \(id='r'\): a classification record's conversation must "
                                              "end with the user turn"):
        load_cls_records(_write(tmp_path / "reply.json", [replied]), SHAPE_SPEC, DEFAULT_PROMPT)
    both = {"id": "p", "label": 0, "prompt": "x", "conversations": [{"from": "human", "value": "y"}]}
    with pytest.raises(DataFormatError, match="both 'prompt' and 'conversations'"):
        load_cls_records(_write(tmp_path / "both.json", [both]), SHAPE_SPEC, DEFAULT_PROMPT)


def test_multi_label_and_regression_parsing():
    multi = LabelSpec("multi_label", 3, ("cat", "dog", "bird"))
    assert parse_label([0, 2], multi, "w") == [1.0, 0.0, 1.0]
    assert parse_label(["bird", "cat", "cat"], multi, "w") == [1.0, 0.0, 1.0]
    assert parse_label([0, 1, 1], multi, "w") == [0.0, 1.0, 1.0]  # length num_labels, 0/1 only: the vector
    assert parse_label([], multi, "w") == [0.0, 0.0, 0.0]
    assert parse_label(["1"], LabelSpec("multi_label", 3), "w") == [0.0, 1.0, 0.0]
    for bad in ("cat", 1, [3], ["fish"], [True], [None]):
        with pytest.raises(DataFormatError, match=r"^at x: .*label"):
            parse_label(bad, multi, "at x")
    regression = LabelSpec("regression", 1)
    assert parse_label(2.5, regression, "w") == 2.5 and parse_label(3, regression, "w") == 3.0
    assert parse_label("-0.75", regression, "w") == -0.75 and isinstance(parse_label(3, regression, "w"), float)
    for bad in ("x", True, None, float("nan"), float("inf"), [1.0]):
        with pytest.raises(DataFormatError, match=r"^at x: label"):
            parse_label(bad, regression, "at x")


def test_label_spec_is_validated():
    for args in [("ordinal", 3), ("single_label", 1), ("regression", 2), ("multi_label", 0),
                 ("single_label", 3, ("a", "b")), ("single_label", 2, ("a", "a")), ("regression", 1, ("a",))]:
        with pytest.raises(ValueError):
            LabelSpec(*args)


def test_label_counts():
    spec = LabelSpec("single_label", 4)
    convs = [SimpleNamespace(extra={"target": t}) for t in (0, 2, 2, 3, 2)]
    assert label_counts(convs, spec) == [1, 0, 3, 1]
    multi = [SimpleNamespace(extra={"target": t}) for t in ([1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0])]
    assert label_counts(multi, LabelSpec("multi_label", 3)) == [2, 1, 1]
    with pytest.raises(ValueError, match="regression"):
        label_counts(convs, LabelSpec("regression", 1))


# ------------------------------------------------------------------------------------------ dataset
def _cls_records():
    return [{"id": "img", "image": "a.png", "prompt": "Question: what? \n Options: circle, square", "label": "square"},
            {"id": "multi", "image": ["a.png", "b.png"], "label": 2, "split": "x"},  # default prompt
            {"id": "vid", "video": "clip.mp4", "prompt": "<video>\nWhich shape moves?", "label": "circle"},
            {"id": "text", "prompt": "A round thing.", "label": 0},
            {"id": "missing", "image": "nope.png", "label": 1},
            {"id": "after", "prompt": "Square.", "label": 1}]


@pytest.fixture
def cls_data(media_dir):
    return _write(media_dir / "cls.json", _cls_records())


def _dataset(path, processor, media_dir, **kwargs):
    return ClassificationDataset(path, processor, MEDIA, spec=SHAPE_SPEC, image_folder=str(media_dir),
                                 **{"max_seq_length": 1024} | kwargs)


def _count(ids: torch.Tensor, token: int) -> int:
    return int((ids == token).sum())


def test_image_multi_image_video_and_text_records_encode(cls_data, media_dir, processor):
    ds = _dataset(cls_data, processor, media_dir, default_prompt="Which shape is it?")
    tokenizer = processor.tokenizer
    image_pad, video_pad = (tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>"))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    img, multi, vid, text = (ds[i] for i in range(4))
    assert [e["id"] for e in (img, multi, vid, text)] == ["img", "multi", "vid", "text"]
    assert [e["target"] for e in (img, multi, vid, text)] == [1, 2, 0, 0] == ds.targets()[:4]
    assert multi["split"] == "x" and all(e["skipped"] == [] and e["truncated"] == [] for e in (img, multi, text))
    assert "labels" not in img and "label" not in img
    for example, num_images in ((img, 1), (multi, 2)):
        grid = example["image_grid_thw"]
        assert grid.shape == (num_images, 3) and example["pixel_values"].shape[0] == int(grid.prod(-1).sum())
        assert _count(example["input_ids"], image_pad) == int(grid.prod(-1).sum()) // 4  # merge 2x2
    assert "Which shape is it?" in tokenizer.decode(multi["input_ids"])
    assert "Options: circle, square" in tokenizer.decode(img["input_ids"])
    assert vid["video_grid_thw"].shape == (1, 3) and _count(vid["input_ids"], video_pad) > 0
    assert "pixel_values" not in vid and _count(vid["input_ids"], image_pad) == 0
    assert not any(key in text for key in ("pixel_values", "pixel_values_videos"))
    assert "A round thing." in tokenizer.decode(text["input_ids"])
    for example in (img, multi, vid, text):  # the prompt turn closes; no generation header follows
        assert example["input_ids"][-2] == im_end and not tokenizer.decode(example["input_ids"]).endswith(
            "assistant\n")
        assert example["mm_token_type_ids"].shape == example["input_ids"].shape


def test_missing_media_is_a_counted_skip_and_media_beyond_the_limit_too(cls_data, media_dir, processor):
    ds = _dataset(cls_data, processor, media_dir)
    replacement = ds[4]
    assert replacement["id"] == "after" and replacement["target"] == 1
    [record] = replacement["skipped"]
    assert record["id"] == "missing" and record["index"] == 4 and record["file"] == str(cls_data)
    assert "nope.png" in record["reason"]

    short = _dataset(cls_data, processor, media_dir, max_seq_length=12)
    first = short[0]  # the image does not fit in 12 tokens: skipped, replaced by the next usable sample
    assert first["id"] == "text" and [r["id"] for r in first["skipped"]] == ["img", "multi", "vid"]
    assert len(first["input_ids"]) == 12 and first["truncated"][0]["tokens_after"] == 12
    assert first["truncated"][0]["tokens_before"] == len(ds[3]["input_ids"]) > 12
    assert torch.equal(first["input_ids"], ds[3]["input_ids"][:12])  # text is cut from the end


def test_dataset_from_conversations_needs_parsed_targets(cls_data, media_dir, processor):
    convs = load_cls_records(cls_data, SHAPE_SPEC, DEFAULT_PROMPT)
    ds = ClassificationDataset(convs[3:4], processor, MEDIA, spec=SHAPE_SPEC, max_seq_length=1024)
    assert ds[0]["id"] == "text" and ds.targets() == [0]
    from vltrain.data.formats import parse_record

    bare = parse_record({"id": "q", "conversations": [{"from": "human", "value": "Hi"}]}, 0, "q.json",
                        require_reply=False)
    with pytest.raises(DataFormatError, match=r"q.json: sample 0 \(id='q'\): no parsed 'target'"):
        ClassificationDataset([bare], processor, MEDIA, spec=SHAPE_SPEC, max_seq_length=1024)
    with pytest.raises(DataFormatError, match=r"sample 3 \(id='text'\): target 0 is not a multi_label target"):
        ClassificationDataset(convs[3:4], processor, MEDIA, spec=LabelSpec("multi_label", 3), max_seq_length=1024)


# ------------------------------------------------------------------------------------------ collator
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_collator_batches_targets_and_keeps_ids(cls_data, media_dir, processor, packing):
    ds = _dataset(cls_data, processor, media_dir)
    examples = [ds[i] for i in (0, 1, 3, 4)]  # image, two images, text, the replacement carrying a skip record
    collator = pickle.loads(pickle.dumps(ClsCollator(tiny_config("qwen2_vl", processor.tokenizer), packing=packing,
                                                     pad_token_id=processor.tokenizer.pad_token_id,
                                                     problem_type="single_label")))
    batch = collator(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["id"] == ["img", "multi", "text", "after"] and batch["split"] == [None, "x", None, None]
    assert batch["target"].dtype == torch.int64 and batch["target"].tolist() == [1, 2, 0, 1]
    assert [r["id"] for r in batch["skipped"]] == ["missing"] and "labels" not in batch
    assert batch["image_grid_thw"].shape == (3, 3)
    if packing:
        assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(lengths))
        positions = batch["position_ids"]
        assert positions.shape == (4, 1, sum(lengths))
        starts = (positions[0, 0] == 0).nonzero().flatten().tolist()
        assert len(starts) == len(batch["id"]) and starts == [sum(lengths[:k]) for k in range(len(lengths))]
        assert torch.equal(batch["input_ids"][0], torch.cat([e["input_ids"] for e in examples]))
    else:
        assert batch["input_ids"].shape == (4, max(lengths))
        assert batch["attention_mask"].sum(-1).tolist() == lengths


def test_collator_target_dtypes_for_multi_label_and_regression():
    def example(target, n):
        return {"id": str(n), "input_ids": torch.arange(1, n + 1), "mm_token_type_ids": torch.zeros(n, dtype=torch.long),
                "target": target}

    multi = ClsCollator(None, packing=False, pad_token_id=0, problem_type="multi_label")
    batch = multi([example([1.0, 0.0, 1.0], 3), example([0.0, 1.0, 0.0], 5)])
    assert batch["target"].dtype == torch.float32 and batch["target"].tolist() == [[1, 0, 1], [0, 1, 0]]
    regression = ClsCollator(None, packing=False, pad_token_id=0, problem_type="regression")
    batch = regression([example(0.5, 3), example(-2.0, 2)])
    assert batch["target"].dtype == torch.float32 and batch["target"].shape == (2,)
    assert batch["target"].tolist() == [0.5, -2.0]
    with pytest.raises(ValueError, match="problem_type"):
        ClsCollator(None, packing=False, pad_token_id=0, problem_type="ordinal")


# ------------------------------------------------------------------------------------------ sampler
def test_class_balanced_sampler_evens_out_a_9_to_1_imbalance():
    targets = [0] * 900 + [1] * 100
    sampler = ClassBalancedSampler(targets, seed=3)
    draws = []
    for epoch in range(5):
        sampler.set_epoch(epoch)
        draws += list(sampler)
    assert len(sampler) == 1000 and len(draws) == 5000
    rare = sum(targets[i] for i in draws) / len(draws)
    assert abs(rare - 0.5) < 0.03, rare  # 5000 draws: std 0.007
    assert len(set(draws[:1000])) < 1000  # with replacement


def test_class_balanced_sampler_is_deterministic_in_seed_and_epoch():
    targets = [0] * 90 + [1] * 10
    a, b = ClassBalancedSampler(targets, seed=7), ClassBalancedSampler(targets, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    first = list(a)
    assert first == list(b) and first == list(a)  # the same draw however often it is iterated
    b.set_epoch(3)
    assert list(b) != first
    assert list(ClassBalancedSampler(targets, seed=8)) != list(ClassBalancedSampler(targets, seed=7))


def test_ranks_shard_one_balanced_draw():
    """Each rank builds its own sampler (same seed); accelerate's shards of its batches partition one draw."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    targets = [0] * 45 + [1] * 5 + [2] * 14
    full = ClassBalancedSampler(targets, seed=5)
    full.set_epoch(1)
    batches = list(BatchSampler(full, batch_size=4, drop_last=False))
    shards = []
    for rank in range(2):
        sampler = ClassBalancedSampler(targets, seed=5)
        sampler.set_epoch(1)
        shards.append(list(BatchSamplerShard(BatchSampler(sampler, 4, False), num_processes=2, process_index=rank)))
    assert shards[0] == batches[0::2] and shards[1] == batches[1::2]


def test_class_balanced_sampler_multi_label_uses_the_rarest_positive_label():
    # label 0 on every sample, label 1 on 10 of them: the 10 draw like one class, the other 90 like the other
    targets = [[1.0, 0.0]] * 90 + [[1.0, 1.0]] * 10
    sampler = ClassBalancedSampler(targets, seed=0)
    assert sampler.groups[:90] == [0] * 90 and sampler.groups[90:] == [1] * 10
    draws = list(sampler)
    assert abs(sum(i >= 90 for i in draws) / len(draws) - 0.5) < 0.15
    with pytest.raises(ValueError, match="regression"):
        ClassBalancedSampler([0.5, 1.5])


def test_build_loader_draws_through_the_sampler(cls_data, media_dir, processor):
    ds = _dataset(cls_data, processor, media_dir)
    sampler = ClassBalancedSampler(ds.targets(), seed=1)
    data_cfg = SimpleNamespace(packing=False, num_workers=0, max_tokens_per_batch=0)
    collator = ClsCollator(None, packing=False, pad_token_id=processor.tokenizer.pad_token_id,
                           problem_type="single_label")
    loader = build_loader(ds, data_cfg, processor, None, micro_batch_size=3, shuffle=True, collate_fn=collator,
                          sampler=sampler)
    ids = [i for batch in loader for i in batch["id"]]
    expected = [ds.conversations[i].sample_id for i in sampler]
    expected = ["after" if i == "missing" else i for i in expected]  # the missing image is replaced
    assert ids == expected and len(ids) == len(ds)
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        build_loader(ds, SimpleNamespace(packing=False, num_workers=0, max_tokens_per_batch=512), processor, None,
                     micro_batch_size=3, shuffle=True, collate_fn=collator, sampler=sampler)


# ------------------------------------------------------------------------------------------ synthetic
def test_shape_classes_load_with_the_shape_names(tmp_path, monkeypatch):
    train_path, eval_path = write_shape_classes(tmp_path / "data", num_train=48, num_eval=24, image_size=28)
    records = json.loads(train_path.read_text())
    assert all(set(r) == {"id", "image", "label"} for r in records)
    convs = load_cls_records(train_path, SHAPE_SPEC, DEFAULT_PROMPT)
    assert label_counts(convs, SHAPE_SPEC) == [16, 16, 16]
    assert label_counts(load_cls_records(eval_path, SHAPE_SPEC, DEFAULT_PROMPT), SHAPE_SPEC) == [8, 8, 8]
    assert all(_parts(c) == [("image", r["image"]), ("text", DEFAULT_PROMPT)] for c, r in zip(convs, records))
    assert [SHAPE_SPEC.name(c.extra["target"]) for c in convs] == [r["label"] for r in records]
    # every (shape, colour) pair equally often; the shape covers the image centre, drawn in its colour
    by_rgb = {rgb: name for name, rgb in COLOURS.items()}
    pairs = Counter()
    for r in records:
        with Image.open(train_path.parent / "images" / r["image"]) as image:
            pairs[r["label"], by_rgb[image.getpixel((14, 14))]] += 1
    assert pairs == {(shape, colour): 4 for shape in SHAPES for colour in COLOURS}

    small = functools.partial(write_shape_classes, num_train=12, num_eval=6, image_size=28)
    monkeypatch.setattr(synthetic, "write_shape_classes", small)
    data_cfg = SimpleNamespace(train_path="synthetic:shape_classes", eval_path=None, image_folder=None)
    resolve_synthetic_data(data_cfg, tmp_path / "run")
    assert data_cfg.train_path == str(tmp_path / "run" / "data" / "train.json")
    assert data_cfg.eval_path == str(tmp_path / "run" / "data" / "eval.json")
    assert data_cfg.image_folder == str(tmp_path / "run" / "data" / "images")
    assert label_counts(load_cls_records(data_cfg.train_path, SHAPE_SPEC, DEFAULT_PROMPT), SHAPE_SPEC) == [4, 4, 4]
    assert label_counts(load_cls_records(data_cfg.eval_path, SHAPE_SPEC, DEFAULT_PROMPT), SHAPE_SPEC) == [2, 2, 2]
