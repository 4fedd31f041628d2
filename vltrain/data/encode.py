"""Conversation -> Example: media loaded, chat template rendered, tokens expanded, labels masked.

Every variant goes through `process_conversation` (media loaded once, the text rendered only by
`vltrain.data.template.render_chat`, then the family's processor) and returns a plain dict of tensors
without a batch dimension, plus the sample's `"id"`:

* `encode` (SFT): the whole conversation with assistant labels, and `"truncated"`::

    input_ids (L,), labels (L,), mm_token_type_ids (L,),
    pixel_values (N, D) + image_grid_thw (I, 3)                     when the sample has images,
    pixel_values_videos (M, D) + video_grid_thw (V, 3) [+ second_per_grid_ts (V,)] with videos,
    id: str, truncated: [] or [{"file", "index", "id", "tokens_before", "tokens_after"}]

* `encode_prompt` (generation, GRPO): the prompt with the generation header (`<|im_start|>assistant\\n`),
  no labels: input_ids, mm_token_type_ids, media tensors, id.
* `encode_completions` (DPO chosen/rejected, GRPO groups): the prompt's media once, then one sequence per
  completion: {"id", "prompt_length": P, media tensors, "sequences": [{"input_ids", "labels",
  "mm_token_type_ids"} (P + C_k,) ...]}. Each sequence is the prompt's tokens followed by the tokens of
  the chat template's rendering of that completion as the assistant reply (the text after the rendered
  prompt, `<|im_end|>\\n` included); labels cover only those reply tokens through `<|im_end|>`. With a
  thinking template the generation prompt ends in `<think>\\n` (data.thinking "keep") or in the empty
  block ("off"); that part is prompt, as it is when the model generates. Every sequence
  holds the same media tokens, so each one runs with the shared pixel tensors. A sequence longer than
  `max_seq_length` skips the record (a completion is never cut).
* `encode_unlabeled` (classification): a prompt or a whole conversation, no labels; truncated like
  `encode` (text from the end, never media) and recorded in `"truncated"`.

Labels: only assistant turns are supervised, their closing `<|im_end|>` included; system and user
turns, media tokens and the `<|im_start|>assistant\\n` headers are -100.

Truncation policy (`max_seq_length`): text is cut from the end, never a media token (nor the wrapper
tokens right after the last one); a sample whose media end beyond the limit is skipped. An assistant turn
cut before its `<|im_end|>` would teach an answer that never stops, so the cut turn's labels are dropped
and the sequence ends after the last complete assistant turn (or after the media, if they come later);
earlier complete turns still train. Nothing supervised left -> the sample is skipped. Every truncation is
warned (sample id, tokens before and after) and recorded in the Example's `"truncated"`.

A sample that cannot be used raises `SampleSkipped` (with the reason) or `MediaError`; any exception from
the processor becomes `SampleSkipped`, and so does any decoder error while loading media. The dataset turns
these into skip records. Errors of the chat template (render_chat) propagate: by its policy they are
data errors that stop the run.
"""

from __future__ import annotations

import logging

import torch

from vltrain.data.formats import Conversation
from vltrain.data.media import MediaError, MediaOptions, load_image, load_video, resolve_media_path
from vltrain.data.template import render_chat, resolve_system_prompt

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
TOKEN_KEYS = ("input_ids", "labels", "mm_token_type_ids")


class SampleSkipped(Exception):
    """A sample that cannot be trained on (too long, no supervised tokens left, a processor error)."""

    def __init__(self, sample_id: str, reason: str):
        super().__init__(f"sample {sample_id!r}: {reason}")
        self.sample_id, self.reason = sample_id, reason

    def __reduce__(self):
        return type(self), (self.sample_id, self.reason)


def _where(conv: Conversation) -> str:
    return f"{conv.source}: sample {conv.index} (id={conv.sample_id!r})"


