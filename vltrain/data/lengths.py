"""Token counts of samples WITHOUT decoding their pixels: what token-budget batching needs up front.

    from vltrain.data.lengths import estimate_lengths
    estimate = estimate_lengths(dataset, num_workers=4)  # SFTDataset, PairDataset or ClassificationDataset
    estimate.lengths[i] == example_length(dataset[i])    # vltrain.data.packing; estimate.encoded: fallbacks

Encoding a sample decodes every image and video it holds; measuring a million-image dataset that way
takes hours. Here a sample's length comes from the same text and the same media token counts, computed
from file headers:

* text: the conversation rendered by `render_chat` exactly as vltrain.data.encode renders it, each media
  placeholder expanded by the processor's own `replace_image_token` / `replace_video_token` (Qwen3.x's
  `<t seconds>` video blocks included) and the result tokenized: the token ids the processor would give.
* images: vltrain.data.media.image_size, the one rule load_image resizes by (width x height from the file header,
  smart_resize with data.image_min/max_pixels, or data.image_resized_width/height, in multiples of the family's
  image_factor) -> grid (1, h/patch, w/patch).
* videos: frame count, frame rate and size from the container (PyAV, no frame decoded; decord's index when
  VLTRAIN_VIDEO_BACKEND=decord: media.video_header), frame lists / folders from their count and the first frame's
  header, then media.py's frame sampling (`sample_frame_indices`, `frame_list_indices`) and per-frame sizing
  (`video_size`) -> grid (frames / temporal_patch_size, h/patch, w/patch) and the sampled frames' indices
  (the timestamps).
* truncation: the encoder's own `_truncate` runs on these token ids, so data.max_seq_length caps the
  estimate exactly where it caps the Example (and a sample the encoder skips is skipped here too).

What each dataset's Example counts (vltrain.data.packing.example_length): SFTDataset the whole conversation
after truncation; PairDataset prompt + chosen plus prompt + rejected (each completion rendered as the reply,
as encode_completions does); ClassificationDataset the conversation without generation prompt, truncated.
A sample that would be skipped (too long, nothing supervised left, an unusable pair) takes the length of
the sample that replaces it, as `SkippingDataset.__getitem__` does.

Exactness: images are exact (tests compare with the encoded Examples). Videos are exact when the container's
frame count is right (any normally muxed file). A file whose header promises more frames than it decodes is
re-sampled by the decoder: its frame count can only fall, but the per-frame size may grow under the
total-pixel cap, so the estimate can be off either way for that file. Samples whose media cannot be measured
from a header -- URLs, data URIs, a missing or unreadable file, a size the resize rule refuses -- are encoded
instead (the encoder then names the problem or skips the sample) and counted in `LengthEstimate.encoded`.
Datasets of any other class (subclasses included: they may encode differently) are encoded entirely.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from qwen_vl_utils import vision_process as qvu
from torch.utils.data import DataLoader, Dataset
from transformers.video_utils import VideoMetadata

from vltrain.data.dataset import SFTDataset
from vltrain.data.encode import (IGNORE_INDEX, SampleSkipped, _truncate, assistant_label_mask, to_chat_messages)
from vltrain.data.formats import Conversation
from vltrain.data.labels import ClassificationDataset
from vltrain.data.media import (MediaError, MediaOptions, frame_list_indices, frame_paths, image_header_size,
                                image_size, local_media_path, resolve_media_path, sample_frame_indices, video_header,
                                video_size)
from vltrain.data.packing import example_length
from vltrain.data.pairs import PairDataset, unusable_reason
from vltrain.data.template import render_chat


class Unmeasurable(Exception):
    """A sample whose length cannot be estimated from headers (the estimate encodes it instead)."""


@dataclass
class LengthEstimate:
    lengths: list[int]  # tokens of every example, in dataset order
    encoded: list[int] = field(default_factory=list)  # indices measured by encoding (header unreadable, URL, ...)
    seconds: float = 0.0
    estimated: bool = True  # False: the dataset's class has no estimator, every example was encoded

    def summary(self) -> str:
        if not self.estimated:
            return f"lengths of {len(self.lengths)} samples measured by encoding them in {self.seconds:.1f}s"
        return (f"lengths of {len(self.lengths)} samples estimated from media headers in {self.seconds:.1f}s"
                f" ({len(self.encoded)} encoded instead: media without a readable header)")


# ------------------------------------------------------------------------------------------ media
def video_layout(ref, opts: MediaOptions) -> tuple[int, int, VideoMetadata]:
    """(height, width, metadata with the sampled frames' indices) that media.load_video gives video `ref`
    (MediaError for a file without a readable header)."""
    if opts.fps is not None and opts.nframes is not None:
        raise Unmeasurable("fps and nframes both set")  # load_video names the error
    if isinstance(ref, (list, tuple)) or os.path.isdir(ref):
        paths = frame_paths(ref)
        fps, total = opts.fps or qvu.FPS, len(paths)
        indices = frame_list_indices(str(ref), total, opts)
        height, width = image_header_size(paths[indices[0]])
    else:
        total, fps, height, width = video_header(local_media_path(ref, "video"))
        indices = sample_frame_indices(ref, total, fps, opts)
    height, width = video_size(ref, height, width, len(indices), opts)
    metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps, frames_indices=indices,
                             width=width, height=height)
    return height, width, metadata


def _media_replacements(conv: Conversation, processor, media: MediaOptions, image_folder) -> tuple[list, list]:
    """The processor's expansion text of every image and video of `conv`, from headers only."""
    try:
        patch = processor.image_processor.patch_size
        grids = []
        for ref in conv.images:
            height, width = image_size(resolve_media_path(ref, image_folder), media)
            grids.append([1, height // patch, width // patch])
        images = [processor.replace_image_token({"image_grid_thw": torch.tensor(grids)}, i) for i in range(len(grids))]
        videos = []
        if conv.videos:
            video_processor = processor.video_processor
            temporal, patch = video_processor.temporal_patch_size, video_processor.patch_size
            grids, metadata = [], []
            for ref in conv.videos:
                path = [resolve_media_path(r, image_folder) for r in ref] if isinstance(ref, list) else \
                    resolve_media_path(ref, image_folder)
                height, width, meta = video_layout(path, media)
                grids.append([math.ceil(len(meta.frames_indices) / temporal), height // patch, width // patch])
                metadata.append(meta)
            inputs = {"video_grid_thw": torch.tensor(grids), "video_metadata": metadata}
            videos = [processor.replace_video_token(inputs, i) for i in range(len(grids))]
    except MediaError as e:  # unreadable, too large, a size the resize rule refuses: the encoder reports it
        raise Unmeasurable(str(e)) from e
    return images, videos


def _tokens(conv: Conversation, ds, *, add_generation_prompt: bool) -> tuple[str, dict[str, torch.Tensor]]:
    """(rendered text, {"input_ids", "mm_token_type_ids"} (L,)): what `encode._process` gets from the processor."""
    processor = ds.processor
    text = render_chat(processor, to_chat_messages(conv, ds.system_prompt), thinking=ds.thinking,
                       add_generation_prompt=add_generation_prompt, sample_id=conv.sample_id)
    images, videos = _media_replacements(conv, processor, ds.media, ds.image_folder)
    if text.count(processor.image_token) != len(images) or text.count(processor.video_token) != len(videos):
        raise Unmeasurable("placeholder count differs from the media count")  # the processor refuses it
    expanded = processor.get_text_with_replacements([text], images, videos)[0][0]
    ids = _tokenize(processor, expanded)
    types = torch.tensor(processor.create_mm_token_type_ids([ids.numpy()])[0], dtype=torch.long)
    return text, {"input_ids": ids, "mm_token_type_ids": types}


def _tokenize(processor, expanded: str) -> torch.Tensor:
    """processor.tokenizer(expanded)'s ids, (L,) long. Each run of a media token (hundreds to thousands in a row)
    is tokenized as one and repeated afterwards: media tokens are added tokens, split off before the BPE, so a run's
    length does not change how the text around it tokenizes (tests compare with the processor's ids)."""
    tokens = [t for t in (processor.image_token, processor.video_token) if t in expanded]
    if not tokens:
        return torch.tensor(processor.tokenizer(expanded)["input_ids"], dtype=torch.long)
    run = re.compile("|".join(f"(?:{re.escape(t)})+" for t in tokens))
    counts = []

    def collapse(match):
        token = next(t for t in tokens if match.group().startswith(t))
        counts.append(len(match.group()) // len(token))
        return token

    ids = np.asarray(processor.tokenizer(run.sub(collapse, expanded))["input_ids"], dtype=np.int64)
    media = np.isin(ids, [processor.tokenizer.convert_tokens_to_ids(t) for t in tokens])
    assert int(media.sum()) == len(counts), "a media token did not tokenize on its own"
    repeats = np.ones_like(ids)
    repeats[media] = counts
    return torch.from_numpy(np.repeat(ids, repeats))  # numpy: torch's small ops spin threads on a busy machine


# ------------------------------------------------------------------------------------------ per dataset
def _sft_length(ds: SFTDataset, index: int) -> int:
    conv = ds.conversations[index]
    tokenizer = ds.processor.tokenizer
    _, tokens = _tokens(conv, ds, add_generation_prompt=False)
    ids = tokens["input_ids"]
    tokens["labels"] = torch.where(assistant_label_mask(ids, tokenizer), ids, IGNORE_INDEX)
    tokens, _ = _truncate(conv, tokens, ds.max_seq_length, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    if not (tokens["labels"] != IGNORE_INDEX).any():
        raise SampleSkipped(conv.sample_id, "no assistant tokens")
    return len(tokens["input_ids"])


def _pair_length(ds: PairDataset, index: int) -> int:
    """prompt + chosen + prompt + rejected, as encode_completions builds the two sequences."""
    pair = ds.pairs[index]
    if unusable_reason(pair) is not None:
        raise SampleSkipped(pair.sample_id, unusable_reason(pair))
    prompt_text, tokens = _tokens(pair.prompt, ds, add_generation_prompt=True)
    num_prompt = len(tokens["input_ids"])
    messages = to_chat_messages(pair.prompt, ds.system_prompt)
    total = 0
    for completion in (pair.chosen, pair.rejected):
        reply = {"role": "assistant", "content": [{"type": "text", "text": completion}]}
        full = render_chat(ds.processor, messages + [reply], thinking=ds.thinking, add_generation_prompt=False,
                           sample_id=pair.sample_id)
        if not full.startswith(prompt_text):
            raise Unmeasurable("template renders the prompt differently")  # the encoder raises its error
        num = num_prompt + len(ds.processor.tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"])
        if num > ds.max_seq_length:
            raise SampleSkipped(pair.sample_id, f"{num} tokens > max_seq_length")
        total += num
    return total


def _cls_length(ds: ClassificationDataset, index: int) -> int:
    conv = ds.conversations[index]
    _, tokens = _tokens(conv, ds, add_generation_prompt=False)
    im_end = ds.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens, _ = _truncate(conv, tokens, ds.max_seq_length, im_end)
    return len(tokens["input_ids"])


# Exact classes only: a subclass may encode differently, so it is measured by encoding.
ESTIMATORS = {SFTDataset: _sft_length, PairDataset: _pair_length, ClassificationDataset: _cls_length}


def estimate_length(dataset, index: int) -> tuple[int, bool]:
    """(tokens of `dataset[index]`, whether it had to be encoded). A sample the encoder would skip takes the
    length of its replacement, as `SkippingDataset.__getitem__` replaces it."""
    estimator = ESTIMATORS[type(dataset)]
    for offset in range(dataset.max_consecutive_skips):
        try:
            return estimator(dataset, (index + offset) % len(dataset)), False
        except SampleSkipped:
            continue
        except Unmeasurable:
            break
    return example_length(dataset[index]), True  # the encoder decides (and raises after too many skips)


class _Estimates(Dataset):
    """`estimate_length` per index, so DataLoader workers can share the work."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, int, bool]:
        return (index, *estimate_length(self.dataset, index))


def estimate_lengths(dataset, num_workers: int = 0) -> LengthEstimate:
    """Every example's token count (module docstring), spread over `num_workers` loader workers."""
    start = time.perf_counter()
    if type(dataset) not in ESTIMATORS:
        from vltrain.data.packing import encoded_lengths

        return LengthEstimate(encoded_lengths(dataset, num_workers), estimated=False,
                              seconds=time.perf_counter() - start)
    loader = DataLoader(_Estimates(dataset), batch_size=64, num_workers=num_workers, collate_fn=list)
    rows = sorted(row for chunk in loader for row in chunk)
    assert [i for i, _, _ in rows] == list(range(len(dataset)))
    return LengthEstimate([n for _, n, _ in rows], [i for i, _, encoded in rows if encoded],
                          seconds=time.perf_counter() - start)
