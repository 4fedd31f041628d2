"""Check a dataset against the model's processor before training: every sample encoded exactly as the recipe's
dataset encodes it, without loading model weights and without training.

    python -m vltrain.inspector CONFIG [section.field=value ...] [--loop sft|dpo|grpo|cls] [--out report.html]
        [--examples 8] [--num_processes 1]
    python -m vltrain.inspector demo                        # the SFT demo's synthetic shapes
    python -m vltrain.inspector my_sft.yaml data.max_seq_length=1024 --out /tmp/inspect.html

CONFIG is what the recipes take (a YAML path or a shipped config name, vltrain.run.parse_config). The loop is
--loop, else the YAML's `dpo:` / `grpo:` / `cls:` section, else sft. What it reports, for the train and eval
files (a self-contained HTML page, `<train.output_dir>/inspect.html` by default, and a summary on stdout):

* samples read / usable / rejected, each rejected sample by id with its reason: records that do not parse
  (any one of them makes training stop before the model loads: the whole file is unusable, exit status 1),
  records the dataset refuses, and samples the dataset skips at training time (missing media, too long, a
  processor error: the SkippingDataset's skip records; more than `data.max_bad_fraction` of them stops
  training, exit status 1);
* media files missing; samples over `data.max_seq_length` (truncated or skipped, as the data layer does);
* a token-length histogram split into text and media tokens, length percentiles;
* optimizer steps and tokens per epoch (train.micro_batch_size x train.gradient_accumulation_steps x
  --num_processes, or the data.max_tokens_per_batch budget; train.max_steps in epochs);
* `--examples` samples rendered token by token with the label mask visible (trained tokens highlighted),
  media placeholder runs collapsed into one chip with a thumbnail. DPO shows chosen and rejected, GRPO the
  prompt (nothing trained) and its reference answer, classification the prompt and its label.

`inspect_data(cfg, loop)` returns the numbers as a dict; `render_html(report)` makes the page.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import io
import logging
import math
import os
import re
import sys
from datetime import datetime
from pathlib import Path

from vltrain.cli import program

LOOPS = ("sft", "dpo", "grpo", "cls")
DEFAULT_EXAMPLES = 8
LISTED_IN_TERMINAL = 10  # rejected ids printed on stdout
THUMBNAIL_PIXELS = 96
HISTOGRAM_BINS = 30
SPECIAL = re.compile(r"^<\|[^|]+\|>$")  # <|im_start|>, <|vision_end|>, ...
IGNORE_INDEX = -100  # vltrain.data.encode.IGNORE_INDEX (imported lazily with torch; asserted equal below)


# ------------------------------------------------------------------------------------------ config
def infer_loop(config: str | None) -> str:
    """The loop a config is for: its `dpo:` / `grpo:` / `cls:` section, else sft (a shipped name resolved as
    vltrain.run.parse_config resolves it)."""
    import yaml

    from vltrain.run import CONFIGS_DIR

    if not config or "=" in config:
        return "sft"
    path = Path(config)
    if not path.suffix and not path.exists() and (CONFIGS_DIR / f"{path}.yaml").is_file():
        path = CONFIGS_DIR / f"{path}.yaml"
    if not path.is_file():
        return "sft"  # parse_config names the missing file
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return "sft"  # parse_config names the YAML error
    found = [loop for loop in ("dpo", "grpo", "cls") if isinstance(tree, dict) and loop in tree]
    if len(found) > 1:
        raise ValueError(f"config {path} has sections {', '.join(found)}: give --loop")
    return found[0] if found else "sft"


def config_class(loop: str):
    from vltrain.config import CLSConfig, DPOConfig, GRPOConfig, SFTConfig

    if loop not in LOOPS:
        raise ValueError(f"--loop {loop!r} is not one of {', '.join(LOOPS)}")
    return {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "cls": CLSConfig}[loop]


def load_processor(cfg, loop: str):
    """(processor, image_factor) of `model.name_or_path` without its weights. A DPO / GRPO model that
    `init_from_sft` trains first does not exist yet: the processor is that SFT config's model's (the export
    saves it unchanged)."""
    from vltrain.families import family_spec

    name = cfg.model.name_or_path
    section = getattr(cfg, loop, None)
    init_from_sft = getattr(section, "init_from_sft", None)
    if init_from_sft and not name.startswith("tiny:") and not Path(name).exists():
        from vltrain.config import SFTConfig
        from vltrain.run import parse_config

        name = parse_config(SFTConfig, [init_from_sft]).model.name_or_path
        print(f"model {cfg.model.name_or_path} does not exist yet ({loop}.init_from_sft={init_from_sft} trains it "
              f"first): using the processor of {name}")
    if name.startswith("tiny:"):
        from vltrain.tiny import build_tiny_processor

        model_type = name.split(":", 1)[1]
        return build_tiny_processor(model_type), family_spec(model_type).image_factor
    from transformers import AutoConfig, AutoProcessor

    trust = cfg.model.trust_remote_code
    try:
        model_config = AutoConfig.from_pretrained(name, trust_remote_code=trust)
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model.name_or_path={name!r}: cannot load its config / processor ({first})") from None
    return processor, family_spec(model_config).image_factor


# ------------------------------------------------------------------------------------------ per-loop data
def _label_spec(cfg):
    """recipes/cls.py's label_spec (the recipe module is not importable from the library)."""
    from vltrain.data.labels import LabelSpec

    return LabelSpec(cfg.cls.problem_type, cfg.cls.num_labels, tuple(cfg.cls.classes) if cfg.cls.classes else None)


def _record_parser(cfg, loop: str):
    """parse(record, index, source): the per-record function the recipe's loader applies to every record."""
    from vltrain.data.formats import parse_record

    from vltrain.data.dataset import check_reserved

    if loop == "sft":  # load_conversations: a field named like an Example key is refused as it is read
        return lambda r, i, s: check_reserved(parse_record(r, i, s, require_reply=True))
    if loop == "dpo":
        from vltrain.data.pairs import parse_pair

        from vltrain.data.pairs import PairDataset

        return lambda r, i, s: PairDataset._checked(parse_pair(r, i, s), i, None)  # load_pairs
    if loop == "grpo":
        from vltrain.data.prompts import PROMPT_RESERVED_KEYS

        return lambda r, i, s: check_reserved(parse_record(r, i, s, require_reply=False), PROMPT_RESERVED_KEYS,
                                              "prompt Example")  # load_prompts
    from vltrain.data.labels import parse_cls_record

    spec = _label_spec(cfg)
    return lambda r, i, s: parse_cls_record(r, i, s, spec, cfg.cls.prompt)  # load_cls_records


