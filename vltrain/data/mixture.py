"""Several training files: concatenated, or mixed by weights.

    data:
      train_path: [a.json, b.jsonl]     # one path, or a list of files, each in any format the recipe loads
      weights: [0.7, 0.3]               # optional: one per file, need not sum to 1

Without weights the files are concatenated: one dataset of all their records in file order, shuffled (or cut
to a token budget) as a single file would be. Every sample keeps its own file and index in skip / truncation
records and error messages (the loaders set `source` / `index` per record; recipes pass no `source=` for the
train split so that nothing overwrites them).

With weights, each epoch draws N samples, N = all files' records together (so an epoch has as many steps as
the concatenation would). File i supplies `round(w_i / sum(w) * N)` of them, the rounding made to add up to N
(largest remainders; ties to the earlier file):
  * a file asked for more than it holds is repeated: successive passes over it, each in its own shuffled
    order, so every record comes once before any comes twice;
  * a file asked for fewer gives a random subset (the start of one shuffled pass);
  * the draws of all files are then shuffled together.
Both are drawn anew every epoch and depend on (train.seed, epoch) only, never on torch's RNG: every rank
computes the same order (accelerate then shards its batches, so ranks see disjoint batches), and a run resumed
in the middle of an epoch (vltrain.progress.resumable_batches: set_epoch, then the done batches skipped)
sees the straight run's order. `MixtureSampler` yields it for plain micro-batches; with
`data.max_tokens_per_batch` the token-budget batch sampler cuts the same per-epoch order instead of its own
shuffle (vltrain.data.packing.TokenBudgetBatchSampler `order=`). Weights shape training only: an unshuffled
loader (evaluation) reads every record once. They are refused with `dpo.precompute_ref_log_probs` (its table is
scored on one epoch's draw, which may leave pairs out) and with `cls.balanced_sampler` (both choose the samples).
The run prints once, when the train loader is built, the records of each file and, with weights, the draws per
epoch from each (`describe_files`).

Config mistakes are ValueErrors at config load: negative or all-zero weights, a `synthetic:*` name in a list,
a file listed twice (`check_mixture_config`, DataConfig.validate); weights without several files or a count
that differs from the files' (`check_weights_match_files`, SFTConfig.validate: a training config's check,
since prediction rebuilds a trained data section with its own path). A missing file is one in `open_run`
(`check_train_files`). All come before any model loads.
"""

from __future__ import annotations

import math
import random
from pathlib import Path


def train_files(train_path: str | list[str]) -> list[str]:
    """`data.train_path` as a list of files ([] when unset)."""
    if isinstance(train_path, str):
        return [train_path] if train_path else []
    return list(train_path)


def check_mixture_config(train_path, weights) -> None:
    """ValueError naming the field (and the file) when `data.train_path` / `data.weights` cannot mean a mixture:
    a bad list of files, or weights that are not numbers >= 0 with one above 0 (DataConfig.validate)."""
    paths = train_files(train_path)
    if not isinstance(train_path, str):
        if not paths:
            raise ValueError("data.train_path is an empty list: give one file or a list of files")
        for i, path in enumerate(paths):
            if not path:
                raise ValueError(f"data.train_path[{i}] is empty: every listed file needs a path")
            if path.startswith("synthetic:"):
                raise ValueError(f"data.train_path[{i}]={path!r}: a synthetic:* demo set stands alone, it cannot be "
                                 "one file of a list")
            if path in paths[:i]:
                raise ValueError(f"data.train_path[{i}]={path!r} is listed twice (give it a larger data.weights "
                                 "value instead)")
    if weights is None:
        return
    for i, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"data.weights[{i}]={weight}" + (f" (for {paths[i]!r})" if i < len(paths) else "")
                             + " must be a finite number >= 0")
    if not any(weights):
        raise ValueError(f"data.weights are all 0: at least one file of data.train_path ({', '.join(paths)}) "
                         "must be drawn")


