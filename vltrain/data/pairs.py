"""Preference pairs for DPO: records -> PreferencePair -> pair Example -> one batch of chosen/rejected sequences.

Accepted record shapes (a JSON list or JSONL, read by vltrain.data.formats.read_records):

* The upstream DPO format, unchanged::

    {"id": "1", "image": "a.jpg" | [...], "video": "v.mp4" | [...], "system": "optional",
     "prompt": "<image>\\nDescribe the image.", "chosen": "A red bus.", "rejected": "A cat."}

  The prompt is one user turn parsed exactly like a LLaVA record (formats.parse_record): `<image>` /
  `<video>` placeholders consumed in order, media first when the prompt has none, text-only without media keys.

* Conversational (TRL's shape): "prompt" is a list of OpenAI-style messages (formats.py's messages format,
  typed parts with media paths; earlier user/assistant turns allowed, an optional leading system turn) ending
  with a user turn; "chosen" / "rejected" are each a string, an assistant message
  `{"role": "assistant", "content": str | [{"type": "text", "text": ...}]}`, or a list of exactly one such message.

A malformed record (a missing or mistyped prompt / chosen / rejected, a completion that is not an assistant
message or holds media, a prompt ending with an assistant turn) is a DataFormatError naming the file, sample,
id and field, raised by `load_pairs` before any model loads. A well-formed but unusable PAIR -- chosen or
rejected empty, chosen == rejected (after strip), missing media, a sequence beyond max_seq_length -- is
skipped by the dataset like any unusable SFT sample (logged, counted, replaced: vltrain.data.skips).

Pair Example (PairDataset; the prompt's media loaded once, vltrain.data.encode.encode_completions)::

    {"id", "prompt_length": P, media tensors of the prompt once (pixel_values (N, D), image_grid_thw (I, 3),
     pixel_values_videos, video_grid_thw, second_per_grid_ts), "chosen": {"input_ids", "labels",
     "mm_token_type_ids"} (P + C,), "rejected": {...} (P + R,), "skipped": [...], **extra record fields}

Batch (PairCollator) of P pairs: S = 2P sequences ordered [chosen_0, rejected_0, chosen_1, ...] (so
`chosen = seq[0::2]`, `rejected = seq[1::2]`), packed into one row (vltrain.data.packing.pack_examples) or
right-padded (vltrain.data.dataset.pad_collate). Every sequence holds its pair's media tokens, so the model
sees each image twice; the pixels travel once:

    pixel_values / pixel_values_videos   each pair's pixels once, in pair order (the unique media)
    image_grid_thw / video_grid_thw /    one row per OCCURRENCE, i.e. per sequence in sequence order (the
    second_per_grid_ts                   model's placeholder count and rope index expect these)
    image_source / video_source          (occurrences,) long: the unique image / video of every occurrence
    id, prompt_length, extra fields      lists of P; skipped concatenated; num_pairs = P

`pixel_values` as a naive collation would give it (each pair's pixels repeated for chosen and rejected) is
`cat([unique[image_source[o]] for o in occurrences])` with `unique` = pixel_values split by the unique
images' patch counts (`grid.prod()` of each source's first occurrence: `unique_grids`); `expand_media` does that.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from vltrain.data.dataset import RESERVED_KEYS, SkippingDataset, collate_extras, located, pad_collate
from vltrain.data.encode import SampleSkipped, encode_completions
from vltrain.data.formats import Conversation, DataFormatError, check_text, parse_record, read_records, record_id
from vltrain.data.media import MediaOptions
from vltrain.data.packing import pack_examples
from vltrain.families import RopeIndex

PAIR_FIELDS = ("prompt", "chosen", "rejected")
COMPLETIONS = ("chosen", "rejected")
GRID_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
# (pixel key, grid key, source key): unique pixels, per-occurrence grids, occurrence -> unique index
MEDIA_SOURCES = (("pixel_values", "image_grid_thw", "image_source"),
                 ("pixel_values_videos", "video_grid_thw", "video_source"))
# Keys a pair Example or batch builds itself; a record's extra field may not take one of these names.
PAIR_RESERVED_KEYS = RESERVED_KEYS | {"prompt_length", "chosen", "rejected", "num_pairs", "image_source",
                                      "video_source"}


@dataclass
class PreferencePair:
    prompt: Conversation  # ends with a user turn; source and index set
    chosen: str
    rejected: str

    @property
    def sample_id(self) -> str:
        return self.prompt.sample_id


# ------------------------------------------------------------------------------------------ records
def _completion(value, name: str, where: str) -> str:
    """The text of a chosen / rejected field: a string, an assistant message, or a list of exactly one."""
    at = f"{where}: field {name!r}"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if len(value) != 1:
            raise DataFormatError(f"{at} is a list of {len(value)} messages; a completion is one assistant message")
        value = value[0]
    if not isinstance(value, dict):
        raise DataFormatError(f"{at} must be a string or an assistant message, got {type(value).__name__}")
    if value.get("role") != "assistant":
        raise DataFormatError(f"{at} has role={value.get('role')!r}; a completion is an assistant message")
    content = value.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataFormatError(f"{at}: content must be a string or a list of text parts")
    texts = []
    for k, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise DataFormatError(f"{at}: content[{k}] is a {kind!r} part; a completion holds text parts only")
        texts.append(part["text"])
    return "".join(texts)  # the chat template joins text parts without a separator too


def _parse_prompt(record: dict, index: int, source: str) -> Conversation:
    """formats.parse_record of the prompt-only record; its errors name the pair's field 'prompt' instead of
    the LLaVA / messages keys the pair record does not have (indices are the prompt list's own)."""
    try:
        return parse_record(record, index, source, require_reply=False)
    except DataFormatError as e:
        message = str(e).replace(" conversations[0]", " prompt").replace(" messages[", " prompt[")
        raise DataFormatError(message.replace("'messages' must", "'prompt' must")) from None


def parse_pair(record: dict, index: int, source: str = "data") -> PreferencePair:
    """Validate one DPO record of either shape (module docstring); errors name `source`, index, id and field."""
    sample_id = record_id(record, index, source)
    where = f"{source}: sample {index} (id={sample_id!r})"
    for name in PAIR_FIELDS:
        if name not in record:
            raise DataFormatError(f"{where}: missing field {name!r} (a preference pair needs prompt, chosen, "
                                  "rejected)")
    for name in ("conversations", "messages"):
        if name in record:
            raise DataFormatError(f"{where}: field {name!r} does not belong to a preference pair; give the prompt "
                                  "in 'prompt' (a string or a list of messages)")
    rest = {k: v for k, v in record.items() if k not in PAIR_FIELDS}
    prompt = record["prompt"]
    if isinstance(prompt, str):  # upstream: one user turn, placeholders and media as in a LLaVA record
        conv = _parse_prompt({**rest, "conversations": [{"from": "human", "value": prompt}]}, index, source)
    elif isinstance(prompt, list):
        conv = _parse_prompt({**rest, "messages": prompt}, index, source)
        if conv.has_reply:
            raise DataFormatError(f"{where}: field 'prompt' ends with an assistant turn; a prompt ends with the "
                                  "user turn that chosen / rejected answer")
    else:
        raise DataFormatError(f"{where}: field 'prompt' must be a string or a list of messages, got "
                              f"{type(prompt).__name__}")
    completions = [_completion(record[name], name, where) for name in COMPLETIONS]
    for name, text in zip(COMPLETIONS, completions):
        check_text(text, f"{where}: field {name!r}")
    return PreferencePair(conv, *completions)


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Every record of a DPO data file, validated up front so a bad one fails before the model loads (extra fields
    named like a key of the pair Example included)."""
    return [PairDataset._checked(parse_pair(r, i, str(path)), i, None) for i, r in enumerate(read_records(path))]


def unusable_reason(pair: PreferencePair) -> str | None:
    """Why the pair teaches nothing (empty completion, chosen == rejected after strip), or None."""
    for name in COMPLETIONS:
        if not getattr(pair, name).strip():
            return f"{name} is empty"
    if pair.chosen.strip() == pair.rejected.strip():
        return "chosen and rejected are the same text"
    return None


# ------------------------------------------------------------------------------------------ dataset
class PairDataset(SkippingDataset):
    """Preference pairs (a DPO JSON/JSONL file or PreferencePairs), encoded on access.

    An unusable pair (module docstring) raises SampleSkipped / MediaError from `encode`; `__getitem__`
    replaces it by the next pair and lists it in `skipped`, exactly as SFTDataset does.
    """

    def __init__(self, path_or_pairs: str | Path | list[PreferencePair], processor, media: MediaOptions, *,
                 max_seq_length: int, image_folder=None, system_prompt=None, thinking: str = "keep",
                 source: str | None = None, max_consecutive_skips: int = 16):
        pairs, source = self._records(path_or_pairs, load_pairs, source, "preference pairs")
        self.pairs = [self._checked(p, i, source) for i, p in enumerate(pairs)]
        self.path = source or self.pairs[0].prompt.source
        self._set_options(processor, media, max_seq_length=max_seq_length, image_folder=image_folder,
                          system_prompt=system_prompt, thinking=thinking, max_consecutive_skips=max_consecutive_skips)

    @staticmethod
    def _checked(pair: PreferencePair, position: int, source: str | None) -> PreferencePair:
        """`pair` with its prompt's source / index filled in; a replied prompt and reserved extra names refused."""
        conv = located(pair.prompt, position, source)
        pair = dataclasses.replace(pair, prompt=conv)
        where = f"{conv.source}: sample {conv.index} (id={conv.sample_id!r})"
        if conv.has_reply:
            raise DataFormatError(f"{where}: the prompt ends with an assistant turn; it must end with a user turn")
        clash = sorted(PAIR_RESERVED_KEYS & conv.extra.keys())
        if clash:
            raise DataFormatError(f"{where}: field {clash[0]!r} would overwrite the pair Example's own "
                                  f"{clash[0]!r}; rename it in the data file")
        return pair

    def __len__(self) -> int:
        return len(self.pairs)

    def conversation(self, index: int) -> Conversation:
        return self.pairs[index].prompt

    def encode(self, index: int) -> dict:
        """The pair Example of `pairs[index]` (module docstring), no replacement: raises SampleSkipped /
        MediaError when the pair cannot be used."""
        pair = self.pairs[index]
        reason = unusable_reason(pair)
        if reason is not None:
            raise SampleSkipped(pair.sample_id, reason)
        out = encode_completions(pair.prompt, [pair.chosen, pair.rejected], self.processor, self.media,
                                 image_folder=self.image_folder, system_prompt=self.system_prompt,
                                 thinking=self.thinking, max_seq_length=self.max_seq_length)
        chosen, rejected = out.pop("sequences")
        return out | {"chosen": chosen, "rejected": rejected} | pair.prompt.extra


# ------------------------------------------------------------------------------------------ collator
def group_sequences(examples: list[dict], sequences: list[list[dict]]) -> list[dict]:
    """Every example's sequences in order (example 0's, then example 1's, ...), each carrying its example's
    grids (no pixels): what the sequence collation packs or pads."""
    flat = []
    for e, own in zip(examples, sequences, strict=True):
        grids = {key: e[key] for key in GRID_KEYS if key in e}
        flat += [s | grids for s in own]
    return flat


def pair_sequences(examples: list[dict]) -> list[dict]:
    """[chosen_0, rejected_0, chosen_1, ...]: token tensors plus the pair's grids (no pixels), per sequence."""
    return group_sequences(examples, [[e["chosen"], e["rejected"]] for e in examples])


def media_sources(examples: list[dict], grid_key: str, repeats: list[int] | None = None) -> torch.Tensor | None:
    """(occurrences,) long: for every grid row of the batch (per sequence, in sequence order) the index of its
    unique image / video in the example-ordered pixels; example k's media occur `repeats[k]` times (default 2:
    chosen, then rejected); None when no example has that modality."""
    sources, offset = [], 0
    for k, e in enumerate(examples):
        num = len(e[grid_key]) if grid_key in e else 0
        own = torch.arange(offset, offset + num, dtype=torch.long)
        sources += [own] * (2 if repeats is None else repeats[k])
        offset += num
    return torch.cat(sources) if offset else None


def unique_grids(batch: dict) -> dict[str, torch.Tensor]:
    """The grid rows of the unique media, in the order of their pixels (what the vision tower runs on once):
    {"image_grid_thw": (U, 3), "video_grid_thw": (W, 3), "second_per_grid_ts": (W,)} for the modalities present."""
    out = {}
    for _, grid_key, source_key in MEDIA_SOURCES:
        if source_key not in batch:
            continue
        sources = batch[source_key]
        first = torch.stack([(sources == u).nonzero()[0, 0] for u in range(int(sources.max()) + 1)])
        out[grid_key] = batch[grid_key][first]
        if grid_key == "video_grid_thw" and "second_per_grid_ts" in batch:
            out["second_per_grid_ts"] = batch["second_per_grid_ts"][first]
    return out


def expand_media(batch: dict) -> dict[str, torch.Tensor]:
    """The pixel tensors a naive collation would hold (each occurrence's pixels), from the unique ones:
    {"pixel_values": (sum over occurrences, D), "pixel_values_videos": ...} for the modalities present."""
    grids = unique_grids(batch)
    out = {}
    for pixel_key, grid_key, source_key in MEDIA_SOURCES:
        if source_key in batch:
            unique = torch.split(batch[pixel_key], grids[grid_key].prod(-1).tolist())
            out[pixel_key] = torch.cat([unique[u] for u in batch[source_key].tolist()])
    return out


def collate_groups(examples: list[dict], sequences: list[list[dict]], *, rope_index: RopeIndex | None,
                   pad_token_id: int, known=()) -> dict:
    """One batch of every example's `sequences` (example order, then sequence order) sharing the example's media:
    pixels once per example, grids per occurrence, `image_source` / `video_source` (module docstring); packed
    when `rope_index` is given, else right-padded. The examples' other keys (but `known`) become lists."""
    batch = group_sequences(examples, sequences)
    # The sequence collation gives the tokens, position ids / attention mask and per-occurrence grids; the
    # example-level one gives the unique pixels, ids, skip records and extra fields.
    batch = pack_examples(batch, rope_index) if rope_index is not None else pad_collate(batch, pad_token_id)
    extras = collate_extras(examples, set(known))
    batch |= {k: v for k, v in extras.items() if k not in GRID_KEYS}
    repeats = [len(own) for own in sequences]
    for _, grid_key, source_key in MEDIA_SOURCES:
        sources = media_sources(examples, grid_key, repeats)
        if sources is not None:
            batch[source_key] = sources
    return batch


def collate_pairs(examples: list[dict], *, rope_index: RopeIndex | None, pad_token_id: int) -> dict:
    """One batch of 2P sequences from P pair Examples (module docstring): packed when `rope_index` is
    given, else right-padded."""
    batch = collate_groups(examples, [[e["chosen"], e["rejected"]] for e in examples], rope_index=rope_index,
                           pad_token_id=pad_token_id, known=COMPLETIONS)
    batch["num_pairs"] = len(examples)
    return batch


class PairCollator:
    """Picklable `collate_fn` for PairDataset: each micro-batch of P pairs -> one batch of 2P sequences,
    packed into one row (`packing=True`, mRoPE ids from the model's config) or right-padded."""

    def __init__(self, model_or_config, *, packing: bool, pad_token_id: int):
        self.rope_index = RopeIndex(model_or_config) if packing else None
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        return collate_pairs(examples, rope_index=self.rope_index, pad_token_id=self.pad_token_id)
