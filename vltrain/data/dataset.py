"""The SFT dataset (records validated up front, media decoded lazily in loader workers) and collator."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from vltrain.data.encode import IGNORE_INDEX, MEDIA_KEYS, SampleSkipped, encode
from vltrain.data.formats import load_conversations
from vltrain.data.media import MediaError, MediaOptions

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_SKIPS = 16


class SFTDataset(Dataset):
    """Conversations from a LLaVA JSON/JSONL or messages file, encoded on access.

    A sample that cannot be used (too long for `max_seq_length`, unreadable media) is logged with its
    reason and replaced by the next one; the Example carries `num_skipped` so the loop can count
    skips across workers and ranks.
    """

    def __init__(self, path, processor, media: MediaOptions, *, max_seq_length: int, image_folder=None,
                 system_prompt=None):
        self.path = str(path)
        self.conversations = load_conversations(path)
        if not self.conversations:
            raise ValueError(f"data file {self.path!r} holds no records")
        self.processor = processor
        self.media = media
        self.max_seq_length = max_seq_length
        self.image_folder = image_folder
        self.system_prompt = system_prompt

    def __len__(self) -> int:
        return len(self.conversations)

    def encode(self, index: int) -> dict[str, torch.Tensor]:
        return encode(
            self.conversations[index], self.processor, self.media,
            max_seq_length=self.max_seq_length, image_folder=self.image_folder, system_prompt=self.system_prompt,
        )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        for offset in range(MAX_CONSECUTIVE_SKIPS):
            i = (index + offset) % len(self)
            try:
                example = self.encode(i)
            except (SampleSkipped, MediaError) as e:
                log.warning("skipping %s: %s", self.path, e)
                continue
            example["num_skipped"] = torch.tensor(offset)
            return example
        raise RuntimeError(
            f"{self.path}: {MAX_CONSECUTIVE_SKIPS} consecutive samples from index {index} could not be used; "
            "see the warnings above (max_seq_length too small? media missing?)"
        )


def pad_collate(examples: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; media tensors concatenated in sample order."""
    length = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), length), pad_token_id, dtype=torch.long),
        "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
        "mm_token_type_ids": torch.zeros((len(examples), length), dtype=torch.long),
    }
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][row, :n] = e["input_ids"]
        batch["labels"][row, :n] = e["labels"]
        batch["attention_mask"][row, :n] = 1
        batch["mm_token_type_ids"][row, :n] = e["mm_token_type_ids"]
    return batch | media_and_skips(examples)


def media_and_skips(examples: list[dict[str, torch.Tensor]]) -> dict:
    """Media tensors concatenated in example order, and the examples' summed skip counts (both collators)."""
    out = {key: torch.cat([e[key] for e in examples if key in e]) for key in MEDIA_KEYS
           if any(key in e for e in examples)}
    out["num_skipped"] = sum(int(e.get("num_skipped", 0)) for e in examples)
    return out


class PadCollator:
    """Picklable `collate_fn` for DataLoader workers."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples):
        return pad_collate(examples, self.pad_token_id)
