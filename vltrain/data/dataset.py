"""The SFT dataset (records validated up front, media decoded lazily in loader workers) and the padding collator.

Every Example carries, besides its tensors (vltrain.data.encode):
  id: the sample id; truncated: [] or one truncation record; skipped: skip records
  (vltrain.data.skips) of the samples that were tried and replaced by this one, usually [];
  and the record's extra fields (`Conversation.extra`) under their own names.
Both collators concatenate `skipped` and `truncated` over the batch and turn every key they do not know
into a list in sample order (`batch["id"] == ["a", "b"]`, reward columns, class labels).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.utils.data import Dataset

from vltrain.data.encode import IGNORE_INDEX, MEDIA_KEYS, SampleSkipped, encode
from vltrain.data.formats import Conversation, DataFormatError, load_conversations
from vltrain.data.media import MediaError, MediaOptions
from vltrain.data.skips import TooManySkips, skip_record
from vltrain.data.template import THINKING_MODES

MAX_CONSECUTIVE_SKIPS = 16


class ConsecutiveSkips(TooManySkips, RuntimeError):
    """`max_consecutive_skips` unusable samples in a row: a TooManySkips (a ValueError, so a recipe ends with its
    one `data error` line, not a traceback), and still the RuntimeError it was before for callers catching that."""

RECORD_LISTS = ("skipped", "truncated")  # lists of records, concatenated over the batch
# Keys the collators build themselves; a record's extra field may not take one of these names.
RESERVED_KEYS = frozenset(("input_ids", "labels", "mm_token_type_ids", "attention_mask", "position_ids", "id",
                           *MEDIA_KEYS, *RECORD_LISTS))


def located(conv: Conversation, position: int, source: str | None) -> Conversation:
    """`conv` with the file (`source`, when given) and its position in it filled in for skip / truncation records."""
    if source is None and conv.index is not None:
        return conv
    return dataclasses.replace(conv, source=source or conv.source, index=position if conv.index is None else conv.index)


def check_reserved(conv: Conversation, reserved=RESERVED_KEYS, what: str = "Example") -> Conversation:
    """`conv`, or a DataFormatError when one of its extra fields would overwrite a key the dataset builds itself."""
    clash = sorted(reserved & conv.extra.keys())
    if clash:
        raise DataFormatError(f"{conv.source}: sample {conv.index} (id={conv.sample_id!r}): field {clash[0]!r} would "
                              f"overwrite the {what}'s own {clash[0]!r}; rename it in the data file")
    return conv


class SkippingDataset(Dataset):
    """`__getitem__` = `encode(index)`, or, when that sample cannot be used (SampleSkipped / MediaError), the
    next usable one carrying skip records of those it replaced (vltrain.data.skips). Subclasses define
    `encode`, set `path` and `max_consecutive_skips`, and either hold `self.conversations` or define `__len__`
    and `conversation(index)` (whose source / index / id name a skipped sample); shared by SFTDataset,
    PairDataset, PromptDataset and ClassificationDataset."""

    path: str
    max_consecutive_skips: int
    conversations: list[Conversation]

    def encode(self, index: int) -> dict:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.conversations)

    def conversation(self, index: int) -> Conversation:
        return self.conversations[index]

    @staticmethod
    def _records(path_or_records, load, source: str | None, what: str) -> tuple[list, str | None]:
        """(records loaded from a file -- `load(path)` -- or given as a list, the source that names them)."""
        if isinstance(path_or_records, (str, Path)):
            records, source = load(path_or_records), source or str(path_or_records)
        else:
            records = list(path_or_records)
        if not records:
            raise DataFormatError(f"{source or 'dataset'}: no {what}")
        return records, source

    def _set_options(self, processor, media: MediaOptions, *, max_seq_length: int, image_folder, system_prompt,
                     thinking: str, max_consecutive_skips: int) -> None:
        """The encoding options every sample of the dataset is encoded with."""
        if thinking not in THINKING_MODES:
            raise ValueError(f"data.thinking={thinking!r} is not one of {', '.join(THINKING_MODES)}")
        self.processor, self.media, self.max_seq_length = processor, media, max_seq_length
        self.image_folder, self.system_prompt, self.thinking = image_folder, system_prompt, thinking
        self.max_consecutive_skips = max_consecutive_skips

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for offset in range(self.max_consecutive_skips):
            i = (index + offset) % len(self)
            try:
                example = self.encode(i)
            except (SampleSkipped, MediaError) as e:
                conv = self.conversation(i)
                skipped.append(skip_record(conv.source, conv.index, conv.sample_id, getattr(e, "reason", str(e))))
                continue
            example["skipped"] = skipped
            return example
        raise ConsecutiveSkips(
            f"{self.path}: {self.max_consecutive_skips} consecutive samples from index {index} could not be used "
            f"(last: id={skipped[-1]['id']!r}: {skipped[-1]['reason']}); see the warnings above (max_seq_length too "
            "small? media missing?)"
        )


class SFTDataset(SkippingDataset):
    """Conversations (a LLaVA JSON/JSONL or messages file, or already-parsed Conversations), encoded on access.

    A sample that cannot be used (unreadable media, too long for `max_seq_length`, no supervised tokens,
    a processor error) is logged with its file, index, id and reason and replaced by the next one; the
    replacement Example lists it in `skipped` so the loop's SkipLedger can count skips across workers and
    ranks. `max_consecutive_skips` replacements in a row from one index raise (the data is unusable).
    `source` names the file in skip / truncation records of Conversations passed in directly.
    Prompt-only conversations, and extra fields named like an Example key (`RESERVED_KEYS`, e.g. a
    record field "labels"), are DataFormatErrors when the dataset is built.
    """

    def __init__(self, path_or_conversations: str | Path | list[Conversation], processor, media: MediaOptions, *,
                 max_seq_length: int, image_folder=None, system_prompt=None, thinking: str = "keep",
                 source: str | None = None, max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS):
        conversations, source = self._records(path_or_conversations, load_conversations, source, "conversations")
        self.conversations = [self._checked(c, i, source) for i, c in enumerate(conversations)]
        self.path = source or self.conversations[0].source
        self._set_options(processor, media, max_seq_length=max_seq_length, image_folder=image_folder,
                          system_prompt=system_prompt, thinking=thinking, max_consecutive_skips=max_consecutive_skips)

    @staticmethod
    def _checked(conv: Conversation, position: int, source: str | None) -> Conversation:
        """`conv` with its source / index filled in; prompt-only records and reserved extra names refused."""
        conv = located(conv, position, source)
        where = f"{conv.source}: sample {conv.index} (id={conv.sample_id!r})"
        if not conv.has_reply:
            raise DataFormatError(f"{where}: ends with a user turn, so there is no assistant reply to train on")
        return check_reserved(conv)

    def encode(self, index: int) -> dict:
        conv = self.conversations[index]
        example = encode(conv, self.processor, self.media, max_seq_length=self.max_seq_length,
                         image_folder=self.image_folder, system_prompt=self.system_prompt, thinking=self.thinking)
        return example | conv.extra


def collate_extras(examples: list[dict], known) -> dict:
    """Media tensors concatenated in example order, skip / truncation records concatenated, and every key
    not in `known` as a list in sample order (None where an example lacks it). Both collators use it."""
    out = {key: torch.cat([e[key] for e in examples if key in e]) for key in MEDIA_KEYS
           if any(key in e for e in examples)}
    for key in RECORD_LISTS:
        out[key] = [record for e in examples for record in e.get(key, ())]
    seen = known | set(MEDIA_KEYS) | set(RECORD_LISTS)
    for key in dict.fromkeys(k for e in examples for k in e):
        if key not in seen:
            out[key] = [e.get(key) for e in examples]
    return out


def pad_collate(examples: list[dict], pad_token_id: int) -> dict:
    """Right-pad to the longest example: input_ids, labels (when the examples have them), attention_mask,
    mm_token_type_ids (B, L); media tensors concatenated in sample order; other keys as lists."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
        "mm_token_type_ids": torch.zeros((len(examples), length), dtype=torch.long),
    }
    has_labels = ["labels" in e for e in examples]
    assert all(has_labels) or not any(has_labels), "labelled and unlabelled examples in one batch"
    if all(has_labels):
        batch["labels"] = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["attention_mask"][row, :n] = 1
        for key in ("input_ids", "labels", "mm_token_type_ids"):
            if key in batch:
                batch[key][row, :n] = e[key]
    return batch | collate_extras(examples, set(batch))


class PadCollator:
    """Picklable `collate_fn` for DataLoader workers."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        return pad_collate(examples, self.pad_token_id)