def _loader(cfg, loop: str):
    """The recipe's loader (what `open_run` reads each file with)."""
    import functools

    if loop == "sft":
        from vltrain.data.formats import load_conversations

        return load_conversations
    if loop == "dpo":
        from vltrain.data.pairs import load_pairs

        return load_pairs
    if loop == "grpo":
        from vltrain.data.prompts import load_prompts

        return load_prompts
    from vltrain.data.labels import load_cls_records

    return functools.partial(load_cls_records, spec=_label_spec(cfg), default_prompt=cfg.cls.prompt)


def _build_dataset(cfg, loop: str, records: list, processor, media, source: str):
    """The recipe's dataset over `records`, with the recipe's options."""
    data = cfg.data
    common = dict(image_folder=data.image_folder, system_prompt=data.system_prompt, thinking=data.thinking,
                  source=source)
    if loop == "sft":
        from vltrain.data.dataset import SFTDataset

        return SFTDataset(records, processor, media, max_seq_length=data.max_seq_length, **common)
    if loop == "dpo":
        from vltrain.data.pairs import PairDataset

        return PairDataset(records, processor, media, max_seq_length=data.max_seq_length, **common)
    if loop == "grpo":
        from vltrain.data.prompts import PromptDataset

        return PromptDataset(records, processor, media, max_prompt_length=length_limit(cfg, loop), **common)
    from vltrain.data.labels import ClassificationDataset

    return ClassificationDataset(records, processor, media, spec=_label_spec(cfg), max_seq_length=data.max_seq_length,
                                 default_prompt=cfg.cls.prompt, **common)


def length_limit(cfg, loop: str) -> int:
    """The token limit the loop's dataset holds samples to (GRPO: the prompt's)."""
    if loop == "grpo":
        return cfg.grpo.max_prompt_length or cfg.data.max_seq_length
    return cfg.data.max_seq_length


def _sequences(example: dict, loop: str) -> list[tuple[str, object, object, object]]:
    """(name, input_ids, labels or None, mm_token_type_ids) of every sequence an Example trains on."""
    if loop == "dpo":
        return [(name, example[name]["input_ids"], example[name]["labels"], example[name]["mm_token_type_ids"])
                for name in ("chosen", "rejected")]
    return [("sequence", example["input_ids"], example.get("labels"), example["mm_token_type_ids"])]


def _duplicate_ids(records: list, loop: str, split: str, cfg) -> str | None:
    """The recipes' unique-id checks (cls eval data; DPO with precompute_ref_log_probs), as one line or None."""
    if not ((loop == "cls" and split == "eval") or (loop == "dpo" and cfg.dpo.precompute_ref_log_probs)):
        return None
    seen = set()
    for record in records:
        sample_id = record.sample_id
        if sample_id in seen:
            why = "evaluation counts each sample once by id" if loop == "cls" else \
                "dpo.precompute_ref_log_probs keys pairs by id"
            return f"id {sample_id!r} appears twice in the {split} data; {why}: make the ids unique"
        seen.add(sample_id)
    return None


# ------------------------------------------------------------------------------------------ inspection
def _local_missing(conv, image_folder: str | None) -> list[str]:
    """The conversation's local media files that do not exist (URLs and data URIs are not checked)."""
    from vltrain.data.media import resolve_media_path

    missing = []
    for ref in conv.images + conv.videos:
        path = resolve_media_path(ref, image_folder)
        if re.match(r"^https?://", path) or path.startswith("data:"):
            continue
        if not os.path.exists(path.removeprefix("file://")):
            missing.append(path)
    return missing


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> int:  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"min": ordered[0], "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1],
            "mean": sum(ordered) / len(ordered)}


@contextlib.contextmanager
def _quiet_data_warnings():
    """The data layer warns once per skipped / truncated sample; the report lists them all instead."""
    logger = logging.getLogger("vltrain.data")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _parse(cfg, loop: str, path: str) -> dict:
    """Read one data file with the recipe's loader; when it refuses the file, parse record by record to name
    every record it refuses (training stops at the first). Raises DataFormatError when no record can be read."""
    from vltrain.data.formats import DataFormatError, read_records

    raw = read_records(path)  # an unreadable file (missing, not JSON, not records): nothing to report
    split = {"path": path, "num_read": len(raw), "rejected": [], "fatal": None}
    try:
        split["records"] = _loader(cfg, loop)(path)
        return split
    except DataFormatError as e:
        split["fatal"] = f"{e}"
    parse, records = _record_parser(cfg, loop), []
    for i, record in enumerate(raw):
        try:
            records.append(parse(record, i, str(path)))
        except DataFormatError as e:
            sample_id = str(record.get("id", i))
            split["rejected"].append({"id": sample_id, "index": i, "stage": "parse", "reason": _reason(e)})
    split["records"] = records
    return split


def _reason(error: BaseException) -> str:
    """A data-layer message without its `file: sample i (id=...)` prefix (the table has the id)."""
    text = " ".join(str(error).split())
    return re.sub(r"^.*?sample \d+ \(id=.*?\)[: ]\s*", "", text, count=1)


def _dataset(cfg, loop: str, split: dict, processor, media):
    """The recipe's dataset over the parsed records; records it refuses (DataFormatError: training would stop)
    are named one by one and left out so that the rest can be inspected."""
    from vltrain.data.formats import DataFormatError

    records, source = split["records"], split["path"]
    if not records:
        return None
    try:
        return _build_dataset(cfg, loop, records, processor, media, source)
    except DataFormatError as e:
        split["fatal"] = split["fatal"] or f"{e}"
    kept = []
    for record in records:
        try:
            _build_dataset(cfg, loop, [record], processor, media, source)
            kept.append(record)
        except DataFormatError as e:
            conv = record.prompt if loop == "dpo" else record
            split["rejected"].append({"id": conv.sample_id, "index": conv.index, "stage": "dataset", "reason": _reason(e)})
    return _build_dataset(cfg, loop, kept, processor, media, source) if kept else None


