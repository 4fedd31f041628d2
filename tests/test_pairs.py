"""Preference pairs (vltrain.data.pairs): loading both record shapes, load-time errors, skipped pairs, the pair
encoding, and the pair collator's padded / packed layouts with unique pixels and per-occurrence grids."""

from __future__ import annotations

import functools
import json
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from vltrain.config import DataConfig
from vltrain.data.dataset import PadCollator
from vltrain.data.encode import IGNORE_INDEX, SampleSkipped
from vltrain.data.formats import DataFormatError, Part, Turn
from vltrain.data.loader import build_loader
from vltrain.data.media import MediaOptions
from vltrain.data.packing import example_lengths
from vltrain.data.pairs import PairCollator, PairDataset, expand_media, load_pairs, parse_pair, unique_grids
from vltrain.data.skips import SkipLedger
from vltrain.families import RopeIndex, family_spec
from vltrain.logprobs import sequence_ids
from vltrain.tiny import build_tiny, build_tiny_processor, tiny_config

from conftest import write_image

# The two records of the upstream README's "Example for DPO dataet", verbatim.
SEED_RECORDS = [
    {
        "id": "e4cd017f-3854-4019-9cc1-9dacacb5d424",
        "image": "example_0_0.png",
        "prompt": "<image>\nDescribe the key features of the image in great detail.",
        "chosen": "The image features a modern, multi-colored train parked on a train track, occupying a significant portion of the scene. The train has a unique and striking design, with red, white, and blue colors, as well as yellow accents. It appears to be a high-speed train, indicating its advanced engineering and potential for fast travel.\n\nThe train is situated next to a platform, suggesting that it may be at a train station. The overall scene conveys a sense of transportation and modern technology, with the vibrant and sleek train as the main subject.",  # noqa: E501
        "rejected": "The image features a modern, colorful train parked on a set of train tracks. The train has a striking design, with red, white, and blue colors as well as yellow accents. It appears to be a high-speed train, ready for departure.\n\nThe train spans a significant portion of the image, from the left to the right side. The train tracks can be seen clearly beneath the train, emphasizing its position on the railway line. The overall scene gives off an impression of a contemporary and efficient mode of transportation.",  # noqa: E501
    },
    {
        "id": "5e19e647-e5d3-4bcf-82e9-d262570743ae",
        "image": "example_1_0.png",
        "prompt": "<image>\nIs this bus in the USA?",
        "chosen": "Yes, based on the image, it can be assumed that this bus is in the USA. The location of the bus cannot be accurately determined.",  # noqa: E501
        "rejected": "No, it's not in the USA. The image does not provide specific information on where the bus is located. However, we can say that it's not in the United States.",  # noqa: E501
    },
]

VARIANTS = [
    {"id": "multi", "image": ["a.png", "b.png"], "prompt": "<image>\nFirst one.\n<image>\nWhich is wider?",
     "chosen": "The second one.", "rejected": "The first one."},
    {"id": "bare", "image": "a.png", "prompt": "What colour is it?", "chosen": "Noisy.", "rejected": "Blue."},
    {"id": "vid", "video": "clip.mp4", "prompt": "<video>\nWhat happens?", "chosen": "It gets brighter.",
     "rejected": "Nothing."},
    {"id": "text", "system": "Be brief.", "prompt": "Say hello.", "chosen": "hello", "rejected": "go away",
     "score": 0.5},
    {"id": "conv", "prompt": [
        {"role": "system", "content": "You describe shapes."},
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "image": "b.png"}]}],
     "chosen": "A wide rectangle.", "rejected": {"role": "assistant", "content": "A circle."}},
    {"id": "conv_list", "prompt": [{"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo!"}]}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
]


def _media(model_type="qwen2_vl"):
    return MediaOptions(image_factor=family_spec(model_type).image_factor, image_max_pixels=64 * 64 * 2,
                        video_max_pixels=64 * 64, nframes=4)


@functools.lru_cache(maxsize=None)
def _processor(model_type):
    return build_tiny_processor(model_type)


