"""The data layer end to end: skip records through DataLoader workers, the skip ledger, truncation records and
extra fields through both collators, datasets built from parsed conversations, the rope index from the family table."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from vltrain.data.dataset import PadCollator, SFTDataset
from vltrain.data.formats import DataFormatError, load_conversations, parse_record
from vltrain.data.media import MediaOptions
from vltrain.data.packing import PackCollator, RopeIndex
from vltrain.data.skips import SkipLedger, TooManySkips
from vltrain.families import FAMILIES, family_spec
from vltrain.tiny import build_tiny_processor, tiny_config

from conftest import mixed_records

MEDIA = MediaOptions(image_factor=28, image_max_pixels=64 * 64 * 2, video_max_pixels=64 * 64, nframes=4)


class RefusesMarked:
    """The tiny processor, raising (as a real processor can) on any text holding `marker`."""

    def __init__(self, processor, marker: str):
        self.processor, self.marker = processor, marker

    def __call__(self, *, text, **kwargs):
        if self.marker in text[0]:
            raise RuntimeError("the processor refused this sample")
        return self.processor(text=text, **kwargs)

    def __getattr__(self, name):
        if name in ("processor", "marker"):  # during unpickling
            raise AttributeError(name)
        return getattr(self.processor, name)


def _records():
    text, img, _, vid = mixed_records()
    return [
        {**text, "reward": 1.0},
        {**img, "pair_id": "p1"},
        {"id": "missing", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]},
        {"id": "boom", "conversations": [{"from": "human", "value": "BOOM"}, {"from": "gpt", "value": "y"}]},
        {"id": "long", "image": "a.png", "conversations": [  # the image lies beyond max_seq_length
            {"from": "human", "value": "word " * 300 + "<image>"}, {"from": "gpt", "value": "y"}]},
        {**vid, "reward": 0.0},
        {"id": "cut", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "More?"}, {"from": "gpt", "value": "word " * 300}]},
    ]


@pytest.fixture
def bad_data(media_dir):
    path = media_dir / "bad.json"
    path.write_text(json.dumps(_records()))
    return path


def _dataset(path, media_dir):
    processor = RefusesMarked(build_tiny_processor("qwen2_vl"), "BOOM")
    return SFTDataset(path, processor, MEDIA, max_seq_length=200, image_folder=str(media_dir))


def _collator(kind, processor):
    if kind == "pad":
        return PadCollator(processor.tokenizer.pad_token_id)
    return PackCollator(tiny_config("qwen2_vl", processor.tokenizer))


@pytest.mark.parametrize("kind", ["pad", "pack"])
def test_skips_truncations_and_extra_fields_reach_the_batch_through_a_worker(kind, bad_data, media_dir):
    ds = _dataset(bad_data, media_dir)
    loader = DataLoader(ds, batch_size=4, num_workers=1, collate_fn=_collator(kind, ds.processor))
    first, second = list(loader)
    # ds[2] skips 2 (missing media), 3 (processor error), 4 (media beyond max_seq_length) and returns 5;
    # ds[3] skips 3 and 4; ds[4] skips 4
    reasons = {r["id"]: r["reason"] for r in first["skipped"]}
    assert [(r["index"], r["id"]) for r in first["skipped"]] == [(2, "missing"), (3, "boom"), (4, "long"),
                                                                 (3, "boom"), (4, "long")]
    assert {r["file"] for r in first["skipped"] + second["skipped"]} == {str(bad_data)}
    assert "nope.png" in reasons["missing"] and "processor refused" in reasons["boom"]
    assert "max_seq_length=200" in reasons["long"]
    assert [(r["index"], r["id"]) for r in second["skipped"]] == [(4, "long")]
    assert first["id"] == ["text", "img", "vid", "vid"] and second["id"] == ["vid", "vid", "cut"]
    assert first["reward"] == [1.0, None, 0.0, 0.0] and first["pair_id"] == [None, "p1", None, None]
    assert first["truncated"] == []
    [cut] = second["truncated"]
    assert cut["file"] == str(bad_data) and (cut["index"], cut["id"]) == (6, "cut")
    assert cut["tokens_before"] > 200 and cut["tokens_after"] < 200
    rows = first["input_ids"].shape[0]
    assert rows == (4 if kind == "pad" else 1) and first["video_grid_thw"].shape == (2, 3)

    ledger = SkipLedger(0.5, len(ds))  # as the loop does it: one ledger, every micro-batch's records
    for batch in (first, second):
        ledger.add(batch["skipped"])
    assert ledger.count == 3 and sorted(ledger.ids) == ["boom", "long", "missing"]
    with pytest.raises(TooManySkips, match="3 of 7 samples skipped"):
        SkipLedger(0.4, len(ds)).add(first["skipped"])


def test_ledger_counts_distinct_samples_and_raises_past_the_fraction():
    def record(i):
        return {"file": "train.json", "index": i, "id": f"s{i}", "reason": f"reason {i}"}

    ledger = SkipLedger(0.1, 30)  # up to 3 samples
    ledger.add([record(0), record(1)])
    ledger.add([record(0), record(1), record(2)])  # a second epoch skips the same samples again
    assert ledger.count == 3 and ledger.ids == ["s0", "s1", "s2"]
    summary = ledger.summary()
    assert summary["num_skipped"] == 3 and summary["fraction"] == pytest.approx(0.1)
    assert summary["records"] == [record(0), record(1), record(2)] and summary["max_bad_fraction"] == 0.1
    with pytest.raises(TooManySkips) as info:
        ledger.add([record(7)])
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    for part in ("4 of 30", "13.3%", "max_bad_fraction=0.1", "'s0': reason 0", "'s2': reason 2"):
        assert part in message, part
    assert "s7" not in message  # the first few only
    SkipLedger(0.0, 5).add([])
    with pytest.raises(TooManySkips):
        SkipLedger(0.0, 5).add([record(0)])
    for bad in ((1.5, 10), (-0.1, 10), (0.1, 0)):
        with pytest.raises(ValueError):
            SkipLedger(*bad)


def test_dataset_from_parsed_conversations(media_dir, mixed_data):
    processor = build_tiny_processor("qwen2_vl")
    records = [{**r, "label": i} for i, r in enumerate(mixed_records())]
    conversations = [parse_record(r, i + 10) for i, r in enumerate(records)]  # validated before any model exists
    ds = SFTDataset(conversations[1:], processor, MEDIA, max_seq_length=1024, image_folder=str(media_dir),
                    source="eval.jsonl")
    from_file = SFTDataset(mixed_data, processor, MEDIA, max_seq_length=1024, image_folder=str(media_dir))
    assert len(ds) == 3 and ds.conversations[0].source == "eval.jsonl" and ds.conversations[0].index == 11
    example = ds[0]
    assert example["id"] == "img" and example["label"] == 1 and example["skipped"] == []
    assert torch.equal(example["input_ids"], from_file[1]["input_ids"])
    assert torch.equal(example["labels"], from_file[1]["labels"])
    assert PadCollator(processor.tokenizer.pad_token_id)([ds[0], ds[2]])["label"] == [1, 3]

    prompt = parse_record({"id": "q", "conversations": [{"from": "human", "value": "Hi"}]}, 4, "p.json",
                          require_reply=False)
    with pytest.raises(DataFormatError, match=r"p.json: sample 4 \(id='q'\): ends with a user turn"):
        SFTDataset([prompt], processor, MEDIA, max_seq_length=1024)
    clash = media_dir / "clash.json"
    clash.write_text(json.dumps([{**mixed_records()[0], "labels": [0, 1]}]))
    with pytest.raises(DataFormatError, match=r"clash.json: sample 0 \(id='text'\): field 'labels'"):
        SFTDataset(clash, processor, MEDIA, max_seq_length=1024)
    with pytest.raises(DataFormatError, match="no conversations"):
        SFTDataset([], processor, MEDIA, max_seq_length=1024, source="x.json")


def test_conversations_keep_extra_fields_from_a_file(tmp_path):
    path = tmp_path / "g.jsonl"
    rows = [{"id": "a", "messages": [{"role": "user", "content": "2+2?"}], "answer": "4", "solution_steps": [1, 2]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    [conv] = load_conversations(path, require_reply=False)
    assert conv.extra == {"answer": "4", "solution_steps": [1, 2]} and conv.source == str(path)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_rope_index_class_comes_from_the_family_table_and_pickles(model_type):
    config = tiny_config(model_type)
    rope = RopeIndex(config)
    assert rope.class_path == family_spec(model_type).rope_index_model
    assert rope.class_path.startswith(f"transformers.models.{model_type}.modeling_{model_type}:")
    n = 12
    example = {"input_ids": torch.arange(n), "mm_token_type_ids": torch.zeros(n, dtype=torch.long)}
    copy = pickle.loads(pickle.dumps(rope))
    assert copy._inner is None  # the weightless instance is rebuilt in the worker, not pickled
    torch.testing.assert_close(copy(example), torch.arange(n).expand(3, n), atol=0, rtol=0)  # text: T=H=W


def test_collators_keep_unknown_keys_in_sample_order():
    def example(n, **extra):
        return {"input_ids": torch.arange(n), "labels": torch.arange(n),
                "mm_token_type_ids": torch.zeros(n, dtype=torch.long),
                "skipped": [], "truncated": [], **extra}

    examples = [example(3, id="a", score=0.5), example(5, id="b", group=[1, 2]), example(2, id="c", score=None)]
    for batch in (PadCollator(0)(examples), PackCollator(tiny_config("qwen2_vl"))(examples)):
        assert batch["id"] == ["a", "b", "c"]
        assert batch["score"] == [0.5, None, None] and batch["group"] == [None, [1, 2], None]
        assert batch["skipped"] == [] and batch["truncated"] == []
        assert all(torch.is_tensor(batch[k]) for k in ("input_ids", "labels", "mm_token_type_ids"))


@pytest.mark.parametrize("pin", [True, False])
def test_batches_are_pinned_on_cuda_and_copied_without_blocking(pin, mixed_data, media_dir, monkeypatch):
    """data.pin_memory (default true) pins the loader's batches when CUDA is there (never on CPU), and the
    Accelerator copies them with non_blocking=True: a pageable copy would make the host wait for the GPU."""
    from vltrain.config import DataConfig, TrainConfig
    from vltrain.data.loader import build_loader
    from vltrain.distributed import build_accelerator

    processor = build_tiny_processor("qwen2_vl")
    dataset = SFTDataset(mixed_data, processor, MediaOptions(image_factor=28, image_max_pixels=64 * 64 * 2,
                                                             video_max_pixels=64 * 64, nframes=4),
                         max_seq_length=1024, image_folder=str(media_dir))
    data = DataConfig(train_path=str(mixed_data), image_folder=str(media_dir), num_workers=0, pin_memory=pin)
    config = tiny_config("qwen2_vl", processor.tokenizer)
    assert build_loader(dataset, data, processor, config, micro_batch_size=2, shuffle=False).pin_memory is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build_loader(dataset, data, processor, config, micro_batch_size=2, shuffle=False).pin_memory is pin
    monkeypatch.undo()
    accelerator = build_accelerator(TrainConfig(output_dir=str(media_dir / "out"), report_to="none"))
    assert accelerator.dataloader_config.non_blocking is True