def _inspect_split(cfg, loop: str, name: str, path: str, processor, media, *, num_examples: int,
                   show_progress: bool) -> tuple[dict, list[dict]]:
    """(the split's numbers, its first `num_examples` usable Examples with their conversations)."""
    from tqdm import tqdm

    from vltrain.data.encode import IGNORE_INDEX as DATA_IGNORE, SampleSkipped
    from vltrain.data.media import MediaError
    from vltrain.data.skips import SkipLedger, TooManySkips, skip_record

    assert DATA_IGNORE == IGNORE_INDEX
    split = _parse(cfg, loop, path)
    dataset = _dataset(cfg, loop, split, processor, media)
    records = split.pop("records")
    duplicate = _duplicate_ids(records, loop, name, cfg)
    if duplicate:
        split["fatal"] = split["fatal"] or f"{path}: {duplicate}"
    limit = length_limit(cfg, loop)
    media_tokens_ids = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")}
    samples, skips, examples, over, missing = [], [], [], [], []
    num = len(dataset) if dataset is not None else 0
    with _quiet_data_warnings():
        for i in tqdm(range(num), desc=f"inspect {name}", disable=not show_progress, dynamic_ncols=True):
            conv = dataset.conversation(i)
            if _local_missing(conv, cfg.data.image_folder):
                missing.append(conv.sample_id)
            try:
                example = dataset.encode(i)
            except (SampleSkipped, MediaError) as e:  # what SkippingDataset.__getitem__ replaces and records
                record = skip_record(conv.source, conv.index, conv.sample_id, getattr(e, "reason", str(e)))
                skips.append(record)
                split["rejected"].append({"id": record["id"], "index": record["index"], "stage": "skipped",
                                          "reason": record["reason"]})
                if f"={limit}" in record["reason"] and "_length=" in record["reason"]:
                    over.append({"id": conv.sample_id, "tokens": _tokens_in(record["reason"]), "action": "skipped"})
                continue
            except ValueError as e:  # a chat-template error: by render_chat's policy it stops the run
                split["fatal"] = split["fatal"] or " ".join(str(e).split())
                split["rejected"].append({"id": conv.sample_id, "index": conv.index, "stage": "template",
                                          "reason": _reason(e)})
                continue
            sequences = _sequences(example, loop)
            longest = max(sequences, key=lambda s: len(s[1]))
            kept = len(longest[1])
            num_media = int(((longest[3] > 0) | _isin(longest[1], media_tokens_ids)).sum())
            truncated = example.get("truncated") or []
            full = truncated[0]["tokens_before"] if truncated else kept
            if truncated:
                over.append({"id": conv.sample_id, "tokens": full, "action": f"truncated to {kept}"})
            samples.append({"id": conv.sample_id, "index": i, "tokens": full, "media": num_media,
                            "text": full - num_media, "batch_tokens": sum(len(s[1]) for s in sequences)})
            if len(examples) < num_examples:
                examples.append({"split": name, "conv": conv, "example": example, "sequences": sequences})
    split["missing_media"] = missing
    split["over_length"] = over
    split["limit"] = limit
    split["num_usable"] = len(samples)
    split["num_rejected"] = split["num_read"] - len(samples)
    split["samples"] = samples
    split["percentiles"] = {key: _percentiles([s[key] for s in samples]) for key in ("tokens", "text", "media")}
    split["num_dataset"] = num
    split["too_many_skips"] = None
    if num:
        ledger = SkipLedger(cfg.data.max_bad_fraction, num)
        try:
            ledger.add(skips)
        except TooManySkips as e:
            split["too_many_skips"] = str(e)
    if num and not samples:
        split["fatal"] = split["fatal"] or f"{path}: no usable sample (all {num} skipped)"
    # what the loader's sample slots hold: a skipped slot is filled by the next usable sample (SkippingDataset)
    slots = []
    if samples:
        usable = {s["index"]: s["batch_tokens"] for s in samples}
        for i in range(num):
            j = next((k % num for k in range(i, i + num) if k % num in usable), None)
            slots.append(usable[j])
    split["slot_tokens"] = slots
    return split, examples


def _tokens_in(reason: str) -> int | None:
    match = re.search(r"(\d+) tokens", reason)
    return int(match.group(1)) if match else None


def _isin(ids, values: set):
    import torch

    return torch.isin(ids, torch.tensor(sorted(values), dtype=ids.dtype))


def estimate(cfg, loop: str, slot_tokens: list[int], num_processes: int) -> dict:
    """Optimizer steps and tokens per epoch of the train split, as vltrain.progress.total_steps counts them on a
    loader of `len(slot_tokens)` samples sharded over `num_processes` ranks."""
    from vltrain.data.packing import TokenBudgetBatchSampler

    train, data = cfg.train, cfg.data
    ga = train.gradient_accumulation_steps
    out = {"num_samples": len(slot_tokens), "micro_batch_size": train.micro_batch_size,
           "gradient_accumulation_steps": ga, "num_processes": num_processes,
           "max_tokens_per_batch": data.max_tokens_per_batch, "error": None}
    if data.max_tokens_per_batch:
        try:
            sampler = TokenBudgetBatchSampler(slot_tokens, data.max_tokens_per_batch, shuffle=True, seed=train.seed)
        except ValueError as e:
            return out | {"error": f"data.max_tokens_per_batch: {e}"}
        num_micro = len(sampler)
        out["samples_per_step"] = None
    else:
        num_micro = math.ceil(len(slot_tokens) / train.micro_batch_size)
        out["samples_per_step"] = train.micro_batch_size * ga * num_processes
    per_rank = math.ceil(num_micro / num_processes)  # accelerate shards micro-batches (even_batches)
    per_epoch = max(1, math.ceil(per_rank / ga))
    total = train.max_steps if train.max_steps > 0 else max(1, math.ceil(train.num_epochs * per_epoch))
    if loop == "grpo":  # grpo.num_iterations optimizer steps reuse one rollout of a step's prompts
        per_epoch *= cfg.grpo.num_iterations
    out.update(micro_batches_per_epoch=num_micro, steps_per_epoch=per_epoch, total_steps=total,
               max_steps=train.max_steps if train.max_steps > 0 else None, epochs=total / per_epoch,
               tokens_per_epoch=sum(slot_tokens))
    if loop == "grpo":
        g, c = cfg.grpo.num_generations, cfg.grpo.max_completion_length
        out["rollout_tokens_per_epoch"] = sum(g * (p + c) for p in slot_tokens)  # at most
    return out


