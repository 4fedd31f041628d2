"""Loop plumbing every training loop shares: the train state, the resume-exact batch stream, the model-input
filter, the step count and the banner printed before step 0.

    state = TrainState()                                   # or TrainState.from_dict(checkpoint's trainer_state)
    for epoch, index, batch in resumable_batches(accelerator, loader, state.epoch, state.next_batch): ...
    outputs = model(**model_inputs(batch))

`TrainState` is what a checkpoint stores next to the weights (`trainer_state.json`): the optimizer step, the
epoch and next batch of the data position, the skipped samples and non-finite steps counted so far, and the
per-step loss history (so a run resumed from its last checkpoint still reports every step's loss).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

# What a Qwen-VL forward takes; loops feed only these (batches also carry ids, skip records, extra columns).
MODEL_INPUTS = (
    "input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "labels", "pixel_values",
    "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
)


def model_inputs(batch: dict, *, labels: bool = True) -> dict:
    """The model's keyword arguments in `batch` (None values dropped; `labels` only when asked)."""
    return {k: v for k, v in batch.items()
            if k in MODEL_INPUTS and v is not None and (labels or k != "labels")}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    next_batch: int = 0  # index within `epoch` of the next micro-batch to train on
    num_skipped: int = 0  # samples skipped by the data layer so far, all ranks (summed at each checkpoint)
    num_bad_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm
    losses: list[float] = field(default_factory=list)  # one global-mean loss per optimizer step, from step 1
    extra: dict = field(default_factory=dict)  # a loop's own resumable state (JSON values: early stopping, ...)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})  # older checkpoints lack the newer fields


def _set_sampler_epoch(loader, epoch: int) -> None:
    """`loader.set_epoch` plus the batch sampler below accelerate's shard: with 2+ processes accelerate wraps a
    batch sampler (the token-budget one) in a BatchSamplerShard that does not forward `set_epoch`, so without
    this every epoch after a resume would replay epoch 0's order."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    sampler = getattr(loader, "batch_sampler", None)
    while sampler is not None:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        sampler = getattr(sampler, "batch_sampler", None)


def resumable_batches(accelerator, loader, start_epoch: int = 0, skip: int = 0):
    """Endless (epoch, index, batch) over `loader`, starting `skip` batches into `start_epoch`.

    The skipped batches are dropped at the sampler (never loaded or decoded); the epoch is set first, so the
    resumed epoch has the same order as the straight run's."""
    epoch = start_epoch
    while True:
        _set_sampler_epoch(loader, epoch)
        source, index = loader, 0
        if epoch == start_epoch and skip:
            source, index = accelerator.skip_first_batches(loader, skip), skip
        # Data loading never draws from the training RNG (a new DataLoader iterator does, for its worker
        # seed): a resumed run's dropout then matches the straight run's exactly.
        with torch.random.fork_rng(devices=[]):
            iterator = iter(source)
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(iterator, None)
            if batch is None:
                break
            yield epoch, index, batch
            index += 1
        epoch += 1


def total_steps(train_cfg, loader, accumulation: int, steps_per_batch: int = 1) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch) for a prepared loader (its len() is this rank's share);
    `steps_per_batch`: optimizer steps each step's worth of batches feeds (GRPO's grpo.num_iterations)."""
    per_epoch = max(1, math.ceil(len(loader) / accumulation)) * steps_per_batch
    if train_cfg.max_steps > 0:
        return train_cfg.max_steps, per_epoch
    return max(1, math.ceil(train_cfg.num_epochs * per_epoch)), per_epoch


def describe_run(loader, accumulation: int, world: int, total: int, per_epoch: int) -> str:
    """The banner line: steps and what one step holds, read from the loader it runs on (a token budget sampler
    makes micro-batches of varying sample counts, so the config's micro_batch_size says nothing then)."""
    dataset = getattr(loader, "dataset", None)
    # this rank's micro-batch size: BatchSamplerShard and torch's BatchSampler both hold it; a token budget None
    micro = getattr(getattr(loader, "batch_sampler", None), "batch_size", None) or getattr(loader, "batch_size", None)
    if micro is None and dataset is not None and len(loader):
        samples = f"~{len(dataset) / (len(loader) * world):.1f} samples per micro-batch (token budget)"
        per_step = f"~{len(dataset) / (len(loader) * world) * accumulation * world:.0f} samples/step"
    else:
        samples = f"micro-batch {micro}"
        per_step = f"{(micro or 0) * accumulation * world} samples/step"
    epochs = f" = {total / per_epoch:.2f} epochs" if total != per_epoch else " = 1 epoch"
    return (f"steps: {total} ({per_epoch}/epoch{epochs}) | {samples} x accumulation {accumulation} x {world} "
            f"process(es) = {per_step}")