def to_chat_messages(conv: Conversation, system_prompt: str | None = None) -> list[dict]:
    """The conversation as chat-template messages with typed content (media as bare placeholders)."""
    messages = []
    system_prompt = resolve_system_prompt(system_prompt)  # `builtin:<name>` -> its text
    if system_prompt is not None and conv.turns[0].role != "system":
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    for turn in conv.turns:
        content = [{"type": "text", "text": p.value} if p.kind == "text" else {"type": p.kind} for p in turn.parts]
        messages.append({"role": turn.role, "content": content})
    return messages


def assistant_label_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """(L,) bool, True on tokens of assistant turns: after `<|im_start|>assistant\\n`, through the next `<|im_end|>`."""
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


def _load_media(conv: Conversation, media: MediaOptions, image_folder: str | None) -> dict:
    """The processor's media keyword arguments; every file of the conversation decoded once."""
    def load(loader, ref):
        path = resolve_media_path(ref, image_folder)
        try:
            return loader(path, media)
        except MediaError:
            raise
        except Exception as e:  # a decoder error that media.py does not name
            raise MediaError(f"cannot load {path}: {type(e).__name__}: {e}") from e

    kwargs = {}
    images = [load(load_image, ref) for ref in conv.images]
    if images:
        kwargs["images"] = images
    if conv.videos:
        loaded = [load(load_video, ref) for ref in conv.videos]
        kwargs.update(videos=[v for v, _ in loaded], video_metadata=[m for _, m in loaded], do_sample_frames=False)
    return kwargs


def _process(conv: Conversation, processor, media: MediaOptions, *, image_folder, system_prompt, thinking,
             add_generation_prompt) -> tuple[str, dict]:
    """(rendered text, processor output with a batch of one): the single path every variant takes."""
    # The template's errors (e.g. reasoning in the data under data.thinking="off") are data errors
    # that stop the run, by render_chat's policy; the processor's are this sample's problem.
    text = render_chat(processor, to_chat_messages(conv, system_prompt), thinking=thinking,
                       add_generation_prompt=add_generation_prompt, sample_id=conv.sample_id)
    media_kwargs = _load_media(conv, media, image_folder)
    if "videos" in media_kwargs and hasattr(getattr(processor, "video_processor", None), "cap_pixels_per_frame"):
        # media.py has sized the frames already (do_resize=False): the processor's per-frame pixel cap has nothing
        # to do, and saying so silences transformers' warning about its coming default
        media_kwargs["videos_kwargs"] = {"cap_pixels_per_frame": False}
    try:
        out = processor(text=[text], return_tensors="pt", do_resize=False, padding=False, **media_kwargs)
    except Exception as e:
        raise SampleSkipped(conv.sample_id, f"processor failed: {type(e).__name__}: {e}") from e
    return text, out


def process_conversation(conv: Conversation, processor, media: MediaOptions, *, image_folder: str | None = None,
                         system_prompt: str | None = None, add_generation_prompt: bool = False,
                         thinking: str = "keep"):
    """The processor's output (batch of one: input_ids (1, L), ...) for `conv`: media loaded, chat template
    rendered, media tokens expanded. Training encodes whole conversations; generation passes
    `add_generation_prompt`."""
    return _process(conv, processor, media, image_folder=image_folder, system_prompt=system_prompt,
                    thinking=thinking, add_generation_prompt=add_generation_prompt)[1]


def _media_tensors(out) -> dict[str, torch.Tensor]:
    return {key: out[key] for key in MEDIA_KEYS if key in out}


def _media_end(mm_token_type_ids: torch.Tensor) -> int:
    """Tokens needed to keep every media token and the `<|vision_end|>` after the last one (0: no media)."""
    positions = (mm_token_type_ids != 0).nonzero()
    return int(positions[-1]) + 2 if len(positions) else 0