def check_weights_match_files(train_path, weights) -> None:
    """ValueError naming the fields when `data.weights` is set but does not give one weight to each of several
    train files. A training config's check (SFTConfig.validate), not DataConfig's: prediction and inference
    rebuild a trained run's data section with a train_path of their own and keep its weights, unused."""
    if weights is None:
        return
    paths = train_files(train_path)
    if len(paths) < 2:
        raise ValueError(f"data.weights mixes several files, but data.train_path names "
                         f"{repr(paths[0]) if paths else 'none'}: list the files, or drop data.weights")
    if len(weights) != len(paths):
        raise ValueError(f"data.weights has {len(weights)} values for the {len(paths)} files of data.train_path "
                         f"({', '.join(paths)})")


def check_train_files(data_cfg) -> list[str]:
    """The files of `data.train_path`; ValueError naming the list entry when a listed file does not exist (a single
    path is left to the loader, whose DataFormatError names it)."""
    paths = data_cfg.train_paths()
    if not isinstance(data_cfg.train_path, str):
        for i, path in enumerate(paths):
            if not Path(path).is_file():
                raise ValueError(f"data.train_path[{i}]: data file {path!r} does not exist")
    return paths


def mixture_counts(weights: list[float], total: int) -> list[int]:
    """How many of `total` draws each file gets: `w_i / sum(w) * total`, rounded by largest remainders so that
    the counts add up to `total` exactly (ties go to the earlier file)."""
    scale = sum(weights)
    exact = [w / scale * total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    assert sum(counts) == total, (counts, total)
    return counts


def file_groups(dataset, paths: list[str]) -> list[list[int]]:
    """Dataset indices of each file of `paths`, read from every sample's `source` (the file it was loaded from)."""
    position = {path: i for i, path in enumerate(paths)}
    groups: list[list[int]] = [[] for _ in paths]
    for index in range(len(dataset)):
        source = dataset.conversation(index).source
        if source not in position:
            raise ValueError(f"data.train_path: sample {index} comes from {source!r}, which is not one of the listed "
                             f"files ({', '.join(paths)})")
        groups[position[source]].append(index)
    return groups


class MixtureSampler:
    """Dataset indices of one epoch of a weighted mixture (module docstring): `len(self)` of them, file i
    contributing `self.counts[i]`. `groups[i]` are file i's dataset indices. Deterministic in (seed, epoch);
    call `set_epoch(epoch)` before each epoch (accelerate's DataLoaderShard and vltrain.progress do); a plain
    DataLoader that never does still gets a new draw every epoch. (A plain class, not a torch Sampler: this
    module is imported by config validation, which stays free of torch.)"""

    def __init__(self, groups: list[list[int]], weights: list[float], seed: int = 0):
        assert len(groups) == len(weights), (len(groups), len(weights))
        self.groups = [list(g) for g in groups]
        self.weights = list(weights)
        self.num_samples = sum(len(g) for g in self.groups)
        self.counts = mixture_counts(self.weights, self.num_samples)
        for group, count in zip(self.groups, self.counts):
            assert group or not count, "a file with no samples cannot be drawn from"
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """Every dataset index drawn in `epoch`, in the order they are trained on."""
        rng = random.Random(f"vltrain.mixture:{self.seed}:{epoch}")  # a str seed hashes the same in every process
        drawn: list[int] = []
        for group, count in zip(self.groups, self.counts):
            draws: list[int] = []
            while len(draws) < count:  # one shuffled pass after another: every record once before any twice
                one_pass = list(group)
                rng.shuffle(one_pass)
                draws += one_pass
            drawn += draws[:count]
        rng.shuffle(drawn)
        return drawn

    def __iter__(self):
        order = self.order(self.epoch)
        self.epoch += 1  # a plain DataLoader never calls set_epoch; draw anew anyway
        return iter(order)

    def __len__(self) -> int:
        return self.num_samples


def describe_files(paths: list[str], groups: list[list[int]], counts: list[int] | None = None) -> str:
    """The run's data line for several train files: records per file, and with weights the draws per epoch."""
    line = "train files: " + ", ".join(f"{path} {len(group)} records" for path, group in zip(paths, groups))
    if counts is None:
        return line + " (concatenated)"
    draws = ", ".join(f"{count} from {path} ({count / len(group):.2f}x its records)" if group else f"0 from {path}"
                      for path, group, count in zip(paths, groups, counts))
    return line + f"; each epoch draws {sum(counts)}: " + draws
