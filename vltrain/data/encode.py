"""Conversation -> Example: media loaded, chat template rendered, tokens expanded, labels masked.

An Example is a dict of tensors without a batch dimension, exactly what the family's processor
returns for one sample plus `labels`:
  input_ids (L,), labels (L,), mm_token_type_ids (L,),
  pixel_values (N, D) + image_grid_thw (I, 3)                     when the sample has images,
  pixel_values_videos (M, D) + video_grid_thw (V, 3) [+ second_per_grid_ts (V,)] with videos.

Labels: only assistant turns are supervised, their closing `<|im_end|>` included; system and user
turns, media tokens and the `<|im_start|>assistant\\n` headers are -100.
"""

from __future__ import annotations

import torch

from vltrain.data.formats import Conversation
from vltrain.data.media import MediaOptions, load_image, load_video, resolve_media_path

IGNORE_INDEX = -100
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


class SampleSkipped(Exception):
    """A sample that cannot be trained on (too long, no supervised tokens left, unreadable media)."""


def to_chat_messages(conv: Conversation, system_prompt: str | None = None) -> list[dict]:
    """The conversation as chat-template messages with typed content (media as bare placeholders)."""
    messages = []
    if system_prompt is not None and conv.turns[0].role != "system":
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    for turn in conv.turns:
        content = [{"type": "text", "text": p.value} if p.kind == "text" else {"type": p.kind} for p in turn.parts]
        messages.append({"role": turn.role, "content": content})
    return messages


def assistant_label_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """True on tokens of assistant turns: after `<|im_start|>assistant\\n`, through the next `<|im_end|>`."""
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer.encode("assistant\n", add_special_tokens=False)
    ids = input_ids.tolist()
    mask = torch.zeros(len(ids), dtype=torch.bool)
    i = 0
    while i < len(ids):
        if ids[i] == im_start and ids[i + 1 : i + 1 + len(header)] == header:
            start = i + 1 + len(header)
            end = start
            while end < len(ids) and ids[end] != im_end:
                end += 1
            mask[start : min(end + 1, len(ids))] = True  # include <|im_end|>
            i = end
        i += 1
    return mask


def process_conversation(conv: Conversation, processor, media: MediaOptions, *, image_folder: str | None = None,
                         system_prompt: str | None = None, add_generation_prompt: bool = False):
    """The processor's output (batch of one) for `conv`: media loaded, chat template rendered, media
    tokens expanded. Training encodes whole conversations; generation passes `add_generation_prompt`."""
    images = [load_image(resolve_media_path(ref, image_folder), media) for ref in conv.images]
    kwargs = {}
    if conv.videos:
        loaded = [load_video(resolve_media_path(ref, image_folder), media) for ref in conv.videos]
        kwargs.update(videos=[v for v, _ in loaded], video_metadata=[m for _, m in loaded], do_sample_frames=False)
    text = processor.apply_chat_template(to_chat_messages(conv, system_prompt), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return processor(text=[text], images=images or None, return_tensors="pt", do_resize=False, padding=False,
                     **kwargs)


def encode(
    conv: Conversation,
    processor,
    media: MediaOptions,
    *,
    max_seq_length: int,
    image_folder: str | None = None,
    system_prompt: str | None = None,
) -> dict[str, torch.Tensor]:
    """Encode one conversation; raises SampleSkipped (with the reason) when it cannot be used."""
    out = process_conversation(conv, processor, media, image_folder=image_folder, system_prompt=system_prompt)
    input_ids = out["input_ids"][0]
    mm_token_type_ids = out["mm_token_type_ids"][0]
    labels = torch.where(assistant_label_mask(input_ids, processor.tokenizer), input_ids, IGNORE_INDEX)

    if len(input_ids) > max_seq_length:
        # Cut text from the end, never a media token (nor the timestamps and wrappers around them).
        media_positions = (mm_token_type_ids != 0).nonzero()
        if len(media_positions) and media_positions[-1].item() + 2 > max_seq_length:
            raise SampleSkipped(
                f"sample {conv.sample_id!r}: {len(input_ids)} tokens and its media end at token "
                f"{media_positions[-1].item() + 1}, beyond max_seq_length={max_seq_length}"
            )
        input_ids, labels, mm_token_type_ids = (
            t[:max_seq_length] for t in (input_ids, labels, mm_token_type_ids)
        )
    if not (labels != IGNORE_INDEX).any():
        raise SampleSkipped(f"sample {conv.sample_id!r}: no assistant tokens left within max_seq_length={max_seq_length}")

    example = {"input_ids": input_ids, "labels": labels, "mm_token_type_ids": mm_token_type_ids}
    for key in MEDIA_KEYS:
        if key in out:
            example[key] = out[key]
    return example