def _truncate(conv: Conversation, tokens: dict[str, torch.Tensor], max_seq_length: int, im_end: int):
    """`tokens` (each (L,)) cut to `max_seq_length` by the policy of the module docstring.

    Returns (tokens, truncated records: [] or one dict); raises SampleSkipped when the media do not fit.
    """
    num_before = len(tokens["input_ids"])
    if num_before <= max_seq_length:
        return tokens, []
    media_end = _media_end(tokens["mm_token_type_ids"])
    if media_end > max_seq_length:
        raise SampleSkipped(conv.sample_id, f"{num_before} tokens and its media end at token {media_end}, beyond "
                                            f"max_seq_length={max_seq_length}")
    tokens = {k: t[:max_seq_length] for k, t in tokens.items()}
    note = ""
    if "labels" in tokens:
        labels = tokens["labels"].clone()
        supervised = (labels != IGNORE_INDEX).nonzero().flatten()
        if len(supervised) and tokens["input_ids"][supervised[-1]] != im_end:  # the last assistant turn was cut
            start = int(supervised[-1])
            while start > 0 and labels[start - 1] != IGNORE_INDEX:
                start -= 1
            labels[start:] = IGNORE_INDEX
            note = " (the cut assistant turn is not trained)"
        supervised = (labels != IGNORE_INDEX).nonzero().flatten()
        if not len(supervised):
            raise SampleSkipped(conv.sample_id, f"no complete assistant turn within max_seq_length={max_seq_length} "
                                                f"({num_before} tokens)")
        keep = max(int(supervised[-1]) + 1, media_end)  # nothing after the last label changes the loss
        tokens = {k: t[:keep] for k, t in (tokens | {"labels": labels}).items()}
    num_after = len(tokens["input_ids"])
    log.warning("truncated %s: %d -> %d tokens%s", _where(conv), num_before, num_after, note)
    record = {"file": conv.source, "index": conv.index, "id": conv.sample_id,
              "tokens_before": num_before, "tokens_after": num_after}
    return tokens, [record]


