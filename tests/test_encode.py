import pytest
import torch

from vltrain.data.dataset import SFTDataset, pad_collate
from vltrain.data.encode import (IGNORE_INDEX, SampleSkipped, encode, encode_completions, encode_prompt,
                                 encode_unlabeled)
from vltrain.data.formats import Part, Turn, parse_record
from vltrain.data.media import MediaOptions
from vltrain.families import family_spec
from vltrain.tiny import build_tiny_processor

from conftest import FAMILIES, mixed_records


def _media(model_type):
    return MediaOptions(image_factor=family_spec(model_type).image_factor, image_max_pixels=64 * 64 * 2,
                        video_max_pixels=64 * 64, nframes=4)


def _segments(labels, input_ids):
    """Contiguous supervised spans as lists of token ids."""
    spans, current = [], []
    for label, token in zip(labels.tolist(), input_ids.tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_labels_are_exactly_the_assistant_turns(model_type, media_dir):
    processor = build_tiny_processor(model_type)
    tok = processor.tokenizer
    conv = parse_record(mixed_records()[2], 0)  # two images in two user turns, two assistant replies
    example = encode(conv, processor, _media(model_type), max_seq_length=4096, image_folder=str(media_dir),
                     system_prompt="Answer briefly.")
    spans = _segments(example["labels"], example["input_ids"])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [tok.decode(s) for s in spans] == ["a circle<|im_end|>", "a square<|im_end|>"]
    assert all(s[-1] == im_end for s in spans)
    # system prompt present and unsupervised; no media token is ever supervised
    text = tok.decode(example["input_ids"])
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")
    assert not (example["labels"][example["mm_token_type_ids"] != 0] != IGNORE_INDEX).any()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_multi_image_tokens_land_in_the_right_turns(model_type, media_dir):
    processor = build_tiny_processor(model_type)
    tok = processor.tokenizer
    example = encode(parse_record(mixed_records()[2], 0), processor, _media(model_type), max_seq_length=4096,
                     image_folder=str(media_dir))
    ids = example["input_ids"].tolist()
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    turns, current = [], []
    for t in ids:
        if t == im_start and current:
            turns.append(current)
            current = []
        current.append(t)
    turns.append(current)
    merge = 4
    per_image = (example["image_grid_thw"].prod(-1) // merge).tolist()
    counts = [turn.count(image_pad) for turn in turns]
    # system, user(image a), assistant, user(image b), assistant
    assert counts == [0, per_image[0], 0, per_image[1], 0]
    assert per_image[0] != per_image[1]  # a.png and b.png have different sizes, so the order is checked
    assert example["pixel_values"].shape[0] == int(example["image_grid_thw"].prod(-1).sum())


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_video_sample_encodes_with_timestamps_for_qwen3(model_type, media_dir):
    processor = build_tiny_processor(model_type)
    example = encode(parse_record(mixed_records()[3], 0), processor, _media(model_type), max_seq_length=4096,
                     image_folder=str(media_dir))
    grid = example["video_grid_thw"]
    assert grid.shape == (1, 3) and grid[0, 0] == 2  # nframes=4 -> 2 temporal groups
    text = processor.tokenizer.decode(example["input_ids"])
    if family_spec(model_type).timestamped_video:
        # 8 frames at 4 fps, 4 sampled (0, 2, 5, 7): groups start at 0.25 s and 1.5 s
        assert "<0.2 seconds><|vision_start|>" in text and "<1.5 seconds><|vision_start|>" in text
        assert text.count("<|vision_start|>") == 2
    else:
        assert "seconds" not in text and text.count("<|vision_start|>") == 1
        assert "second_per_grid_ts" in example


def test_truncation_cuts_text_but_never_media(media_dir):
    # The whole-length cut is encode_unlabeled's (encode now drops a cut assistant turn: next test).
    processor = build_tiny_processor("qwen2_vl")
    media = _media("qwen2_vl")
    conv = parse_record({"id": "long", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "word " * 200}]}, 0)
    full = encode_unlabeled(conv, processor, media, image_folder=str(media_dir))
    media_end = int((full["mm_token_type_ids"] != 0).nonzero().max())
    cut = encode_unlabeled(conv, processor, media, max_seq_length=media_end + 20, image_folder=str(media_dir))
    assert len(cut["input_ids"]) == media_end + 20
    assert torch.equal(cut["input_ids"], full["input_ids"][: media_end + 20])
    assert (cut["mm_token_type_ids"] != 0).sum() == (full["mm_token_type_ids"] != 0).sum()
    assert cut["truncated"] == [{"file": "data", "index": 0, "id": "long", "tokens_before": len(full["input_ids"]),
                                 "tokens_after": media_end + 20}]
    for fn in (encode, encode_unlabeled):
        with pytest.raises(SampleSkipped, match="long"):
            fn(conv, processor, media, max_seq_length=media_end, image_folder=str(media_dir))