def inspect_data(cfg, loop: str, *, processor=None, image_factor: int | None = None,
                 num_examples: int = DEFAULT_EXAMPLES, num_processes: int = 1, show_progress: bool = True) -> dict:
    """Inspect `cfg.data`'s train and eval files for `loop` (module docstring) and return the numbers:

        {"loop", "model", "splits": {"train": {num_read, num_usable, num_rejected, rejected: [{id, index, stage,
         reason}], missing_media: [ids], over_length: [{id, tokens, action}], percentiles, samples, fatal,
         too_many_skips, ...}, "eval": ...}, "estimate": {steps_per_epoch, tokens_per_epoch, ...},
         "examples": [rendered samples], "usable": bool, "problem": one line or None}

    Synthetic data names are written first (under train.output_dir, as the recipes do). `processor` (with
    `image_factor`) skips loading the model's processor. Raises DataFormatError when a file cannot be read."""
    from vltrain.data.loader import resolve_synthetic_data
    from vltrain.data.media import MediaOptions

    if loop not in LOOPS:
        raise ValueError(f"loop {loop!r} is not one of {', '.join(LOOPS)}")
    if num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    resolve_synthetic_data(cfg.data, cfg.train.output_dir)
    from vltrain.data.formats import read_records

    # several train files (vltrain.data.mixture): each is inspected as a split of its own, "train", "train[1]", ...
    train_paths = [cfg.data.train_path] if isinstance(cfg.data.train_path, str) else cfg.data.train_paths()
    paths = {("train" if i == 0 else f"train[{i}]"): path for i, path in enumerate(train_paths)}
    if cfg.data.eval_path:
        paths["eval"] = cfg.data.eval_path
    for path in paths.values():
        read_records(path)  # a missing / unreadable file fails before the processor loads
    if processor is None:
        processor, image_factor = load_processor(cfg, loop)
    media = MediaOptions.from_config(cfg.data, image_factor=image_factor or 28)
    report = {"loop": loop, "model": cfg.model.name_or_path, "splits": {}, "examples": [],
              "max_seq_length": cfg.data.max_seq_length, "limit": length_limit(cfg, loop)}
    for name, path in paths.items():
        split, examples = _inspect_split(cfg, loop, name, path, processor, media, show_progress=show_progress,
                                         num_examples=num_examples - len(report["examples"]))
        report["splits"][name] = split
        report["examples"] += [_render_data(e, loop, processor, media, cfg) for e in examples]
    # the steps of an epoch over all train files (data.weights draws as many samples, so the same step count)
    train_slots = [n for name, s in report["splits"].items() if name.split("[")[0] == "train" for n in s["slot_tokens"]]
    report["estimate"] = estimate(cfg, loop, train_slots, num_processes) if train_slots else None
    problems = [f"{name} data: {s['fatal']}" for name, s in report["splits"].items() if s["fatal"]]
    problems += [f"{name} data: {s['too_many_skips']}" for name, s in report["splits"].items() if s["too_many_skips"]]
    if report["estimate"] and report["estimate"]["error"]:
        problems.append(report["estimate"]["error"])
    report["usable"] = not problems
    report["problem"] = problems[0] if problems else None
    report["problems"] = problems
    if loop == "grpo":
        report["grpo"] = {"num_generations": cfg.grpo.num_generations,
                          "max_completion_length": cfg.grpo.max_completion_length}
    return report