@functools.lru_cache(maxsize=None)
def _config(model_type):
    return tiny_config(model_type, _processor(model_type).tokenizer)


def _write(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


def _dataset(path, media_dir, model_type="qwen2_vl", **kwargs):
    kwargs.setdefault("max_seq_length", 1024)
    return PairDataset(path, _processor(model_type), _media(model_type), image_folder=str(media_dir), **kwargs)


def _parts(turn):
    return [(p.kind, p.value) for p in turn.parts]


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("jsonl", [False, True])
def test_every_seed_format_record_loads(tmp_path, jsonl):
    path = _write(tmp_path / ("dpo.jsonl" if jsonl else "dpo.json"), SEED_RECORDS + VARIANTS, jsonl)
    pairs = load_pairs(path)
    assert [p.sample_id for p in pairs] == [r["id"] for r in SEED_RECORDS + VARIANTS]
    assert all(p.prompt.source == str(path) for p in pairs) and [p.prompt.index for p in pairs] == list(range(8))
    assert all(p.prompt.turns[-1].role == "user" and not p.prompt.has_reply for p in pairs)
    train, bus, multi, bare, vid, text, conv, conv_list = pairs
    # upstream: the <image> placeholder and its newline become the image part
    assert [_parts(t) for t in train.prompt.turns] == [
        [("image", "example_0_0.png"), ("text", "Describe the key features of the image in great detail.")]]
    assert (train.chosen, train.rejected) == (SEED_RECORDS[0]["chosen"], SEED_RECORDS[0]["rejected"])
    assert bus.prompt.images == ["example_1_0.png"] and bus.chosen.startswith("Yes, based on the image")
    assert _parts(multi.prompt.turns[0]) == [("image", "a.png"), ("text", "First one."), ("image", "b.png"),
                                            ("text", "Which is wider?")]
    assert _parts(bare.prompt.turns[0]) == [("image", "a.png"), ("text", "What colour is it?")]  # media first
    assert _parts(vid.prompt.turns[0]) == [("video", "clip.mp4"), ("text", "What happens?")]
    assert [t.role for t in text.prompt.turns] == ["system", "user"] and text.prompt.extra == {"score": 0.5}
    assert text.prompt.images == [] and text.prompt.videos == []
    assert [t.role for t in conv.prompt.turns] == ["system", "user", "assistant", "user"]
    assert conv.prompt.images == ["a.png", "b.png"] and _parts(conv.prompt.turns[2]) == [("text", "A square.")]
    assert (conv.chosen, conv.rejected) == ("A wide rectangle.", "A circle.")
    assert (conv_list.chosen, conv_list.rejected) == ("Hello!", "Go away.")
    assert all(p.prompt.extra == {} for p in pairs if p.sample_id != "text")


GOOD = {"id": "ok", "prompt": "Hi", "chosen": "Hello.", "rejected": "Bye."}
MALFORMED = [
    ({"id": "x", "prompt": "Hi", "rejected": "no"}, r"missing field 'chosen'"),
    ({"id": "x", "chosen": "a", "rejected": "b"}, r"missing field 'prompt'"),
    ({"id": "x", "prompt": {"text": "Hi"}, "chosen": "a", "rejected": "b"}, r"field 'prompt' must be a string"),
    ({"id": "x", "prompt": "Hi", "chosen": 3, "rejected": "b"}, r"field 'chosen' must be a string or an assistant"),
    ({"id": "x", "prompt": "Hi", "chosen": "a", "rejected": {"role": "user", "content": "b"}},
     r"field 'rejected' has role='user'"),
    ({"id": "x", "prompt": "Hi", "chosen": [{"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}],
      "rejected": "b"}, r"field 'chosen': content\[0\] is a 'image' part"),
    ({"id": "x", "prompt": "Hi", "chosen": [{"role": "assistant", "content": "a"}] * 2, "rejected": "b"},
     r"field 'chosen' is a list of 2 messages"),
    ({"id": "x", "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
      "chosen": "a", "rejected": "b"}, r"field 'prompt' ends with an assistant turn"),
    ({"id": "x", "image": ["a.png", "b.png"], "prompt": "<image> Hi", "chosen": "a", "rejected": "b"},
     r"2 image\(s\) .* only 1 <image>"),
    ({"id": "x", "image": "a.png", "prompt": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"},
     r"field 'image' belongs to LLaVA records"),
    ({"id": "x", "prompt": [], "chosen": "a", "rejected": "b"}, r"'prompt' must be a non-empty list"),
    ({"id": "x", "prompt": [{"role": "user", "content": "Hi"}, {"text": "?"}], "chosen": "a", "rejected": "b"},
     r"prompt\[1\]: needs 'role' and 'content'"),
    ({"id": "x", "prompt": "", "chosen": "a", "rejected": "b"}, r"turn 0: empty user turn"),
    ({"id": "x", "conversations": [], "prompt": "Hi", "chosen": "a", "rejected": "b"},
     r"field 'conversations' does not belong to a preference pair"),
]


@pytest.mark.parametrize("record, match", MALFORMED)
def test_malformed_records_fail_at_load_naming_file_sample_and_field(tmp_path, record, match):
    path = _write(tmp_path / "bad.json", [GOOD, record])
    with pytest.raises(DataFormatError, match=rf"bad.json: sample 1 \(id='x'\).*{match}"):
        load_pairs(path)
    with pytest.raises(DataFormatError, match=match):  # the dataset loads up front: before any processor use
        PairDataset(path, None, _media(), max_seq_length=1024)


def test_dataset_refuses_replied_prompts_and_reserved_extra_fields(tmp_path):
    path = _write(tmp_path / "clash.json", [GOOD, {**GOOD, "id": "c", "labels": [1]}])
    with pytest.raises(DataFormatError, match=r"clash.json: sample 1 \(id='c'\): field 'labels'"):
        PairDataset(path, None, _media(), max_seq_length=1024)
    with pytest.raises(DataFormatError, match=r"field 'prompt_length'"):
        PairDataset([parse_pair({**GOOD, "prompt_length": 3}, 0)], None, _media(), max_seq_length=1024)
    with pytest.raises(DataFormatError, match="no preference pairs"):
        PairDataset([], None, _media(), max_seq_length=1024, source="x.json")
    pair = parse_pair(GOOD, 0)
    pair.prompt.turns.append(Turn("assistant", [Part("text", "Hello.")]))
    with pytest.raises(DataFormatError, match="prompt ends with an assistant turn"):
        PairDataset([pair], None, _media(), max_seq_length=1024)


BAD_PAIRS = [
    {"id": "good0", "image": "a.png", "prompt": "<image>\nWhat is it?", "chosen": "Noise.", "rejected": "A cat."},
    {"id": "empty_chosen", "prompt": "Hi", "chosen": "  \n", "rejected": "Bye."},
    {"id": "empty_rejected", "prompt": "Hi", "chosen": "Hello.", "rejected": {"role": "assistant", "content": ""}},
    {"id": "same", "prompt": "Hi", "chosen": " Hello.", "rejected": "Hello.\n"},
    {"id": "missing", "image": "nope.png", "prompt": "<image>\nWhat?", "chosen": "a", "rejected": "b"},
    {"id": "good5", "prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "score": 1.0},
]


def test_bad_pairs_are_skip_records_and_the_next_good_pair_is_returned(media_dir):
    path = _write(media_dir / "pairs.json", BAD_PAIRS)
    ds = _dataset(path, media_dir)  # loads: bad pairs are no format errors
    assert len(ds) == 6
    example = ds[1]
    assert example["id"] == "good5" and example["score"] == 1.0
    assert [(r["file"], r["index"], r["id"]) for r in example["skipped"]] == [
        (str(path), 1, "empty_chosen"), (str(path), 2, "empty_rejected"), (str(path), 3, "same"),
        (str(path), 4, "missing")]
    reasons = [r["reason"] for r in example["skipped"]]
    assert reasons[:3] == ["chosen is empty", "rejected is empty", "chosen and rejected are the same text"]
    assert "nope.png" in reasons[3]
    assert ds[0]["id"] == "good0" and ds[0]["skipped"] == []
    for i in (1, 2, 3):
        with pytest.raises(SampleSkipped, match=BAD_PAIRS[i]["id"]):
            ds.encode(i)  # no retry
    ledger = SkipLedger(1.0, len(ds))
    ledger.add(example["skipped"] + ds[3]["skipped"])  # counted once each
    assert sorted(ledger.ids) == ["empty_chosen", "empty_rejected", "missing", "same"]
    with pytest.raises(RuntimeError, match="3 consecutive samples from index 1"):
        _dataset(path, media_dir, max_consecutive_skips=3)[1]


def test_a_pair_too_long_for_max_seq_length_is_skipped(media_dir):
    path = _write(media_dir / "long.json", [{**GOOD, "id": "long", "chosen": "word " * 200}, GOOD])
    example = _dataset(path, media_dir, max_seq_length=100)[0]
    assert example["id"] == "ok" and example["skipped"][0]["id"] == "long"
    assert "max_seq_length=100" in example["skipped"][0]["reason"]


# ------------------------------------------------------------------------------------------ encoding
def _segments(labels, input_ids):
    spans, current = [], []
    for label, token in zip(labels.tolist(), input_ids.tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.fixture
def image_loads(monkeypatch):
    import vltrain.data.encode as encode_module

    calls = []
    real = encode_module.load_image
    monkeypatch.setattr(encode_module, "load_image", lambda ref, opts: calls.append(ref) or real(ref, opts))
    return calls


def test_encode_labels_only_the_completions_and_shares_the_prompt(media_dir, image_loads):
    path = _write(media_dir / "pairs.json", VARIANTS)
    ds = _dataset(path, media_dir, system_prompt="Answer briefly.")
    tok = ds.processor.tokenizer
    for i, pair in enumerate(ds.pairs):
        image_loads.clear()
        example = ds.encode(i)
        assert len(image_loads) == len(pair.prompt.images)  # the prompt's media loaded once for both sequences
        n = example["prompt_length"]
        chosen, rejected = example["chosen"], example["rejected"]
        assert torch.equal(chosen["input_ids"][:n], rejected["input_ids"][:n])
        assert torch.equal(chosen["mm_token_type_ids"][:n], rejected["mm_token_type_ids"][:n])
        assert tok.decode(chosen["input_ids"][:n]).endswith("<|im_start|>assistant\n")
        for name, seq in (("chosen", chosen), ("rejected", rejected)):
            assert (seq["labels"][:n] == IGNORE_INDEX).all()
            assert [tok.decode(s) for s in _segments(seq["labels"], seq["input_ids"])] == [
                f"{getattr(pair, name)}<|im_end|>"]
            assert not seq["mm_token_type_ids"][n:].any()
            assert len(seq["input_ids"]) == len(seq["labels"]) == len(seq["mm_token_type_ids"])
        if pair.prompt.images:  # the pixels of the prompt's images once, not per sequence
            assert example["pixel_values"].shape[0] == int(example["image_grid_thw"].prod(-1).sum())
            assert len(example["image_grid_thw"]) == len(pair.prompt.images)
        else:
            assert "pixel_values" not in example
        assert ("pixel_values_videos" in example) == bool(pair.prompt.videos)
        assert example["id"] == pair.sample_id and "skipped" not in example  # encode: no replacement
        assert {k: example[k] for k in pair.prompt.extra} == pair.prompt.extra
    first = ds.encode(0)
    # the earlier assistant turn of a conversational prompt is context, not trained
    conv = ds.encode(4)
    assert "A square." in tok.decode(conv["chosen"]["input_ids"][: conv["prompt_length"]])
    assert tok.decode(first["chosen"]["input_ids"]).startswith("<|im_start|>system\nAnswer briefly.")


# ------------------------------------------------------------------------------------------ collator
MIXED = [  # a text-only pair, two images, a video, one image
    {"id": "text", "prompt": "Say hello.", "chosen": "hello there", "rejected": "no", "score": 0.1},
    {"id": "multi", "image": ["a.png", "b.png"], "prompt": "<image>\nFirst.\n<image>\nWhich is wider?",
     "chosen": "The second one.", "rejected": "The first."},
    {"id": "vid", "video": "clip.mp4", "prompt": "<video>\nWhat happens?", "chosen": "It brightens.",
     "rejected": "Nothing at all happens here."},
    {"id": "one", "image": "c.png", "prompt": "<image>\nColour?", "chosen": "Red.", "rejected": "Blue!"},
]


def _mixed_examples(media_dir, model_type):
    write_image(media_dir / "c.png", (64, 128), seed=3)
    ds = _dataset(_write(media_dir / "mixed.json", MIXED), media_dir, model_type)
    return ds, [ds[i] for i in range(len(ds))]


def _naive_sequences(examples):
    """What the model sees without sharing: per sequence, its tokens and its pair's full media."""
    media = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    return [e[name] | {k: e[k] for k in media if k in e} for e in examples for name in ("chosen", "rejected")]


def _cat(seqs, key):
    return torch.cat([s[key] for s in seqs if key in s])


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_collator_layout_sequence_order_occurrence_grids_and_sources(model_type, packing, media_dir):
    ds, examples = _mixed_examples(media_dir, model_type)
    config = _config(model_type)
    batch = PairCollator(config, packing=packing, pad_token_id=ds.processor.tokenizer.pad_token_id)(examples)
    naive = _naive_sequences(examples)
    assert batch["id"] == ["text", "multi", "vid", "one"] and batch["num_pairs"] == 4
    assert batch["score"] == [0.1, None, None, None] and batch["skipped"] == []
    assert batch["prompt_length"] == [e["prompt_length"] for e in examples]

    # sequences: [chosen_0, rejected_0, chosen_1, ...], each whole and nothing else
    seq, num_sequences = sequence_ids(batch)
    assert num_sequences == 8
    for s, ref in enumerate(naive):
        if packing:
            where = seq[0] == s
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
            got = {k: batch[k][0, where] for k in ("input_ids", "labels", "mm_token_type_ids")}
            assert got["labels"][0] == IGNORE_INDEX and torch.equal(got["labels"][1:], ref["labels"][1:])
        else:
            n = len(ref["input_ids"])
            assert batch["input_ids"].shape[0] == 8 and int(batch["attention_mask"][s].sum()) == n
            got = {k: batch[k][s, :n] for k in ("input_ids", "labels", "mm_token_type_ids")}
            assert torch.equal(got["labels"], ref["labels"])
            assert (batch["labels"][s, n:] == IGNORE_INDEX).all()
        assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["mm_token_type_ids"],
                                                                               ref["mm_token_type_ids"])
    chosen_text = ds.processor.tokenizer.decode(naive[2]["input_ids"][examples[1]["prompt_length"]:])
    assert chosen_text.startswith("The second one.")  # chosen of pair 1 at sequence 2

    # unique pixels in pair order; one grid row per occurrence (= per sequence); the occurrence -> unique map
    assert torch.equal(batch["pixel_values"], torch.cat([examples[1]["pixel_values"], examples[3]["pixel_values"]]))
    assert torch.equal(batch["pixel_values_videos"], examples[2]["pixel_values_videos"])
    assert torch.equal(batch["image_grid_thw"], _cat(naive, "image_grid_thw"))
    assert len(batch["image_grid_thw"]) == 6 and len(batch["video_grid_thw"]) == 2
    assert batch["image_source"].tolist() == [0, 1, 0, 1, 2, 2]  # multi: a, b; a, b; one: c; c
    assert batch["video_source"].tolist() == [0, 0]
    assert batch["image_source"].dtype == batch["video_source"].dtype == torch.long
    if model_type == "qwen2_5_vl":  # Qwen2.5-VL times its video grids; Qwen3-VL writes timestamps instead
        assert torch.equal(batch["second_per_grid_ts"], examples[2]["second_per_grid_ts"].repeat(2))
    # the unique rows, split per unique image and indexed through the sources, are the naive pixels
    grids = batch["image_grid_thw"]
    first_of = {int(u): o for o, u in reversed(list(enumerate(batch["image_source"])))}
    unique = torch.split(batch["pixel_values"], [int(grids[first_of[u]].prod()) for u in range(len(first_of))])
    rebuilt = torch.cat([unique[int(u)] for u in batch["image_source"]])
    assert torch.equal(rebuilt, _cat(naive, "pixel_values"))
    unique_ref = {"image_grid_thw": torch.cat([examples[1]["image_grid_thw"], examples[3]["image_grid_thw"]]),
                  "video_grid_thw": examples[2]["video_grid_thw"]}
    unique_ref |= {k: examples[2][k] for k in ("second_per_grid_ts",) if k in examples[2]}
    assert unique_grids(batch).keys() == unique_ref.keys()
    assert all(torch.equal(unique_grids(batch)[k], v) for k, v in unique_ref.items())
    expanded = expand_media(batch)
    assert torch.equal(expanded["pixel_values"], _cat(naive, "pixel_values"))
    assert torch.equal(expanded["pixel_values_videos"], _cat(naive, "pixel_values_videos"))

    # mRoPE ids: every sequence's own, from the model's rope index on that sequence alone
    rope = RopeIndex(config)
    if packing:
        for s, ref in enumerate(naive):
            where = seq[0] == s
            assert torch.equal(batch["position_ids"][0, 0, where], torch.arange(len(ref["input_ids"])))
            assert torch.equal(batch["position_ids"][1:, 0, where], rope(ref).long())
    else:  # the model computes the padded batch's ids itself, from the per-occurrence grids
        kwargs = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in batch}
        positions, _ = rope._inner_model().get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                          attention_mask=batch["attention_mask"], **kwargs)
        for s, ref in enumerate(naive):
            n = len(ref["input_ids"])
            assert torch.equal(positions[:, s, :n].long(), rope(ref).long())


def test_text_only_batch_has_no_media_keys(media_dir):
    ds, examples = _mixed_examples(media_dir, "qwen2_vl")
    for packing in (False, True):
        batch = PairCollator(_config("qwen2_vl"), packing=packing, pad_token_id=0)([examples[0], examples[0]])
        assert not {"pixel_values", "image_grid_thw", "image_source", "video_source"} & batch.keys()
        assert sequence_ids(batch)[1] == 4 and batch["id"] == ["text", "text"]


def test_model_runs_the_padded_pair_batch_like_its_sequences_alone(media_dir, one_thread):
    """The per-occurrence grids plus the expanded pixels are exactly what the stock forward accepts: each row's
    logits equal the logits of that sequence run alone with its pair's media."""
    model, processor = build_tiny("qwen2_vl")
    model.eval()
    _, examples = _mixed_examples(media_dir, "qwen2_vl")
    examples = [examples[0], examples[1], examples[3]]  # text, two images, one image
    batch = PairCollator(model, packing=False, pad_token_id=processor.tokenizer.pad_token_id)(examples)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
    with torch.no_grad():
        logits = model(**inputs, **expand_media(batch)).logits
        pad = PadCollator(processor.tokenizer.pad_token_id)
        for s, ref in enumerate(_naive_sequences(examples)):
            alone = pad([ref])
            own = model(**{k: v for k, v in alone.items() if torch.is_tensor(v)}).logits[0]
            torch.testing.assert_close(logits[s, : len(own)], own, atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_of_the_packed_and_padded_pair_batches_agree(media_dir, one_thread):
    """The 2P sequences of one micro-batch give the same per-sequence log-probs packed or padded
    (chosen = [0::2], rejected = [1::2]), each a sequence with supervised tokens."""
    import copy

    from vltrain.attention import enable_packed_attention
    from vltrain.logprobs import sequence_logprobs

    stock, processor = build_tiny("qwen2_5_vl")
    stock.config.use_cache = False
    stock.eval()
    packed_model = copy.deepcopy(stock)
    enable_packed_attention(packed_model)
    _, examples = _mixed_examples(media_dir, "qwen2_5_vl")
    results = []
    for packing, model in ((False, stock), (True, packed_model)):
        batch = PairCollator(stock, packing=packing, pad_token_id=processor.tokenizer.pad_token_id)(examples)
        inputs = {k: v for k, v in batch.items() if torch.is_tensor(v) and k not in ("image_source", "video_source")}
        with torch.no_grad():
            results.append(sequence_logprobs(model, inputs | expand_media(batch)))
    (padded, padded_n), (packed, packed_n) = results
    assert padded.shape == (8,) and torch.equal(padded_n, packed_n) and (padded_n > 0).all()
    expected_n = [int((e[k]["labels"][1:] != IGNORE_INDEX).sum()) for e in examples for k in ("chosen", "rejected")]
    assert packed_n.tolist() == expected_n
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------ loaders
def test_token_budget_sampler_measures_chosen_plus_rejected(media_dir):
    ds, examples = _mixed_examples(media_dir, "qwen2_vl")
    lengths = example_lengths(ds)
    assert lengths == [len(e["chosen"]["input_ids"]) + len(e["rejected"]["input_ids"]) for e in examples]
    budget = sorted(lengths)[-1] + sorted(lengths)[0]  # the longest pair plus the shortest fit together
    # (the loader reads packing / max_tokens_per_batch / num_workers; max_seq_length is the dataset's)
    data_cfg = DataConfig(num_workers=0, packing=True, max_tokens_per_batch=budget, max_seq_length=16)
    collator = PairCollator(_config("qwen2_vl"), packing=True, pad_token_id=0)
    loader = build_loader(ds, data_cfg, ds.processor, _config("qwen2_vl"), micro_batch_size=1, shuffle=True,
                          collate_fn=collator)
    batches = list(loader)
    assert 1 < len(batches) < len(ds)  # several pairs per micro-batch, not all in one
    length_of = {p.sample_id: n for p, n in zip(ds.pairs, lengths)}
    seen = []
    for batch in batches:
        ids = batch["id"]
        assert batch["input_ids"].shape[1] == sum(length_of[i] for i in ids) <= budget
        assert sequence_ids(batch)[1] == 2 * batch["num_pairs"] == 2 * len(ids)
        seen += ids
    assert sorted(seen) == sorted(r["id"] for r in MIXED)


@pytest.mark.parametrize("packing", [False, True])
def test_collator_pickles_into_a_worker_with_skip_records(media_dir, packing):
    ds = _dataset(_write(media_dir / "pairs.json", BAD_PAIRS), media_dir)
    collator = PairCollator(_config("qwen2_vl"), packing=packing, pad_token_id=ds.processor.tokenizer.pad_token_id)
    copy = pickle.loads(pickle.dumps(collator))
    loader = DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collator)
    first, second = list(loader)
    # ds[1] skips 1-4 and returns 5; ds[2] skips 2-4; in the second batch ds[3] skips 3, 4 and ds[4] skips 4
    assert first["id"] == ["good0", "good5", "good5"] and second["id"] == ["good5", "good5", "good5"]
    assert [r["id"] for r in first["skipped"]] == ["empty_chosen", "empty_rejected", "same", "missing",
                                                   "empty_rejected", "same", "missing"]
    assert [r["index"] for r in second["skipped"]] == [3, 4, 4]
    assert first["image_source"].tolist() == [0, 0] and first["score"] == [None, 1.0, 1.0]
    direct = copy([ds[0], ds[1], ds[2]])
    for key in ("input_ids", "labels", "pixel_values", "image_grid_thw", "image_source"):
        assert torch.equal(first[key], direct[key]), key
    assert ("position_ids" in first) == packing and ("attention_mask" in first) == (not packing)