def _two_turns(second_reply):
    return parse_record({"id": "two", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "a circle"},
        {"from": "human", "value": "And?"}, {"from": "gpt", "value": second_reply}]}, 5, "train.json")


def test_a_cut_assistant_turn_is_not_trained_earlier_turns_are(media_dir, caplog):
    processor = build_tiny_processor("qwen2_vl")
    tok, media = processor.tokenizer, _media("qwen2_vl")
    conv = _two_turns("word " * 100)
    full = encode(conv, processor, media, max_seq_length=100000, image_folder=str(media_dir))
    assert full["truncated"] == []
    first_end = int((full["input_ids"] == tok.convert_tokens_to_ids("<|im_end|>")).nonzero()[2])  # 1st reply's end
    limit = len(full["input_ids"]) - 50  # inside the second reply
    with caplog.at_level("WARNING", logger="vltrain.data.encode"):
        cut = encode(conv, processor, media, max_seq_length=limit, image_folder=str(media_dir))
    assert [tok.decode(s) for s in _segments(cut["labels"], cut["input_ids"])] == ["a circle<|im_end|>"]
    # the sequence ends with the last trained token; the cut reply would only cost compute
    assert len(cut["input_ids"]) == first_end + 1
    assert torch.equal(cut["input_ids"], full["input_ids"][: first_end + 1])
    assert cut["truncated"] == [{"file": "train.json", "index": 5, "id": "two",
                                 "tokens_before": len(full["input_ids"]), "tokens_after": first_end + 1}]
    assert any("'two'" in r.getMessage() and str(len(full["input_ids"])) in r.getMessage() for r in caplog.records)
    # cut exactly after the second reply's <|im_end|>: both replies are complete and train
    end = int((full["input_ids"] == tok.convert_tokens_to_ids("<|im_end|>")).nonzero()[-1]) + 1
    both = encode(conv, processor, media, max_seq_length=end, image_folder=str(media_dir))
    assert len(_segments(both["labels"], both["input_ids"])) == 2 and len(both["input_ids"]) == end


def test_nothing_complete_left_is_skipped(media_dir):
    processor = build_tiny_processor("qwen2_vl")
    media = _media("qwen2_vl")
    conv = parse_record({"id": "one", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "word " * 100}]}, 0)
    with pytest.raises(SampleSkipped, match="no complete assistant turn") as info:
        encode(conv, processor, media, max_seq_length=40, image_folder=str(media_dir))
    assert info.value.sample_id == "one" and "max_seq_length=40" in info.value.reason