def encode(
    conv: Conversation,
    processor,
    media: MediaOptions,
    *,
    max_seq_length: int,
    image_folder: str | None = None,
    system_prompt: str | None = None,
    thinking: str = "keep",
) -> dict:
    """The SFT Example of one conversation (module docstring); raises SampleSkipped when it cannot be used."""
    if not conv.has_reply:
        raise ValueError(f"{_where(conv)}: ends with a user turn, nothing to train on (encode_prompt is for prompts)")
    _, out = _process(conv, processor, media, image_folder=image_folder, system_prompt=system_prompt,
                      thinking=thinking, add_generation_prompt=False)
    tokenizer = processor.tokenizer
    input_ids = out["input_ids"][0]
    tokens = {
        "input_ids": input_ids,
        "labels": torch.where(assistant_label_mask(input_ids, tokenizer), input_ids, IGNORE_INDEX),
        "mm_token_type_ids": out["mm_token_type_ids"][0],
    }
    tokens, truncated = _truncate(conv, tokens, max_seq_length, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    if not (tokens["labels"] != IGNORE_INDEX).any():
        raise SampleSkipped(conv.sample_id, f"no assistant tokens within max_seq_length={max_seq_length}")
    return {"id": conv.sample_id, **tokens, **_media_tensors(out), "truncated": truncated}


def _require_prompt(conv: Conversation, variant: str) -> None:
    if conv.has_reply:
        raise ValueError(f"{_where(conv)}: {variant} needs a prompt ending with a user turn, this one ends with an "
                         "assistant turn (load prompts with require_reply=False, or drop the reply)")


def encode_prompt(
    conv: Conversation,
    processor,
    media: MediaOptions,
    *,
    image_folder: str | None = None,
    system_prompt: str | None = None,
    thinking: str = "keep",
    max_seq_length: int | None = None,
) -> dict:
    """The prompt alone with the generation header, no labels: {"id", input_ids (P,), mm_token_type_ids (P,),
    media tensors}. A prompt longer than `max_seq_length` is skipped (a prompt is never cut)."""
    _require_prompt(conv, "encode_prompt")
    _, out = _process(conv, processor, media, image_folder=image_folder, system_prompt=system_prompt,
                      thinking=thinking, add_generation_prompt=True)
    input_ids = out["input_ids"][0]
    if max_seq_length is not None and len(input_ids) > max_seq_length:
        raise SampleSkipped(conv.sample_id, f"prompt of {len(input_ids)} tokens > max_seq_length={max_seq_length}")
    return {"id": conv.sample_id, "input_ids": input_ids, "mm_token_type_ids": out["mm_token_type_ids"][0],
            **_media_tensors(out)}


def encode_completions(
    prompt_conv: Conversation,
    completions: list[str],
    processor,
    media: MediaOptions,
    *,
    image_folder: str | None = None,
    system_prompt: str | None = None,
    thinking: str = "keep",
    max_seq_length: int | None = None,
) -> dict:
    """One sequence per completion sharing the prompt's media (module docstring for the layout).

    Media are loaded and the processor runs once, on the prompt; each completion is rendered by the
    chat template as the assistant reply and only its text after the rendered prompt is tokenized.
    """
    _require_prompt(prompt_conv, "encode_completions")
    if not completions or not all(isinstance(c, str) for c in completions):
        raise ValueError(f"{_where(prompt_conv)}: completions must be a non-empty list of strings")
    prompt_text, out = _process(prompt_conv, processor, media, image_folder=image_folder, system_prompt=system_prompt,
                                thinking=thinking, add_generation_prompt=True)
    tokenizer = processor.tokenizer
    prompt_ids, prompt_types = out["input_ids"][0], out["mm_token_type_ids"][0]
    num_prompt = len(prompt_ids)
    messages = to_chat_messages(prompt_conv, system_prompt)
    sequences = []
    for k, completion in enumerate(completions):
        reply = {"role": "assistant", "content": [{"type": "text", "text": completion}]}
        full = render_chat(processor, messages + [reply], thinking=thinking, add_generation_prompt=False,
                           sample_id=prompt_conv.sample_id)
        if not full.startswith(prompt_text):
            raise ValueError(f"{_where(prompt_conv)} completion {k}: the chat template renders the prompt differently "
                             "with a reply than as a generation prompt, so the prompt's tokens cannot be shared")
        reply_ids = torch.tensor(tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"],
                                 dtype=prompt_ids.dtype)
        input_ids = torch.cat([prompt_ids, reply_ids])
        if max_seq_length is not None and len(input_ids) > max_seq_length:
            raise SampleSkipped(prompt_conv.sample_id, f"completion {k}: {len(input_ids)} tokens > "
                                                       f"max_seq_length={max_seq_length}")
        mask = assistant_label_mask(input_ids, tokenizer)
        mask[:num_prompt] = False  # a generation header that opens a <think> block belongs to the prompt
        sequences.append({
            "input_ids": input_ids,
            "labels": torch.where(mask, input_ids, IGNORE_INDEX),
            "mm_token_type_ids": torch.cat([prompt_types, torch.zeros_like(reply_ids)]),
        })
    return {"id": prompt_conv.sample_id, "prompt_length": num_prompt, **_media_tensors(out), "sequences": sequences}


def encode_unlabeled(
    conv: Conversation,
    processor,
    media: MediaOptions,
    *,
    image_folder: str | None = None,
    system_prompt: str | None = None,
    thinking: str = "keep",
    add_generation_prompt: bool = False,
    max_seq_length: int | None = None,
) -> dict:
    """A prompt or a whole conversation without labels (classification): {"id", input_ids (L,),
    mm_token_type_ids (L,), media tensors, "truncated"}; cut to `max_seq_length` like `encode`."""
    _, out = _process(conv, processor, media, image_folder=image_folder, system_prompt=system_prompt,
                      thinking=thinking, add_generation_prompt=add_generation_prompt)
    tokens = {"input_ids": out["input_ids"][0], "mm_token_type_ids": out["mm_token_type_ids"][0]}
    truncated = []
    if max_seq_length is not None:
        im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        tokens, truncated = _truncate(conv, tokens, max_seq_length, im_end)
    return {"id": conv.sample_id, **tokens, **_media_tensors(out), "truncated": truncated}
