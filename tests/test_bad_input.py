"""Bad input in the data of every loop (#16 item 1): one table of cases x the loops that read them.

Each case is fed to the record loader the loop's recipe hands to `vltrain.run.open_run` (load_conversations,
load_pairs, load_prompts, load_cls_records) and then to the loop's dataset and collator, in a file that holds a
good sample before and after it. Expected outcomes:

    error      the loader raises a one-line DataFormatError naming the file, the sample (index, id) and the field:
               it fails before any model loads (`test_a_bad_record_stops_every_recipe_before_its_model_loads`)
    skip       the dataset logs and counts a skip record {file, index, id="bad", reason} and the good samples
               still come out of the loop's collator
    truncated  the sample trains, cut to max_seq_length (its text only, never its media) and recorded
    ok         the sample trains unchanged (a tiny image grows to the minimum, a huge JPEG is decoded reduced)

Too long, by loop: SFT and classification cut the text from the end and record it; a sample whose media end
beyond max_seq_length is skipped (media are never cut); DPO pairs and GRPO prompts are never cut: skipped.

Every case runs in CI (the whole table takes seconds); `test_matrix_counts` prints the cases per loop.
"""

from __future__ import annotations

import io
import json
import logging
import re
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest
from torch.utils.data import DataLoader

from vltrain.data.dataset import PadCollator, SFTDataset
from vltrain.data.formats import load_conversations
from vltrain.data.labels import ClassificationDataset, ClsCollator, LabelSpec, load_cls_records
from vltrain.data.media import MediaOptions
from vltrain.data.pairs import PairCollator, PairDataset, load_pairs
from vltrain.data.prompts import PromptDataset, collate_prompts, load_prompts
from vltrain.data.skips import SkipLedger
from vltrain.tiny import build_tiny_processor, tiny_config

from conftest import REPO, write_image, write_video

MODEL_TYPE = "qwen2_vl"
MEDIA = MediaOptions(image_factor=28, image_max_pixels=64 * 64 * 2, video_max_pixels=64 * 64, nframes=4)
MAX_SEQ_LENGTH = 160
SPEC = LabelSpec("single_label", 3, ("circle", "square", "triangle"))
LOOPS = ("sft", "dpo", "grpo", "cls")
LONG = "word " * 200