# ------------------------------------------------------------------------------------------ examples
def _thumbnail(kind: str, ref: str, media, image_folder: str | None) -> str | None:
    """A small PNG data URI of an image (a video's first sampled frame), or None when it cannot be read."""
    from PIL import Image

    from vltrain.data.media import load_image, load_video, resolve_media_path

    path = resolve_media_path(ref, image_folder)
    try:
        if kind == "image":
            image = load_image(path, media)
        else:
            frames, _ = load_video(path, media)
            image = Image.fromarray(frames[0].permute(1, 2, 0).numpy())
    except Exception:  # a broken file is already a skip record; the chip shows no picture
        return None
    image = image.convert("RGB")
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _render_data(item: dict, loop: str, processor, media, cfg) -> dict:
    """One usable sample as plain data for the page: every sequence's tokens (id, text, trained, media item)."""
    conv, example = item["conv"], item["example"]
    tokenizer = processor.tokenizer
    merge = getattr(processor.image_processor, "merge_size", 2) ** 2
    pads = {tokenizer.convert_tokens_to_ids("<|image_pad|>"): "image", tokenizer.convert_tokens_to_ids("<|video_pad|>"): "video"}
    items = {kind: [{"ref": ref, "tokens": int(grid.prod()) // merge}
                    for ref, grid in zip(getattr(conv, f"{kind}s"), example.get(f"{kind}_grid_thw", []))]
             for kind in ("image", "video")}
    for kind, listed in items.items():
        for entry in listed:
            entry["thumbnail"] = _thumbnail(kind, entry["ref"], media, cfg.data.image_folder)
    sequences = []
    for name, input_ids, labels, types in item["sequences"]:
        ids = input_ids.tolist()
        trained = (labels != IGNORE_INDEX).tolist() if labels is not None else [False] * len(ids)
        is_media = [t > 0 or i in pads for i, t in zip(ids, types.tolist())]
        # media runs, each mapped to its image / video by the tokens each one takes (a timestamped video
        # spreads over several runs)
        queues = {kind: [[k, entry["tokens"]] for k, entry in enumerate(items[kind])] for kind in items}
        media_of = []
        for token, flag in zip(ids, is_media):
            if not flag:
                media_of.append(None)
                continue
            kind = pads.get(token, "image")
            queue = queues[kind]
            while queue and queue[0][1] <= 0:
                queue.pop(0)
            if queue:
                queue[0][1] -= 1
                media_of.append((kind, queue[0][0]))
            else:
                media_of.append((kind, None))
        sequences.append({"name": name, "ids": ids, "text": [tokenizer.decode([i]) for i in ids], "trained": trained,
                          "media": media_of, "special": [bool(SPECIAL.match(t)) for t in tokenizer.convert_ids_to_tokens(ids)]})
    out = {"split": item["split"], "id": conv.sample_id, "sequences": sequences, "media": items,
           "truncated": example["truncated"][0]["tokens_before"] if example.get("truncated") else None}
    if loop == "grpo":
        out["answer"] = example.get("assistant")
    if loop == "cls":
        target = example.get("target")
        spec = _label_spec(cfg)
        if isinstance(target, int):
            out["label"] = f"{spec.name(target)} (class {target})"
        elif isinstance(target, list):
            out["label"] = ", ".join(spec.name(k) for k, v in enumerate(target) if v) or "(no positive label)"
        else:
            out["label"] = repr(target)
    return out


# ------------------------------------------------------------------------------------------ HTML
CSS = """
:root { --ink:#1f2430; --muted:#6b7280; --line:#e5e7eb; --bg:#f6f7f9; --card:#fff; --red:#c62828; --redbg:#fdecea;
  --green:#15803d; --trained:#d9f2e1; --trainedline:#22a05a; --text:#3b82f6; --media:#a855f7; }
* { box-sizing:border-box; }
body { margin:0; background:var(--bg); color:var(--ink); font:14px/1.5 -apple-system, "Segoe UI", Roboto,
  "Helvetica Neue", Arial, sans-serif; }
main { max-width:1100px; margin:0 auto; padding:28px 24px 60px; }
h1 { font-size:22px; margin:0 0 4px; letter-spacing:-.01em; }
h2 { font-size:17px; margin:34px 0 12px; padding-bottom:6px; border-bottom:1px solid var(--line); }
h3 { font-size:14px; margin:18px 0 8px; color:#374151; }
.sub { color:var(--muted); font-size:13px; }
code, .mono { font-family:"SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace; font-size:12.5px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:16px 18px;
  box-shadow:0 1px 2px rgba(16,24,40,.04); margin:12px 0; }
.verdict { display:flex; gap:12px; align-items:center; font-weight:600; }
.verdict.ok { color:var(--green); } .verdict.bad { color:var(--red); }
.verdict .dot { width:10px; height:10px; border-radius:50%; background:currentColor; flex:none; }
.problem { color:var(--red); font-weight:400; margin-top:6px; font-size:13px; }
.stats { display:grid; grid-template-columns:repeat(auto-fill, minmax(150px, 1fr)); gap:10px; margin-top:14px; }
.stat { border:1px solid var(--line); border-radius:8px; padding:10px 12px; background:#fbfbfc; }
.stat .v { font-size:20px; font-weight:650; letter-spacing:-.01em; }
.stat .k { color:var(--muted); font-size:12px; }
.stat.bad { border-color:#f3b6b0; background:var(--redbg); } .stat.bad .v { color:var(--red); }
table { border-collapse:collapse; width:100%; font-size:13px; }
th, td { text-align:left; padding:6px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12px; text-transform:uppercase; letter-spacing:.03em; }
table.rejected td { color:#7f1d1d; } table.rejected tr:nth-child(even) td { background:#fff7f6; }
table.rejected td.id { font-weight:600; color:var(--red); white-space:nowrap; }
.tag { display:inline-block; padding:0 7px; border-radius:9px; font-size:11.5px; background:#eef2f7; color:#475569; }
.tag.red { background:var(--redbg); color:var(--red); }
.grid2 { display:grid; grid-template-columns:minmax(0, 3fr) minmax(0, 2fr); gap:16px; align-items:start; }
.legend { display:flex; gap:16px; flex-wrap:wrap; font-size:12.5px; color:#374151; margin:4px 0 10px; }
.legend i { display:inline-block; width:12px; height:12px; border-radius:3px; vertical-align:-2px; margin-right:5px; }
.seq { font-family:"SFMono-Regular", Menlo, Consolas, "Liberation Mono", monospace; font-size:12.5px; line-height:2.0;
  white-space:pre-wrap; word-break:break-word; background:#fcfcfd; border:1px solid var(--line); border-radius:8px;
  padding:10px 12px; }
.seqname { font-size:12px; color:var(--muted); margin:10px 0 4px; font-weight:600; }
.t { border-radius:3px; padding:1px 0; box-shadow:inset -1px 0 0 rgba(0,0,0,.08); color:#6b7280; }
.t[data-trained="1"] { background:var(--trained); color:#0f3d22; box-shadow:inset 0 -2px 0 var(--trainedline); }
.t.sp { color:#94a3b8; font-size:11px; }
.t[data-trained="1"].sp { color:#166534; }
.t.media { display:inline-flex; align-items:center; gap:6px; vertical-align:middle; background:#f5edff;
  border:1px solid #dcc6fb; color:#6b21a8; padding:2px 8px 2px 2px; margin:1px 2px; font-size:11.5px; line-height:1.3;
  box-shadow:none; }
.t.media img { height:40px; width:auto; border-radius:4px; display:block; image-rendering:auto; }
.t.media .noimg { width:40px; height:40px; border-radius:4px; background:#e9d5ff; display:inline-block; }
.meta { display:flex; gap:8px; flex-wrap:wrap; align-items:center; margin-bottom:6px; }
.answer { margin-top:8px; font-size:13px; } .answer b { color:#374151; }
footer { color:var(--muted); font-size:12px; margin-top:40px; }
"""


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(n) -> str:
    if n is None:
        return "&ndash;"
    if isinstance(n, float):
        return f"{n:,.2f}"
    return f"{n:,}"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _stat(value, key: str, bad: bool = False) -> str:
    return f'<div class="stat{" bad" if bad else ""}"><div class="v">{value}</div><div class="k">{_esc(key)}</div></div>'


def histogram_svg(samples: list[dict], limit: int, width: int = 620, height: int = 230) -> str:
    """Inline SVG: samples per total-length bin, each bar split into its media and text tokens' shares;
    the limit as a dashed line (the region beyond it shaded red)."""
    if not samples:
        return '<p class="sub">no usable sample</p>'
    left, right, top, bottom = 44, 12, 14, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    shortest, longest = min(s["tokens"] for s in samples), max(s["tokens"] for s in samples)
    upper = max(longest, limit) if limit <= longest * 1.25 else longest  # show the limit when it is near
    step = _nice(max(1, upper - (shortest if shortest > upper / 2 else 0)) / HISTOGRAM_BINS)
    lower = (shortest // step) * step if shortest > upper / 2 else 0  # clustered lengths: zoom in
    num_bins = max(1, math.ceil((upper + 1 - lower) / step))
    counts, text, media = [0] * num_bins, [0] * num_bins, [0] * num_bins
    for s in samples:
        b = min(num_bins - 1, (s["tokens"] - lower) // step)
        counts[b] += 1
        text[b] += s["text"]
        media[b] += s["media"]
    peak = max(counts)
    span = num_bins * step
    x = lambda tokens: left + plot_w * (tokens - lower) / span
    y = lambda count: top + plot_h * (1 - count / peak)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" role="img" '
             f'aria-label="token length histogram" style="max-width:{width}px;font-family:inherit">']
    if limit < lower + span:
        parts.append(f'<rect x="{x(limit):.1f}" y="{top}" width="{left + plot_w - x(limit):.1f}" height="{plot_h}" '
                     'fill="#fdecea"/>')
    for k in range(5):  # horizontal grid lines
        value = peak * k / 4
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#eef0f3"/>'
                     f'<text x="{left - 6}" y="{y(value) + 4:.1f}" font-size="10" fill="#6b7280" text-anchor="end">'
                     f'{value:.0f}</text>')
    bar_w = plot_w / num_bins
    for b, count in enumerate(counts):
        if not count:
            continue
        share = media[b] / max(1, media[b] + text[b])
        x0, h = left + b * bar_w + 1, plot_h * count / peak
        h_media = h * share
        title = f"{lower + b * step}-{lower + (b + 1) * step - 1} tokens: {count} samples, {share:.0%} media tokens"
        parts.append(f'<g><title>{_esc(title)}</title>'
                     f'<rect x="{x0:.1f}" y="{top + plot_h - h:.1f}" width="{max(1, bar_w - 2):.1f}" '
                     f'height="{h - h_media:.1f}" fill="#3b82f6" rx="1.5"/>'
                     f'<rect x="{x0:.1f}" y="{top + plot_h - h_media:.1f}" width="{max(1, bar_w - 2):.1f}" '
                     f'height="{h_media:.1f}" fill="#a855f7" rx="1.5"/></g>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#9ca3af"/>')
    tick = _nice(span / 6)
    for tokens in range(math.ceil(lower / tick) * tick, lower + span + 1, tick):
        parts.append(f'<text x="{x(tokens):.1f}" y="{top + plot_h + 15}" font-size="10" fill="#6b7280" '
                     f'text-anchor="middle">{tokens:,.0f}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 3}" font-size="11" fill="#374151" text-anchor="middle">'
                 'tokens per sample</text>')
    if lower <= limit < lower + span:
        parts.append(f'<line x1="{x(limit):.1f}" x2="{x(limit):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#c62828" '
                     f'stroke-dasharray="4 3" stroke-width="1.5"/><text x="{x(limit) - 4:.1f}" y="{top + 10}" '
                     f'font-size="10.5" fill="#c62828" text-anchor="end">limit {limit:,}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _nice(value: float) -> int:
    """The smallest of 1, 2, 5 x 10^k (an integer) that is >= value."""
    magnitude = 10 ** max(0, math.floor(math.log10(max(value, 1))))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= value)


def _token_spans(seq: dict, example: dict) -> str:
    """Every token as `<span class="t" data-id data-trained>`; a media run (same image / video, same trained
    flag) as one chip `<span class="t media" data-id data-trained data-count>` with its thumbnail."""
    out, i, n = [], 0, len(seq["ids"])
    while i < n:
        if seq["media"][i] is not None:
            j = i
            while j < n and seq["media"][j] == seq["media"][i] and seq["trained"][j] == seq["trained"][i] \
                    and seq["ids"][j] == seq["ids"][i]:
                j += 1
            kind, index = seq["media"][i]
            entry = example["media"][kind][index] if index is not None else None
            picture = f'<img src="{entry["thumbnail"]}" alt="">' if entry and entry["thumbnail"] else '<span class="noimg"></span>'
            label = f"{kind} {index + 1 if index is not None else '?'} &middot; {j - i} tokens"
            title = f"{entry['ref']}: {j - i} tokens" if entry else f"{j - i} {kind} tokens"
            out.append(f'<span class="t media" data-id="{seq["ids"][i]}" data-trained="{int(seq["trained"][i])}" '
                       f'data-count="{j - i}" title="{_esc(title)}">{picture}<span>{label}</span></span>')
            i = j
            continue
        text = seq["text"][i]
        shown = _esc(text).replace("\n", "\u21b5\n")
        cls = "t sp" if seq["special"][i] else "t"
        out.append(f'<span class="{cls}" data-id="{seq["ids"][i]}" data-trained="{int(seq["trained"][i])}" '
                   f'title="id {seq["ids"][i]}">{shown}</span>')
        i += 1
    return "".join(out)


def _example_html(example: dict, loop: str) -> str:
    tags = [f'<span class="tag">{_esc(example["split"])}</span>', f'<b class="mono">{_esc(example["id"])}</b>']
    for seq in example["sequences"]:
        trained = sum(seq["trained"])
        name = "" if seq["name"] == "sequence" else f"{seq['name']}: "
        tags.append(f'<span class="tag">{name}{len(seq["ids"])} tokens, {trained} trained</span>')
    if example["truncated"]:
        tags.append(f'<span class="tag red">truncated from {example["truncated"]:,} tokens</span>')
    body = [f'<div class="card example" data-sample="{_esc(example["id"])}"><div class="meta">{" ".join(tags)}</div>']
    for seq in example["sequences"]:
        if seq["name"] != "sequence":
            body.append(f'<div class="seqname">{_esc(seq["name"])}</div>')
        body.append(f'<div class="seq" data-sample="{_esc(example["id"])}" data-seq="{_esc(seq["name"])}">'
                    f'{_token_spans(seq, example)}</div>')
    if loop == "grpo":
        answer = example.get("answer")
        body.append(f'<div class="answer"><b>reference answer</b> (the <code>assistant</code> column the rewards '
                    f'see): {_esc(answer) if answer is not None else "<i>none</i>"}</div>')
    if loop == "cls":
        body.append(f'<div class="answer"><b>label</b>: {_esc(example["label"])}</div>')
    body.append("</div>")
    return "".join(body)


def _split_html(name: str, split: dict) -> str:
    p = split["percentiles"]["tokens"]
    rows = []
    for key, label in (("tokens", "all tokens"), ("text", "text tokens"), ("media", "media tokens")):
        q = split["percentiles"][key]
        if q:
            rows.append(f"<tr><td>{label}</td>" + "".join(f"<td>{q[k]:,.0f}</td>" for k in ("min", "p50", "p90", "p99", "max"))
                        + "</tr>")
    parts = [f'<h2>{_esc(name)} data <span class="sub mono">{_esc(split["path"])}</span></h2>']
    if split["fatal"]:
        parts.append(f'<div class="card"><div class="verdict bad"><span class="dot"></span>training would stop on this '
                     f'file</div><div class="problem mono">{_esc(split["fatal"])}</div></div>')
    if split["too_many_skips"]:
        parts.append(f'<div class="card"><div class="verdict bad"><span class="dot"></span>too many skipped samples'
                     f'</div><div class="problem">{_esc(split["too_many_skips"])}</div></div>')
    over = [o for o in split["over_length"]]
    parts.append('<div class="grid2"><div class="card"><h3 style="margin-top:0">token lengths</h3>'
                 '<div class="legend"><span><i style="background:#3b82f6"></i>text tokens</span>'
                 '<span><i style="background:#a855f7"></i>media tokens</span>'
                 '<span><i style="background:#fdecea;border:1px solid #f3b6b0"></i>over the limit</span></div>'
                 f'{histogram_svg(split["samples"], split["limit"])}</div>'
                 '<div class="card"><h3 style="margin-top:0">percentiles (usable samples)</h3>'
                 '<table><tr><th></th><th>min</th><th>p50</th><th>p90</th><th>p99</th><th>max</th></tr>'
                 + "".join(rows) + "</table>"
                 + (f'<p class="sub">mean {p["mean"]:,.1f} tokens per sample; limit {split["limit"]:,}</p>' if p else "")
                 + "</div></div>")
    if split["rejected"]:
        body = "".join(f'<tr><td class="id mono">{_esc(r["id"])}</td><td>{_fmt(r["index"])}</td>'
                       f'<td><span class="tag red">{_esc(r["stage"])}</span></td><td>{_esc(r["reason"])}</td></tr>'
                       for r in split["rejected"])
        parts.append(f'<div class="card"><h3 style="margin-top:0;color:var(--red)">rejected samples '
                     f'({len(split["rejected"])})</h3><table class="rejected"><tr><th>id</th><th>index</th><th>stage</th>'
                     f'<th>reason</th></tr>{body}</table><p class="sub">parse / dataset: training refuses the whole file '
                     'before the model loads; skipped: the sample is replaced by the next one during training.</p></div>')
    if over:
        body = "".join(f'<tr><td class="mono">{_esc(o["id"])}</td><td>{_fmt(o["tokens"])}</td><td>{_esc(o["action"])}</td></tr>'
                       for o in over)
        parts.append(f'<div class="card"><h3 style="margin-top:0">over the limit of {split["limit"]:,} tokens '
                     f'({len(over)})</h3><table><tr><th>id</th><th>tokens</th><th>what training does</th></tr>{body}'
                     '</table></div>')
    if split["missing_media"]:
        ids = ", ".join(f'<code>{_esc(i)}</code>' for i in split["missing_media"])
        parts.append(f'<div class="card"><h3 style="margin-top:0;color:var(--red)">media missing '
                     f'({_plural(len(split["missing_media"]), "sample")})</h3>{ids}</div>')
    return "".join(parts)


def render_html(report: dict, *, title: str = "vltrain data inspector", config: str | None = None) -> str:
    """The self-contained report page (inline CSS and SVG, thumbnails as data URIs: no external URL)."""
    loop, splits, est = report["loop"], report["splits"], report["estimate"]
    verdict = ('<div class="verdict ok"><span class="dot"></span>the data is usable for training</div>'
               if report["usable"] else
               '<div class="verdict bad"><span class="dot"></span>training would stop on this data</div>'
               + "".join(f'<div class="problem">{_esc(p)}</div>' for p in report["problems"]))
    stats = []
    for name, s in splits.items():
        stats += [_stat(_fmt(s["num_read"]), f"{name} samples read"), _stat(_fmt(s["num_usable"]), f"{name} usable"),
                  _stat(_fmt(s["num_rejected"]), f"{name} rejected", bad=s["num_rejected"] > 0)]
    trains = [s for name, s in splits.items() if name.split("[")[0] == "train"]  # every file of a mixture
    missing, over = sum(len(s["missing_media"]) for s in trains), sum(len(s["over_length"]) for s in trains)
    stats += [_stat(_fmt(missing), "train samples with media missing", bad=bool(missing)),
              _stat(_fmt(over), f"train over {trains[0]['limit']:,} tokens", bad=bool(over))]
    q = _percentiles([sample["tokens"] for s in trains for sample in s["samples"]])
    if q:
        stats.append(_stat(f'{q["p50"]:,} / {q["max"]:,}', "train tokens p50 / max"))
    est_line = ""
    if est and not est["error"]:
        stats += [_stat(_fmt(est["steps_per_epoch"]), "optimizer steps / epoch"),
                  _stat(_fmt(est["tokens_per_epoch"]), ("prompt " if loop == "grpo" else "") + "tokens / epoch")]
        batch = (f'micro-batch {est["micro_batch_size"]} x accumulation {est["gradient_accumulation_steps"]} x '
                 f'{est["num_processes"]} process(es) = {_plural(est["samples_per_step"], "sample")} per step'
                 if est["samples_per_step"] else
                 f'a budget of {est["max_tokens_per_batch"]:,} tokens per micro-batch ({est["micro_batches_per_epoch"]:,} '
                 f'micro-batches per epoch) x {est["gradient_accumulation_steps"]} accumulation x {est["num_processes"]} '
                 'process(es)')
        run = (f'train.max_steps={est["max_steps"]:,} is {est["epochs"]:.2f} epochs' if est["max_steps"] else
               f'{est["total_steps"]:,} steps in all ({est["epochs"]:.2f} epochs)')
        est_line = f'<p class="sub" style="margin:12px 0 0">{_esc(batch)}; {_esc(run)}.'
        if loop == "grpo":
            est_line += (f' Each prompt gets {report["grpo"]["num_generations"]} completions of up to '
                         f'{report["grpo"]["max_completion_length"]} tokens: at most '
                         f'{est["rollout_tokens_per_epoch"]:,} sequence tokens per epoch.')
        est_line += "</p>"
    legend = ('<div class="legend"><span><i style="background:var(--trained);box-shadow:inset 0 -2px 0 var(--trainedline)">'
              '</i>trained token (label = token)</span><span><i style="background:#fff;border:1px solid #d1d5db"></i>'
              'not trained (label -100)</span><span><i style="background:#f5edff;border:1px solid #dcc6fb"></i>'
              'media placeholder tokens, one chip per run</span></div>')
    notes = {"sft": "The whole conversation; assistant replies are trained.",
             "dpo": "Chosen and rejected: the prompt's tokens followed by each reply; only the replies are trained.",
             "grpo": "The prompt with the generation header: nothing is trained from the data (the model writes the "
                     "completions).",
             "cls": "The prompt the classifier reads (no tokens are trained: the head learns the label)."}
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    page = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body><main>',
            f'<h1>{_esc(title)}</h1><div class="sub">{_esc(loop)} data for <code>{_esc(report["model"])}</code>'
            + (f' &middot; config <code>{_esc(config)}</code>' if config else "") + f" &middot; {when}</div>",
            f'<div class="card summary">{verdict}<div class="stats">{"".join(stats)}</div>{est_line}</div>']
    for name, split in splits.items():
        page.append(_split_html(name, split))
    page.append(f'<h2>examples ({len(report["examples"])})</h2><p class="sub">{_esc(notes[loop])} Hover a token for '
                f'its id.</p>{legend}')
    page += [_example_html(e, loop) for e in report["examples"]]
    page.append('<footer>written by <code>python -m vltrain.inspector</code>; no model weights were loaded.</footer>'
                "</main></body></html>")
    return "".join(page)