def test_dataset_skips_and_records_unusable_samples(media_dir, tmp_path):
    import json

    records = mixed_records()[:2] + [{"id": "missing", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "y"}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    processor = build_tiny_processor("qwen2_vl")
    ds = SFTDataset(path, processor, _media("qwen2_vl"), max_seq_length=4096, image_folder=str(media_dir))
    example = ds[2]  # unreadable -> replaced by the next sample (wraps to 0), recorded
    [record] = example["skipped"]
    assert record["file"] == str(path) and record["index"] == 2 and record["id"] == "missing"
    assert "nope.png" in record["reason"]
    assert example["id"] == "text" and torch.equal(example["input_ids"], ds.encode(0)["input_ids"])
    batch = pad_collate([ds[0], ds[1], ds[2]], processor.tokenizer.pad_token_id)
    assert batch["skipped"] == [record] and batch["input_ids"].shape[0] == 3
    assert batch["id"] == ["text", "img", "text"]


def test_pad_collate_mixed_batch(media_dir, mixed_data):
    processor = build_tiny_processor("qwen2_5_vl")
    ds = SFTDataset(mixed_data, processor, _media("qwen2_5_vl"), max_seq_length=4096, image_folder=str(media_dir))
    examples = [ds[i] for i in range(len(ds))]
    batch = pad_collate(examples, processor.tokenizer.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["image_grid_thw"].shape == (3, 3) and batch["video_grid_thw"].shape == (1, 3)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


class CountingProcessor:
    """The tiny processor, counting its calls (render_chat reaches the template through it)."""

    def __init__(self, processor):
        self.processor, self.calls = processor, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.processor(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


@pytest.fixture
def image_loads(monkeypatch):
    import vltrain.data.encode as encode_module

    calls = []
    real = encode_module.load_image
    monkeypatch.setattr(encode_module, "load_image", lambda ref, opts: calls.append(ref) or real(ref, opts))
    return calls


def _prompt(reply=None):
    turns = [{"from": "human", "value": "<image>\nFirst?"}, {"from": "gpt", "value": "a circle"},
             {"from": "human", "value": "<image>\nAnd this one?"}]
    if reply is not None:
        turns.append({"from": "gpt", "value": reply})
    return parse_record({"id": "p", "image": ["a.png", "b.png"], "conversations": turns}, 0,
                        require_reply=reply is not None)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_encode_prompt_ends_with_the_generation_header(model_type, media_dir, image_loads):
    processor = CountingProcessor(build_tiny_processor(model_type))
    tok = processor.tokenizer
    example = encode_prompt(_prompt(), processor, _media(model_type), image_folder=str(media_dir))
    assert processor.calls == 1 and len(image_loads) == 2
    assert "labels" not in example and example["id"] == "p"
    text = tok.decode(example["input_ids"])
    assert text.endswith("And this one?<|im_end|>\n<|im_start|>assistant\n")
    assert example["image_grid_thw"].shape == (2, 3)
    # the same tokens as the SFT encoding of that conversation with a reply, up to the reply
    full = encode(_prompt("a square"), processor, _media(model_type), max_seq_length=4096, image_folder=str(media_dir))
    n = len(example["input_ids"])
    assert torch.equal(full["input_ids"][:n], example["input_ids"])
    assert (full["labels"][n - 1] == IGNORE_INDEX) and (full["labels"][n:] != IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="sample 0 \\(id='p'\\).*ends with an assistant turn"):
        encode_prompt(_prompt("a square"), processor, _media(model_type), image_folder=str(media_dir))
    with pytest.raises(SampleSkipped, match="prompt of"):
        encode_prompt(_prompt(), processor, _media(model_type), image_folder=str(media_dir), max_seq_length=n - 1)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl"])
def test_encode_completions_share_the_prompt_media_and_label_only_the_reply(model_type, media_dir, image_loads):
    processor = CountingProcessor(build_tiny_processor(model_type))
    tok, media = processor.tokenizer, _media(model_type)
    completions = ["a square", "red", ""]
    out = encode_completions(_prompt(), completions, processor, media, image_folder=str(media_dir),
                             system_prompt="Answer briefly.")
    assert processor.calls == 1 and len(image_loads) == 2  # media and processor once for all completions
    assert out["id"] == "p" and len(out["sequences"]) == 3 and out["image_grid_thw"].shape == (2, 3)
    prompt = encode_prompt(_prompt(), processor, media, image_folder=str(media_dir), system_prompt="Answer briefly.")
    assert out["prompt_length"] == len(prompt["input_ids"])
    for completion, seq in zip(completions, out["sequences"]):
        # the same sequence the SFT path (processor on the whole rendered conversation) encodes
        with_reply = _prompt()
        with_reply.turns.append(Turn("assistant", [Part("text", completion)]))  # "" is no valid record: built here
        ref = encode(with_reply, processor, media, max_seq_length=4096, image_folder=str(media_dir),
                     system_prompt="Answer briefly.")
        for key in ("input_ids", "mm_token_type_ids"):
            assert torch.equal(seq[key], ref[key]), key
        assert torch.equal(out["pixel_values"], ref["pixel_values"])
        # labels: the completion and its <|im_end|> only (not the earlier "a circle" turn SFT trains)
        assert [tok.decode(s) for s in _segments(seq["labels"], seq["input_ids"])] == [f"{completion}<|im_end|>"]
        assert (seq["labels"][: out["prompt_length"]] == IGNORE_INDEX).all()
        assert torch.equal(seq["input_ids"][: out["prompt_length"]], prompt["input_ids"])
    with pytest.raises(SampleSkipped, match="completion 0"):
        encode_completions(_prompt(), ["word " * 50], processor, media, image_folder=str(media_dir),
                           max_seq_length=out["prompt_length"] + 10)
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        encode_completions(_prompt("x"), ["y"], processor, media, image_folder=str(media_dir))


def test_encode_unlabeled_whole_conversation_or_prompt(media_dir, image_loads):
    processor = CountingProcessor(build_tiny_processor("qwen2_5_vl"))
    media = _media("qwen2_5_vl")
    conv = parse_record({**mixed_records()[2], "label": 1}, 0)
    whole = encode_unlabeled(conv, processor, media, image_folder=str(media_dir))
    assert processor.calls == 1 and len(image_loads) == 2
    assert set(whole) == {"id", "input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw", "truncated"}
    sft = encode(conv, processor, media, max_seq_length=4096, image_folder=str(media_dir))
    assert torch.equal(whole["input_ids"], sft["input_ids"]) and whole["truncated"] == []
    prompt = encode_unlabeled(_prompt(), processor, media, image_folder=str(media_dir), add_generation_prompt=True)
    assert torch.equal(prompt["input_ids"], encode_prompt(_prompt(), processor, media,
                                                         image_folder=str(media_dir))["input_ids"])


def test_a_processor_exception_is_a_skip_naming_the_sample(media_dir):
    class Refusing(CountingProcessor):
        def __call__(self, *args, **kwargs):
            raise RuntimeError("grid too large")

    conv = parse_record(mixed_records()[1], 0)
    with pytest.raises(SampleSkipped, match="'img'.*processor failed: RuntimeError: grid too large"):
        encode(conv, Refusing(build_tiny_processor("qwen2_vl")), _media("qwen2_vl"), max_seq_length=4096,
               image_folder=str(media_dir))


def test_thinking_reaches_render_chat_and_its_errors_are_not_skips(media_dir, tmp_path):
    """The template's refusals stop the run (render_chat's policy); only processor / media problems are skips.
    The dataset checks data.thinking when it is built."""
    import json

    processor = build_tiny_processor("qwen2_vl")
    conv = parse_record(mixed_records()[0], 0)
    with pytest.raises(ValueError, match="data.thinking='maybe'") as info:
        encode(conv, processor, _media("qwen2_vl"), max_seq_length=4096, thinking="maybe")
    assert not isinstance(info.value, SampleSkipped)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(mixed_records()[:1]))
    with pytest.raises(ValueError, match="data.thinking='maybe'"):  # before any sample is encoded
        SFTDataset(path, processor, _media("qwen2_vl"), max_seq_length=4096, thinking="maybe")


def _thinking_processor(template_name):
    """The tiny Qwen3.5 processor with a real thinking chat template (from trl's wheel, read without importing trl)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("trl")
    path = spec and Path(spec.submodule_search_locations[0]) / "chat_templates" / f"{template_name}.jinja"
    if path is None or not path.is_file():
        pytest.skip(f"trl's {template_name}.jinja is not installed")
    processor = build_tiny_processor("qwen3_5")
    processor.chat_template = processor.tokenizer.chat_template = path.read_text()
    return processor


@pytest.mark.parametrize("thinking", ["keep", "off"])
def test_encode_completions_with_a_thinking_template(thinking):
    """The generation prompt opens the think block ("keep") or holds the empty one ("off"): labels start after
    it, and each sequence is still token for token what the SFT path encodes for that reply."""
    processor = _thinking_processor("qwen3_5_think")
    tok, media = processor.tokenizer, _media("qwen3_5")
    prompt = parse_record({"id": "t", "conversations": [{"from": "human", "value": "Hi"}]}, 0, require_reply=False)
    completions = ["red"] + (["<think>\nmaybe\n</think>\n\nblue"] if thinking == "keep" else [])
    out = encode_completions(prompt, completions, processor, media, thinking=thinking)
    header = tok.decode(out["sequences"][0]["input_ids"][: out["prompt_length"]])
    assert header.endswith("<|im_start|>assistant\n<think>\n" if thinking == "keep" else
                           "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    expected = {"keep": ["\n</think>\n\nred<|im_end|>", "maybe\n</think>\n\nblue<|im_end|>"],
                "off": ["red<|im_end|>"]}[thinking]
    for completion, seq, want in zip(completions, out["sequences"], expected):
        assert [tok.decode(s) for s in _segments(seq["labels"], seq["input_ids"])] == [want]
        with_reply = parse_record({"id": "t", "conversations": [{"from": "human", "value": "Hi"},
                                                                 {"from": "gpt", "value": completion}]}, 0)
        ref = encode(with_reply, processor, media, max_seq_length=4096, thinking=thinking)
        assert torch.equal(seq["input_ids"], ref["input_ids"])


def test_encoding_a_video_prints_no_transformers_pixel_cap_warning(tmp_path):
    """media.py sizes video frames itself (the processor runs with do_resize=False), so transformers' warning about
    its per-frame pixel cap default concerns nothing vltrain does: it is not printed (a fresh process, since
    transformers warns once per process)."""
    import subprocess
    import sys

    from conftest import REPO, write_video

    video = write_video(tmp_path / "clip.mp4", num_frames=8, size=(64, 64))
    code = f"""
from vltrain.data.encode import process_conversation
from vltrain.data.formats import parse_record
from vltrain.data.media import MediaOptions
from vltrain.families import family_spec
from vltrain.tiny import build_tiny_processor
for model_type in ("qwen2_vl", "qwen3_vl"):
    media = MediaOptions(nframes=4, image_factor=family_spec(model_type).image_factor)
    conv = parse_record({{"video": {str(video)!r}, "conversations": [{{"from": "human", "value": "<video>What?"}},
                                                              {{"from": "gpt", "value": "a clip"}}]}}, 0)
    out = process_conversation(conv, build_tiny_processor(model_type), media)
    print(model_type, tuple(out["video_grid_thw"].shape))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "qwen2_vl (1, 3)" in proc.stdout and "qwen3_vl (1, 3)" in proc.stdout
    assert "cap_pixels_per_frame" not in proc.stderr + proc.stdout
