"""DataLoaders from `data.*`: the collator (padding or packing), the batching (samples or a token budget) and
the workers, chosen the same way for every loop.

    from vltrain.data.dataset import SFTDataset
    from vltrain.data.loader import build_loader
    from vltrain.data.media import MediaOptions

    media = MediaOptions.from_config(cfg.data, image_factor=spec.image_factor)
    dataset = SFTDataset(cfg.data.train_path, processor, media, max_seq_length=cfg.data.max_seq_length,
                         image_folder=cfg.data.image_folder)
    loader = build_loader(dataset, cfg.data, processor, model.config, micro_batch_size=2, shuffle=True, seed=0)

A batch is a dict of tensors (see vltrain.data.dataset / vltrain.data.packing) plus per-sample lists (`id`,
extra record fields) and the data layer's skip / truncation records.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader

from vltrain.data.dataset import PadCollator
from vltrain.data.mixture import MixtureSampler, describe_files, file_groups, train_files
from vltrain.data.packing import PackCollator, TokenBudgetBatchSampler, example_lengths
from vltrain.tracking import print0


def build_loader(dataset, data_cfg, processor, model_config, *, micro_batch_size: int, shuffle: bool,
                 seed: int = 0, collate_fn=None, sampler=None) -> DataLoader:
    """A DataLoader over `dataset`: packed rows when `data.packing` (per-example mRoPE ids need the model's
    `config`), else right-padded batches; `data.max_tokens_per_batch` fills micro-batches to a token budget
    instead of `micro_batch_size` samples (every example's length is measured once, up front: estimated from the
    text and the media headers, no pixel decoded, vltrain.data.lengths). A `sampler`
    (e.g. vltrain.data.labels.ClassBalancedSampler) orders the samples instead of `shuffle`.

    Several `data.train_path` files (vltrain.data.mixture): a shuffled (training) loader prints the records
    of each file, and with `data.weights` draws every epoch's samples from them by weight (MixtureSampler, or
    its order cut to the token budget); an unshuffled one (evaluation) reads the dataset as it is."""
    from vltrain.faults import worker_init_fn

    mixture = None
    paths = train_files(getattr(data_cfg, "train_path", ""))  # a hand-made data config may name no file at all
    weights = getattr(data_cfg, "weights", None)
    if shuffle and len(paths) > 1:
        groups = file_groups(dataset, paths)
        if weights is not None:
            if sampler is not None:
                raise ValueError(f"data.weights draws the samples of each epoch, which cannot follow a "
                                 f"{type(sampler).__name__}; drop one of them")
            mixture = MixtureSampler(groups, weights, seed=seed)
        print0(describe_files(paths, groups, mixture.counts if mixture is not None else None))
    if collate_fn is None:
        collate_fn = PackCollator(model_config) if data_cfg.packing else PadCollator(processor.tokenizer.pad_token_id)
    common = dict(num_workers=data_cfg.num_workers, collate_fn=collate_fn,
                  persistent_workers=data_cfg.num_workers > 0,
                  pin_memory=getattr(data_cfg, "pin_memory", True) and torch.cuda.is_available(),
                  worker_init_fn=worker_init_fn if data_cfg.num_workers > 0 else None)
    if data_cfg.max_tokens_per_batch:
        if sampler is not None:
            raise ValueError(f"data.max_tokens_per_batch={data_cfg.max_tokens_per_batch} batches by a token budget, "
                             f"which cannot follow a {type(sampler).__name__}; set it to 0 or drop the sampler")
        lengths = example_lengths(dataset, data_cfg.num_workers)
        sampler = TokenBudgetBatchSampler(lengths, data_cfg.max_tokens_per_batch, shuffle=shuffle, seed=seed,
                                          order=mixture.order if mixture is not None else None)
        print0(f"token budget {data_cfg.max_tokens_per_batch}: {len(dataset)} samples -> {len(sampler)} "
               f"micro-batches of {sampler.mean_tokens_per_batch():.0f} tokens on average")
        return DataLoader(dataset, batch_sampler=sampler, **common)
    if mixture is not None:
        return DataLoader(dataset, batch_sampler=EpochBatchSampler(mixture, micro_batch_size, drop_last=False), **common)
    if sampler is not None:
        return DataLoader(dataset, batch_size=micro_batch_size, sampler=sampler, drop_last=False, **common)
    return DataLoader(dataset, batch_size=micro_batch_size, shuffle=shuffle, drop_last=False, **common)


class EpochBatchSampler(BatchSampler):
    """torch's BatchSampler that passes `set_epoch` on to its sampler: vltrain.progress sets the epoch on the batch
    samplers of a loader (through accelerate's shard and its resume skipper), which a plain BatchSampler hides."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


# SFT records / DPO pairs / classification records (vltrain.synthetic)
SYNTHETIC_SETS = ("synthetic:shapes", "synthetic:shape_pairs", "synthetic:shape_classes", "synthetic:shapes_mislabeled",
                  "synthetic:colour_questions")


def resolve_synthetic_data(data_cfg, output_dir) -> None:
    """`data.train_path: synthetic:shapes` (the SFT demo), `synthetic:shape_pairs` (the DPO demo),
    `synthetic:shape_classes` (the classification demo: classes [circle, square, triangle]) or
    `synthetic:shapes_mislabeled` (the GRPO demo's SFT stage: 65% of the train colour answers mislabelled) or
    `synthetic:colour_questions` (the GRPO demo: colour questions only, rightly labelled): write the
    generated dataset under `output_dir/data` and point `data.train_path`, `data.eval_path` and
    `data.image_folder` at it (in place). Call it on one process first (the files are deterministic)."""
    if not (isinstance(data_cfg.train_path, str) and data_cfg.train_path.startswith("synthetic:")):
        return
    from vltrain.synthetic import write_shape_classes, write_shape_pairs, write_shapes_dataset

    writers = dict(zip(SYNTHETIC_SETS, (write_shapes_dataset, write_shape_pairs, write_shape_classes,
                                        functools.partial(write_shapes_dataset, mislabel=0.65, num_train=9600),
                                        functools.partial(write_shapes_dataset, kinds=("colour",)))))
    if data_cfg.train_path not in writers:
        raise ValueError(f"data.train_path={data_cfg.train_path!r}: the synthetic sets are {', '.join(SYNTHETIC_SETS)}")
    write = writers[data_cfg.train_path]
    train_path, eval_path = write(Path(output_dir) / "data")
    data_cfg.train_path, data_cfg.eval_path = str(train_path), str(eval_path)
    data_cfg.image_folder = str(Path(train_path).parent / "images")