# ------------------------------------------------------------------------------------------ terminal
def summary_lines(report: dict) -> list[str]:
    """The short terminal summary: counts, length percentiles, over-length, steps per epoch, rejected ids."""
    lines = []
    for name, s in report["splits"].items():
        q = s["percentiles"]["tokens"]
        lengths = f"; tokens p50 {q['p50']:,} p90 {q['p90']:,} p99 {q['p99']:,} max {q['max']:,}" if q else ""
        lines.append(f"{name}: {s['num_read']} read, {s['num_usable']} usable, {s['num_rejected']} rejected, "
                     f"{len(s['missing_media'])} with media missing, {len(s['over_length'])} over {s['limit']:,} "
                     f"tokens{lengths}")
        if s["rejected"]:
            shown = ", ".join(r["id"] for r in s["rejected"][:LISTED_IN_TERMINAL])
            more = f" (+{len(s['rejected']) - LISTED_IN_TERMINAL} more)" if len(s["rejected"]) > LISTED_IN_TERMINAL else ""
            lines.append(f"  rejected: {shown}{more}")
    est = report["estimate"]
    if est and not est["error"]:
        lines.append(f"train: ~{est['steps_per_epoch']:,} optimizer steps per epoch, {est['tokens_per_epoch']:,} "
                     f"{'prompt ' if report['loop'] == 'grpo' else ''}tokens per epoch"
                     + (f"; train.max_steps={est['max_steps']:,} is {est['epochs']:.2f} epochs" if est["max_steps"] else
                        f"; {est['total_steps']:,} steps ({est['epochs']:.2f} epochs)"))
    for problem in report["problems"]:
        lines.append(f"problem: {problem}")
    return lines


