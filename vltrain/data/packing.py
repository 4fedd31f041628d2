"""Packing several Examples into one row, and micro-batches filled to a token budget.

A packed micro-batch is ONE row with no padding:
  input_ids, labels (when the examples have them; classification examples do not), mm_token_type_ids (1, L);
  position_ids (4, 1, L); media tensors concatenated in
  example order, skip / truncation records concatenated and every other per-example key as a list in
  example order (as the padding collator does: vltrain.data.dataset.collate_extras); no attention_mask.
position_ids row 0 holds text positions that restart at 0 for every example (this is how attention
finds the examples: vltrain.attention), rows 1-3 the example's own mRoPE T/H/W ids, computed by the
family table (`vltrain.families.RopeIndex`: the model's own `get_rope_index`) on that example alone with
its own image/video grids -- exactly the ids the model computes for the example unpacked. The first label of every example is -100, so no
token is ever predicted from the previous example (it is -100 anyway: rows start with a system or
user header).

`TokenBudgetBatchSampler` yields index lists whose summed example lengths stay within
`max_tokens`, instead of a fixed number of samples. It needs every example's length up front:
`example_lengths(dataset)` estimates them from the text and the media file headers, no pixel decoded
(vltrain.data.lengths; exact, see there), or encodes each example once with `estimate=False` (in
DataLoader workers), keeping only the length (a preference pair's: chosen + rejected).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Sampler

from vltrain.data.dataset import collate_extras
from vltrain.data.encode import IGNORE_INDEX
from vltrain.families import RopeIndex
from vltrain.tracking import print0


def pack_examples(examples: list[dict[str, torch.Tensor]], rope_index: RopeIndex) -> dict[str, torch.Tensor]:
    """Concatenate `examples` into one packed row (see the module docstring); `labels` only when every example
    has them."""
    has_labels = ["labels" in e for e in examples]
    assert all(has_labels) or not any(has_labels), "labelled and unlabelled examples in one batch"
    input_ids, labels, types, positions = [], [], [], []
    for e in examples:
        n = len(e["input_ids"])
        if "labels" in e:
            example_labels = e["labels"].clone()
            example_labels[0] = IGNORE_INDEX  # never predict an example's first token from the previous example
            labels.append(example_labels)
        input_ids.append(e["input_ids"])
        types.append(e["mm_token_type_ids"])
        mrope = rope_index(e)
        assert mrope.shape == (3, n), (mrope.shape, n)
        positions.append(torch.cat([torch.arange(n)[None], mrope.to(torch.long)], dim=0))
    batch = {"input_ids": torch.cat(input_ids)[None]}
    if labels:
        batch["labels"] = torch.cat(labels)[None]
    batch["mm_token_type_ids"] = torch.cat(types)[None]
    batch["position_ids"] = torch.cat(positions, dim=1)[:, None]
    return batch | collate_extras(examples, set(batch))


class PackCollator:
    """Picklable `collate_fn`: every micro-batch becomes one packed row."""

    def __init__(self, model_or_config):
        self.rope_index = RopeIndex(model_or_config)

    def __call__(self, examples):
        return pack_examples(examples, self.rope_index)


# --------------------------------------------------------------------------------------- token budget
def example_lengths(dataset, num_workers: int = 0, *, estimate: bool = True) -> list[int]:
    """Token count of every example of `dataset`: estimated from the text and the media headers without
    decoding a pixel (vltrain.data.lengths; equal to the encoded lengths, samples it cannot measure are
    encoded), or, with `estimate=False`, by encoding every example once (media decoded in the workers)."""
    if not estimate:
        return encoded_lengths(dataset, num_workers)
    from vltrain.data.lengths import estimate_lengths  # lengths imports the datasets, which import this module

    result = estimate_lengths(dataset, num_workers)
    print0(result.summary())
    return result.lengths


def encoded_lengths(dataset, num_workers: int = 0) -> list[int]:
    """Token count of every example of `dataset`, each encoded once (media decoded in the workers)."""
    loader = DataLoader(dataset, batch_size=16, num_workers=num_workers, collate_fn=_lengths)
    return [n for chunk in loader for n in chunk]


def _lengths(examples):
    return [example_length(e) for e in examples]


def example_length(example: dict) -> int:
    """Tokens of one example; a preference pair (vltrain.data.pairs: no `input_ids` of its own) counts its
    chosen + rejected sequences, both of which its micro-batch holds."""
    if "input_ids" in example:
        return len(example["input_ids"])
    return len(example["chosen"]["input_ids"]) + len(example["rejected"]["input_ids"])


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Micro-batches of indices whose example lengths sum to at most `max_tokens`.

    Indices are shuffled per epoch (seed + epoch) when `shuffle`, or taken from `order(epoch)` when given
    (a weighted mixture's draw, vltrain.data.mixture.MixtureSampler.order: indices may repeat or be left
    out, so the number of micro-batches can change from epoch to epoch), then cut greedily in that order:
    a micro-batch closes when the next example would overflow the budget. An example longer than the
    budget is a ValueError (make data.max_tokens_per_batch >= data.max_seq_length).
    """

    def __init__(self, lengths: list[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0,
                 order: Callable[[int], list[int]] | None = None):
        too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
        if too_long:
            raise ValueError(f"{len(too_long)} example(s) are longer than max_tokens_per_batch={max_tokens} "
                             f"(e.g. index {too_long[0]}: {lengths[too_long[0]]} tokens)")
        self.lengths, self.max_tokens, self.shuffle, self.seed = list(lengths), max_tokens, shuffle, seed
        self.order = order
        self.epoch = 0
        self._num_batches = len(self._batches(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, epoch: int) -> list[list[int]]:
        if self.order is not None:
            order = self.order(epoch)
        else:
            order = list(range(len(self.lengths)))
            if self.shuffle:
                random.Random(self.seed + epoch).shuffle(order)
        batches, current, used = [], [], 0
        for i in order:
            if current and used + self.lengths[i] > self.max_tokens:
                batches.append(current)
                current, used = [], 0
            current.append(i)
            used += self.lengths[i]
        if current:
            batches.append(current)
        return batches

    def __iter__(self):
        batches = self._batches(self.epoch)
        self._num_batches = len(batches)
        self.epoch += 1  # a plain DataLoader never calls set_epoch; reshuffle anyway
        return iter(batches)

    def __len__(self) -> int:
        return self._num_batches

    def mean_tokens_per_batch(self) -> float:
        return sum(self.lengths) / max(1, self._num_batches) if self.lengths else math.nan