# ------------------------------------------------------------------------------------------ media files
def huge_grey_jpeg(path: Path, width: int, height: int, declared: tuple[int, int] | None = None) -> Path:
    """A valid baseline greyscale JPEG of width x height, mid grey, written without ever holding its pixels: each
    8x8 block is the same 6 bits (DC difference 0, end of block), so 4 blocks are the 3 bytes 28 a2 8a.
    `declared` writes another (width, height) into the header (the scan then holds too few blocks)."""
    assert width % 8 == 0 and height % 8 == 0 and (width // 8 * height // 8) % 4 == 0
    from PIL import Image

    small = io.BytesIO()
    Image.new("L", (16, 16), 128).save(small, "JPEG", quality=75)
    data = small.getvalue()
    sof = data.index(b"\xff\xc0")
    sos = data.index(b"\xff\xda")
    scan = sos + 2 + struct.unpack(">H", data[sos + 2: sos + 4])[0]
    assert data[scan:] == b"\x28\xa2\x8a\xff\xd9", "PIL's standard tables changed; this file needs another scan"
    w, h = declared or (width, height)
    header = data[: sof + 5] + struct.pack(">HH", h, w) + data[sof + 9: scan]
    path.write_bytes(header + b"\x28\xa2\x8a" * (width // 8 * height // 8 // 4) + b"\xff\xd9")
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height, followed by no real pixel data (refused before decoding)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def write_empty_video(path: Path) -> Path:
    """A container with a video stream and no frame (PyAV writes no file at all unless encoding starts)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    return path


def write_audio(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media")
    write_image(d / "good.png", (64, 64), seed=1)
    write_image(d / "photo.jpg", (64, 64), seed=2)
    (d / "cut.png").write_bytes((d / "good.png").read_bytes()[:300])
    (d / "cut.jpg").write_bytes((d / "photo.jpg").read_bytes()[:600])
    (d / "text.jpg").write_text("not an image\n")
    (d / "zero.png").write_bytes(b"")
    write_image(d / "tiny.png", (1, 1))
    write_image(d / "thin.png", (300, 1))
    huge_grey_jpeg(d / "huge.jpg", 20000, 20000)
    png_header(d / "huge.png", 20000, 20000)  # above 2x PIL's limit: PIL raises DecompressionBombError
    png_header(d / "big.png", 10000, 10000)  # between 1x and 2x: PIL only warns
    write_video(d / "clip.mp4")
    (d / "text.mp4").write_text("not a video\n")
    (d / "cut.mp4").write_bytes((d / "clip.mp4").read_bytes()[:400])
    write_empty_video(d / "empty.mkv")
    write_video(d / "one.mp4", num_frames=1)
    write_audio(d / "audio.mp4")
    (d / "no_frames").mkdir()
    (d / "bad_frames").mkdir()
    for k in range(3):
        write_image(d / "bad_frames" / f"frame_{k}.png", (64, 64), seed=k)
    (d / "bad_frames" / "frame_3.jpg").write_text("not an image\n")
    return d


# ------------------------------------------------------------------------------------------ the loops
@dataclass
class Loop:
    """What a loop reads: its record builder, the loader open_run gets, its dataset and collator."""

    name: str
    record: object  # (id, text, reply, image, video) -> record dict
    load: object  # path -> records (what the recipe passes to open_run)
    dataset: object  # (records, processor, media_dir) -> dataset
    collate: object  # processor -> collate_fn
    ids: object = field(default=lambda batch: batch["id"])


def _media_fields(image, video) -> dict:
    return {k: v for k, v in (("image", image), ("video", video)) if v is not None}


def _sft_record(sample_id, text, reply="a reply", image=None, video=None):
    return {"id": sample_id, **_media_fields(image, video),
            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": reply}]}


def _dpo_record(sample_id, text, reply="a reply", image=None, video=None):
    return {"id": sample_id, **_media_fields(image, video), "prompt": text, "chosen": reply,
            "rejected": "another reply"}


def _cls_record(sample_id, text, reply=None, image=None, video=None):
    return {"id": sample_id, **_media_fields(image, video), "prompt": text, "label": "square"}


def _options(media_dir):
    return {"image_folder": str(media_dir)}


LOOP_TABLE = {
    "sft": Loop("sft", _sft_record, load_conversations,
                lambda recs, proc, d: SFTDataset(recs, proc, MEDIA, max_seq_length=MAX_SEQ_LENGTH, **_options(d)),
                lambda proc: PadCollator(proc.tokenizer.pad_token_id)),
    "dpo": Loop("dpo", _dpo_record, load_pairs,
                lambda recs, proc, d: PairDataset(recs, proc, MEDIA, max_seq_length=MAX_SEQ_LENGTH, **_options(d)),
                lambda proc: PairCollator(tiny_config(MODEL_TYPE, proc.tokenizer), packing=False,
                                          pad_token_id=proc.tokenizer.pad_token_id)),
    "grpo": Loop("grpo", _sft_record, load_prompts,
                 lambda recs, proc, d: PromptDataset(recs, proc, MEDIA, max_prompt_length=MAX_SEQ_LENGTH,
                                                     **_options(d)),
                 lambda proc: collate_prompts),
    "cls": Loop("cls", _cls_record, lambda path: load_cls_records(path, SPEC),
                lambda recs, proc, d: ClassificationDataset(recs, proc, MEDIA, spec=SPEC,
                                                            max_seq_length=MAX_SEQ_LENGTH, **_options(d)),
                lambda proc: ClsCollator(tiny_config(MODEL_TYPE, proc.tokenizer), packing=False,
                                         pad_token_id=proc.tokenizer.pad_token_id, problem_type="single_label")),
}


# ------------------------------------------------------------------------------------------ the cases
@dataclass
class Case:
    """`outcome` on every loop of `loops`; `match` is searched in the error message or the skip reason.
    `record(loop)` gives the bad record (id "bad"), or `content` the whole data file (file-level cases)."""

    name: str
    category: str
    outcome: str  # error | skip | truncated | ok
    match: str = ""
    loops: tuple = LOOPS
    record: object = None  # Loop -> record dict / any JSON value
    content: object = None  # bytes | str | "<missing>" | "<folder>" for file-level cases


def media_case(name, outcome, match="", image=None, video=None, text=None, loops=LOOPS):
    text = text if text is not None else ("<image>\nWhat is it?" if image else "<video>\nWhat happens?")
    return Case(name, "media", outcome, match, loops, lambda loop: loop.record("bad", text, image=image, video=video))


def per_loop(name, category, outcome, match, records: dict):
    """A case whose bad record is written differently for each loop (`records[loop]`)."""
    return Case(name, category, outcome, match, tuple(records), lambda loop: records[loop.name])


def _turns(*pairs) -> list[dict]:
    return [{"from": role, "value": value} for role, value in pairs]


def _messages(turns: list[dict]) -> list[dict]:
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in turns]


def shape_case(name, match, prompt_turns):
    """A conversation shape that makes no sense, before the answer: SFT / GRPO append the reply, DPO takes the
    turns as its prompt (messages), classification as its conversation."""
    reply = [{"from": "gpt", "value": "a reply"}]
    return per_loop(name, "conversation shape", "error", match, {
        "sft": {"id": "bad", "conversations": prompt_turns + reply},
        "dpo": {"id": "bad", "prompt": _messages(prompt_turns), "chosen": "yes", "rejected": "no"},
        "grpo": {"id": "bad", "conversations": prompt_turns + reply},
        "cls": {"id": "bad", "conversations": prompt_turns, "label": 1},
    })


def every_loop(name, category, outcome, match, sft, dpo, cls, grpo=None):
    return per_loop(name, category, outcome, match, {"sft": sft, "dpo": dpo, "grpo": grpo or sft, "cls": cls})


Q = [{"from": "human", "value": "What is it?"}]
CASES = [
    # files that are not JSON / JSONL or hold no records
    Case("not JSON", "file", "error", r":1: not valid JSON", content="{oops, this is not JSON\n"),
    Case("a JSON list cut short", "file", "error", r"not valid JSON", content='[{"id": "a"}, {"id": '),
    Case("one bad JSONL line", "file", "error", r":2: not valid JSON", content="line 2 is bad"),
    Case("a binary file", "file", "error", r"not a UTF-8 text file", content=b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"),
    Case("an empty file", "file", "error", r"holds no records", content=""),
    Case("an empty list", "file", "error", r"holds no records", content="[]"),
    Case("a JSON object, not a list", "file", "error", r"holds one JSON object, not a list of records",
         content=json.dumps({"data": [{"id": "a"}]}, indent=1)),
    Case("a JSON string", "file", "error", r"record 0 is a str, expected an object", content='"hello"\n'),
    Case("a missing file", "file", "error", r"does not exist", content="<missing>"),
    Case("a folder", "file", "error", r"is a folder", content="<folder>"),
    # records of the wrong shape or with wrong types
    Case("a list as a record", "record type", "error", r"record 1 is a list, expected an object",
         record=lambda loop: ["not", "a", "record"]),
    Case("an id that is a list", "record type", "error", r"field 'id' must be a string or an integer",
         record=lambda loop: {**loop.record("x", "Hi"), "id": ["bad"]}),
    media_case("image field a number", "error", r"field 'image' must be a string or a list of strings", image=5,
               text="What is it?"),
    every_loop("no conversation or prompt (classification: an empty one)", "record type", "error",
               r"needs 'conversations'|missing field 'prompt'|empty user turn",
               sft={"id": "bad", "image": "good.png"}, dpo={"id": "bad", "chosen": "a", "rejected": "b"},
               cls={"id": "bad", "label": 1, "prompt": ""}),
    every_loop("a string where the turns belong", "record type", "error",
               r"'conversations' must be a non-empty list|'prompt' must be a string or a list of messages|"
               r"'prompt' must be a string",
               sft={"id": "bad", "conversations": "Hi there"}, dpo={"id": "bad", "prompt": 7, "chosen": "a",
                                                                    "rejected": "b"},
               cls={"id": "bad", "prompt": ["What", "is", "it?"], "label": 1}),
    every_loop("a number as a message", "record type", "error", r"conversations\[0\] needs 'from' and 'value'|"
               r"prompt\[0\]: needs 'role' and 'content'",
               sft={"id": "bad", "conversations": [5, {"from": "gpt", "value": "x"}]},
               dpo={"id": "bad", "prompt": [5], "chosen": "a", "rejected": "b"},
               cls={"id": "bad", "conversations": [5], "label": 1}),
    every_loop("a list where the text belongs", "record type", "error",
               r"conversations\[0\]\.value must be a string|prompt: content must be a string|"
               r"content must be a string or a list",
               sft={"id": "bad", "conversations": [{"from": "human", "value": ["Hi"]}, {"from": "gpt", "value": "x"}]},
               dpo={"id": "bad", "prompt": [{"role": "user", "content": 5}], "chosen": "a", "rejected": "b"},
               cls={"id": "bad", "conversations": [{"from": "human", "value": ["Hi"]}], "label": 1}),
    every_loop("an unknown role", "record type", "error", r"from='robot' is not one of|role='robot' is not one of",
               sft={"id": "bad", "conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "x"}]},
               dpo={"id": "bad", "prompt": [{"role": "robot", "content": "Hi"}], "chosen": "a", "rejected": "b"},
               cls={"id": "bad", "conversations": [{"from": "robot", "value": "Hi"}], "label": 1}),
    per_loop("a missing rejected side", "record type", "error", r"missing field 'rejected'",
             {"dpo": {"id": "bad", "prompt": "Hi", "chosen": "a"}}),
    per_loop("a number as the chosen side", "record type", "error", r"field 'chosen' must be a string",
             {"dpo": {"id": "bad", "prompt": "Hi", "chosen": 3, "rejected": "b"}}),
    per_loop("two messages as the rejected side", "record type", "error", r"field 'rejected' is a list of 2",
             {"dpo": {"id": "bad", "prompt": "Hi", "chosen": "a", "rejected": ["b", "c"]}}),
    per_loop("a record field named labels", "record type", "error", r"'labels'",
             {name: {**LOOP_TABLE[name].record("bad", "Hi"), "labels": [1]} for name in LOOPS}),
    # media
    media_case("missing image", "skip", r"image file not found: .*nope\.png", image="nope.png"),
    media_case("truncated PNG", "skip", r"cannot decode image .*cut\.png: image file is truncated", image="cut.png"),
    media_case("truncated JPEG", "skip", r"cannot decode image .*cut\.jpg", image="cut.jpg"),
    media_case("a text file named .jpg", "skip", r"cannot decode image .*text\.jpg: cannot identify", image="text.jpg"),
    media_case("a zero-sized image", "skip", r"cannot decode image .*zero\.png", image="zero.png"),
    media_case("a 1x1 image", "ok", image="tiny.png"),
    media_case("a 300:1 image", "skip", r"cannot size .*thin\.png: absolute aspect ratio", image="thin.png"),
    media_case("a 20000x20000 JPEG", "ok", image="huge.jpg"),
    media_case("a 20000x20000 PNG (decompression bomb)", "skip", r"huge\.png is too large to decode",
               image="huge.png"),
    media_case("a 10000x10000 PNG", "skip", r"big\.png is 10000x10000.*MAX_IMAGE_PIXELS", image="big.png"),
    media_case("missing video", "skip", r"video file not found", video="nope.mp4"),
    media_case("a text file named .mp4", "skip", r"cannot decode video .*text\.mp4", video="text.mp4"),
    media_case("a video cut off", "skip", r"cannot decode video .*cut\.mp4", video="cut.mp4"),
    media_case("a video without frames", "skip", r"cannot decode video .*empty\.mkv: .*End of file", video="empty.mkv"),
    media_case("a one-frame video", "skip", r"one\.mp4 has 1 decodable frame", video="one.mp4"),
    media_case("an audio-only file", "skip", r"audio\.mp4 has no video stream", video="audio.mp4"),
    media_case("a frame folder with a broken frame", "skip", r"cannot decode image .*frame_3\.jpg", video="bad_frames"),
    media_case("an empty frame folder", "skip", r"frame folder .*no_frames holds no frames", video="no_frames"),
    # placeholder counts that disagree with the media
    media_case("two <image> for one image", "error", r"more <image> placeholders than image files",
               image="good.png", text="<image>\n<image>\nCompare."),
    media_case("two images for one <image>", "error", r"lists 2 image\(s\).*only 1 <image>",
               image=["good.png", "photo.jpg"], text="<image>\nWhat is it?"),
    media_case("a <video> without a video", "error", r"more <video> placeholders than video files",
               text="<video>\nWhat happens?"),
    media_case("a literal <|image_pad|> in the text", "error", r"holds '<\|image_pad\|>'", image="good.png",
               text="<image>\nand <|image_pad|> here"),
    # conversation shapes that make no sense
    shape_case("assistant first", r"starts with an assistant turn", _turns(("gpt", "Hello."), ("human", "Hi."))),
    shape_case("two user turns in a row", r"two user turns in a row", _turns(("human", "Hi."), ("human", "Hi?"))),
    shape_case("two assistant turns in a row", r"two assistant turns in a row",
               _turns(("human", "Hi."), ("gpt", "Hello."), ("gpt", "Hello?"), ("human", "Bye."))),
    shape_case("an empty text turn", r"empty user turn", _turns(("human", "  "))),
    shape_case("a system turn in the middle", r"a system turn may only come first",
               _turns(("human", "Hi."), ("gpt", "Hello."), ("system", "Be brief."), ("human", "Bye."))),
    every_loop("an image in an assistant turn", "conversation shape", "error", r"the assistant turn holds an image",
               sft={"id": "bad", "image": "good.png", "conversations": _turns(("human", "Draw."), ("gpt", "<image>"))},
               dpo={"id": "bad", "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
                   {"type": "image", "image": "good.png"}]}, {"role": "user", "content": "And?"}],
                   "chosen": "a", "rejected": "b"},
               cls={"id": "bad", "image": "good.png", "conversations": _turns(("human", "Hi"), ("gpt", "<image>"),
                                                                              ("human", "And?")), "label": 1}),
    every_loop("<|im_end|> inside a reply", "conversation shape", "error", r"holds '<\|im_end\|>'",
               sft=_sft_record("bad", "Hi", reply="yes<|im_end|>no"),
               dpo=_dpo_record("bad", "Hi", reply="yes<|im_end|>no"),
               cls={"id": "bad", "conversations": _turns(("human", "Hi"), ("gpt", "yes<|im_end|>no"), ("human", "?")),
                    "label": 1}),
    per_loop("no assistant reply to train on", "conversation shape", "error", r"ends with a user turn",
             {"sft": {"id": "bad", "conversations": Q}}),
    per_loop("a reply at the end of a prompt", "conversation shape", "error",
             r"'prompt' ends with an assistant turn|must end with the user turn", {
                 "dpo": {"id": "bad", "prompt": _messages(Q + [{"from": "gpt", "value": "x"}]), "chosen": "a",
                         "rejected": "b"},
                 "cls": {"id": "bad", "conversations": Q + [{"from": "gpt", "value": "x"}], "label": 1}}),
    # too long for max_seq_length (module docstring)
    per_loop("too long, text only", "length", "truncated", "", {
        "sft": {"id": "bad", "conversations": _turns(("human", "Hi."), ("gpt", "Hello."), ("human", "More."),
                                                     ("gpt", LONG))},
        "cls": _cls_record("bad", LONG)}),
    per_loop("too long, text only, never cut", "length", "skip", r"tokens > max_seq_length", {
        "dpo": _dpo_record("bad", LONG), "grpo": _sft_record("bad", LONG)}),
    per_loop("a single reply cut by the limit", "length", "skip", r"no complete assistant turn within max_seq_length",
             {"sft": _sft_record("bad", LONG)}),
    per_loop("too long with media: the text after them is cut", "length", "truncated", "", {
        "sft": {"id": "bad", "image": "good.png", "conversations": _turns(
            ("human", "<image>\nHi."), ("gpt", "Hello."), ("human", "More."), ("gpt", LONG))},
        "cls": _cls_record("bad", "<image>\n" + LONG, image="good.png")}),
    media_case("too long with media: media beyond the limit", "skip", r"media end at token \d+, beyond "
               r"max_seq_length|tokens > max_seq_length", image="good.png", text=LONG + "<image>"),
    # DPO pairs with an empty or identical side
    per_loop("an empty chosen side", "pair", "skip", r"chosen is empty",
             {"dpo": {"id": "bad", "prompt": "Hi", "chosen": "", "rejected": "b"}}),
    per_loop("a blank rejected side", "pair", "skip", r"rejected is empty",
             {"dpo": {"id": "bad", "prompt": "Hi", "chosen": "a", "rejected": "  \n"}}),
    per_loop("identical sides", "pair", "skip", r"chosen and rejected are the same text",
             {"dpo": {"id": "bad", "prompt": "Hi", "chosen": "Same.", "rejected": " Same. "}}),
    # classification labels outside the classes, and of the wrong type
    *[per_loop(f"label {label!r}", "label", "error", match, {"cls": {"id": "bad", "prompt": "Hi", "label": label}})
      for label, match in [(3, r"label 3 is outside the 3 classes"), (-1, r"outside the 3 classes"),
                           ("fish", r"label 'fish' is not one of the classes"), (1.5, r"label 1\.5 is a float"),
                           (True, r"label True is not a class"), (None, r"label None is not a class"),
                           ([0, 1], r"is a list; a single_label record has one class"),
                           ({"id": 1}, r"is a dict")]],
    per_loop("no label", "label", "error", r"missing field 'label'", {"cls": {"id": "bad", "prompt": "Hi"}}),
]


def _good(loop: Loop, sample_id: str) -> dict:
    return loop.record(sample_id, "<image>\nWhat is it?", image="good.png")


def _write(case: Case, loop: Loop, folder: Path) -> Path:
    path = folder / f"{loop.name}.jsonl"
    if case.content == "<missing>":
        return folder / "nothing_here.jsonl"
    if case.content == "<folder>":
        (folder / "a_folder.jsonl").mkdir(exist_ok=True)
        return folder / "a_folder.jsonl"
    if isinstance(case.content, bytes):
        path.write_bytes(case.content)
    elif case.content == "line 2 is bad":
        path.write_text(json.dumps(_good(loop, "g0")) + "\n{oops\n" + json.dumps(_good(loop, "g1")) + "\n")
    elif case.content is not None:
        path.write_text(case.content)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in (_good(loop, "g0"), case.record(loop), _good(loop, "g1"))))
    return path


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(MODEL_TYPE)


def _matrix():
    return [pytest.param(case, loop, id=f"{loop}-{case.name}") for case in CASES for loop in case.loops]


@pytest.mark.parametrize("case, loop_name", _matrix())
def test_bad_input(case, loop_name, media, processor, tmp_path, caplog):
    loop = LOOP_TABLE[loop_name]
    path = _write(case, loop, tmp_path)  # the records' media paths resolve against image_folder=media
    if case.outcome == "error":
        with pytest.raises(ValueError) as info:
            loop.load(path)
        message = str(info.value)
        assert "\n" not in message, message
        assert str(path) in message, message
        if case.content is None:
            assert "sample 1" in message or "record 1" in message, message
        assert re.search(case.match, message), message
        return

    records = loop.load(path)
    dataset = loop.dataset(records, processor, media)
    ledger = SkipLedger(0.5, len(dataset))
    ids, truncated = [], []
    with caplog.at_level(logging.WARNING):
        for batch in DataLoader(dataset, batch_size=2, collate_fn=loop.collate(processor)):
            ledger.add(batch["skipped"])
            ids += batch["id"]
            truncated += batch.get("truncated", [])
            if loop_name == "grpo":  # the loop builds its own rows; the prompts must hold tokens
                assert all(len(p["input_ids"]) for p in batch["prompts"])
    assert {"g0", "g1"} <= set(ids), ids
    if case.outcome == "skip":
        assert ledger.count == 1 and "bad" not in ids, (ledger.summary(), ids)
        (record,) = ledger.summary()["records"]
        assert (record["file"], record["index"], record["id"]) == (str(path), 1, "bad"), record
        assert re.search(case.match, record["reason"]), record["reason"]
        assert any("id='bad'" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        return
    assert ledger.count == 0, ledger.summary()
    assert ids.count("bad") == 1, ids
    if case.outcome == "truncated":
        (record,) = truncated
        assert record["id"] == "bad" and record["tokens_before"] > MAX_SEQ_LENGTH >= record["tokens_after"]
        example = dataset[1]
        assert len(example["input_ids"]) <= MAX_SEQ_LENGTH
        if "image" in case.record(loop):  # media are never cut: every image token is still there
            assert int((example["mm_token_type_ids"] == 1).sum()) == int(example["image_grid_thw"].prod()) // 4
    else:
        assert truncated == []


def test_matrix_counts(capsys):
    """The number of bad-input cases per loop, by outcome (the closing note of #16 quotes it)."""
    counts = {loop: {} for loop in LOOPS}
    for case in CASES:
        for loop in case.loops:
            counts[loop][case.outcome] = counts[loop].get(case.outcome, 0) + 1
    with capsys.disabled():
        for loop, by_outcome in counts.items():
            print(f"\n{loop}: {sum(by_outcome.values())} bad-input cases: " +
                  ", ".join(f"{n} {outcome}" for outcome, n in sorted(by_outcome.items())))
    assert all(sum(c.values()) >= 40 for c in counts.values()), counts


# ------------------------------------------------------------------------------------------ around the matrix
RECIPES = {  # recipe: (shipped config, a bad record, the message it must give)
    "sft": ("demo", {"id": "bad", "conversations": _turns(("human", "Hi."), ("human", "Hi?"), ("gpt", "x"))},
            r"two user turns in a row"),
    "dpo": ("dpo_demo", {"id": "bad", "prompt": "Hi", "chosen": "a"}, r"missing field 'rejected'"),
    "grpo": ("grpo_demo", {"id": "bad", "conversations": _turns(("gpt", "x"))}, r"starts with an assistant turn"),
    "cls": ("cls_demo", {"id": "bad", "prompt": "Hi", "label": "fish"}, r"label 'fish' is not one of the classes"),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_bad_record_stops_every_recipe_before_its_model_loads(recipe, tmp_path, monkeypatch):
    """The recipe's own `main` under `run_recipe`: the bad record (sample 1, after a good one) ends the run with one
    line naming the file, the sample and the problem, and no model is ever built."""
    import importlib

    from vltrain.run import run_recipe

    module = importlib.import_module(f"recipes.{recipe}")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(module, "build_model", lambda *a, **k: pytest.fail("the model loaded before the data check"))
    config, bad, match = RECIPES[recipe]
    good = LOOP_TABLE[recipe].record("good", "What is it?")
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    argv = [config, f"data.train_path={path}", f"data.eval_path={path}", f"train.output_dir={tmp_path / 'out'}",
            "train.report_to=none"]
    with pytest.raises(SystemExit) as info:
        run_recipe(module.setup, module.main, argv)
    message = str(info.value.code)
    assert "\n" not in message and message.startswith("data error: "), message
    assert f"{path}: sample 1 (id='bad')" in message and re.search(match, message), message
    assert not (tmp_path / "out" / "config.yaml").exists()  # start_run never ran


def test_a_huge_jpeg_is_never_decoded_at_full_size(media):
    """A 20000x20000 JPEG (400 M pixels: 400 MB decoded grey, 1.2 GB as RGB) loads within the pixel bounds while the
    process's peak memory grows by under 100 MB (measured in a fresh process, ru_maxrss: ~31 MB reduced, ~390 MB for
    a plain PIL decode of the same file);
    its length estimate reads the header alone and equals the loaded size."""
    code = f"""
import resource
from vltrain.data.media import MediaOptions, image_size, load_image
opts = MediaOptions(image_factor=28, image_max_pixels={64 * 64 * 2})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = load_image({str(media / "huge.jpg")!r}, opts)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(image.size[0], image.size[1], image.getpixel((5, 5))[0], *image_size({str(media / "huge.jpg")!r}, opts), grew)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    width, height, grey, size_h, size_w, grew_kib = map(int, out.stdout.split())
    assert width * height <= 64 * 64 * 2 and (size_h, size_w) == (height, width)
    assert abs(grey - 128) <= 2  # the real pixels, reduced: mid grey
    assert grew_kib < 100_000, f"peak memory grew by {grew_kib} KiB: decoded at full size?"


def test_a_run_trains_on_the_good_samples_and_counts_the_bad_ones(media, tmp_path, one_thread):
    """recipes/sft.py end to end for one epoch on a file where 5 of 9 samples are unusable: it trains on the others,
    and summary.json lists exactly the skipped ids."""
    from conftest import sft_config
    from recipes.sft import main

    bad = {"missing": "nope.png", "cut": "cut.png", "text": "text.jpg", "bomb": "huge.png"}
    records = [_sft_record(f"good{k}", "<image>\nWhat is it?", image="good.png") for k in range(4)]
    records += [_sft_record(name, "<image>\nWhat is it?", image=image) for name, image in bad.items()]
    records.append(_sft_record("audio", "<video>\nWhat happens?", video="audio.mp4"))
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = sft_config(tmp_path, MODEL_TYPE, path, **{"data.image_folder": str(media), "data.max_bad_fraction": 0.6,
                                                     "train.max_steps": -1, "train.num_epochs": 1})
    summary = main(cfg)  # one epoch: every index is drawn once, a skipped one is replaced by the next usable sample
    assert summary["steps"] >= 4 and all(np.isfinite(summary["losses"]))
    assert summary["num_skipped"] == 5
    assert sorted(r["id"] for r in summary["skipped"]["records"]) == sorted([*bad, "audio"])
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["num_skipped"] == 5


def test_a_run_of_unusable_samples_stops_with_one_line_naming_the_file(media, processor, tmp_path):
    """More consecutive unusable samples than max_consecutive_skips: TooManySkips (a ValueError: run_recipe's one
    'data error' line), naming the file and the last sample's reason, not a RuntimeError traceback."""
    from vltrain.data.skips import TooManySkips

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(_sft_record(f"m{k}", "<image>\nWhat?", image="nope.png")) + "\n"
                            for k in range(4)))
    dataset = SFTDataset(load_conversations(path), processor, MEDIA, max_seq_length=MAX_SEQ_LENGTH,
                         image_folder=str(media), max_consecutive_skips=3)
    with pytest.raises(TooManySkips, match=rf"{re.escape(str(path))}: 3 consecutive samples from index 0 .*"
                                           r"id='m2': image file not found"):
        dataset[0]