def default_out(cfg) -> Path:
    return Path(cfg.train.output_dir) / "inspect.html"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program("python -m vltrain.inspector"),
        description="Check a dataset against the model's processor before training (no weights loaded): rejected "
                    "samples, missing media, token lengths, steps per epoch, label masks. Writes an HTML report.")
    parser.add_argument("config", nargs="*", metavar="CONFIG [section.field=value ...]",
                        help="a recipe config (YAML path or shipped config name) and dotted overrides")
    parser.add_argument("--loop", choices=LOOPS, default=None,
                        help="which recipe's data this is (default: the config's dpo/grpo/cls section, else sft)")
    parser.add_argument("--out", default=None, help="where to write the HTML report (default <train.output_dir>/inspect.html)")
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                        help="how many samples to render token by token with their label mask")
    parser.add_argument("--num_processes", type=int, default=1,
                        help="training processes (GPUs) to count steps per epoch for")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> int:
    """main() without the one-line error handling: 0 when the data is usable, 1 when training would stop."""
    from vltrain.data.formats import DataFormatError
    from vltrain.run import parse_config

    args = parse_args(argv)
    if args.examples < 0:
        raise ValueError(f"--examples must be >= 0, got {args.examples}")
    config_argv = list(args.config)
    loop = args.loop or infer_loop(config_argv[0] if config_argv else None)
    cfg = parse_config(config_class(loop), config_argv)
    try:
        report = inspect_data(cfg, loop, num_examples=args.examples, num_processes=args.num_processes)
    except DataFormatError as e:  # the file cannot be read at all
        raise ValueError(" ".join(str(e).split())) from None
    out = Path(args.out) if args.out else default_out(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = config_argv[0] if config_argv and "=" not in config_argv[0] else None
    out.write_text(render_html(report, config=config), encoding="utf-8")
    print("\n".join(summary_lines(report)))
    print(f"report: {out}")
    if not report["usable"]:
        print(f"error: {report['problem']}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    """`python -m vltrain.inspector` (module docstring); a user mistake ends in one line, exit status 1."""
    try:
        status = run(argv)
    except ValueError as e:
        sys.exit(f"error: {' '.join(str(e).split())}")
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
