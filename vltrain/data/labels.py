"""Classification data: records with a class label -> prompt Conversation + parsed target -> encoded Example.

Accepted records (a JSON list or JSONL, read by vltrain.data.formats.read_records):

* The upstream classification format, unchanged::

    {"id": "06bc...", "image": "image_2.jpg" | [...], "video": "v.mp4" | [...], "system": "optional",
     "prompt": "Question: What is in the image? \\n Options: ...", "label": "3"}

  The prompt is one user turn parsed exactly like a LLaVA record (formats.parse_record): `<image>` / `<video>`
  placeholders consumed in order, media first when the prompt has none; no media keys means text-only. Without
  a `prompt` field (or with `"prompt": null`) the user turn is `default_prompt` (the config's).
* `conversations` (LLaVA) or `messages` (OpenAI style) instead of `prompt`: parsed prompt-only
  (`require_reply=False`); the conversation must end with a user turn (earlier turns are allowed and are all
  part of the classified text).

Labels, by `LabelSpec.problem_type` (`parse_label`):

    single_label  an int class id, a digit string ("3", the upstream's), or a class name from `classes`
    multi_label   a list of class ids / names (the positive labels), or a 0/1 list of length num_labels
    regression    a number (or a string holding one)

A label outside the classes, a bool, null, a missing `label`, a record field named `labels` (reserved for the
model's token labels) or `target` is a DataFormatError naming the file, sample index, id and the value, raised
when the records are loaded, before any model exists.

Example (ClassificationDataset; vltrain.data.encode.encode_unlabeled, media decoded in loader workers)::

    {"id", "input_ids" (L,), "mm_token_type_ids" (L,), media tensors, "truncated", "skipped",
     "target": int | list[float] (C,) | float, **the record's other fields}

The sequence is the chat template's rendering of the prompt turns, without a generation header (the
classifier reads the hidden states, it generates nothing). A sample whose media end beyond `max_seq_length` is
skipped and counted like an SFT sample; a longer text is cut from the end (and recorded in `truncated`).

Batch (ClsCollator): right-padded with an attention_mask, or one packed row with position_ids (4, 1, L)
(vltrain.data.packing; an example's last token is where its position_ids[0] run ends); `target` a tensor:
int64 (N,), float32 (N, C) or float32 (N,); `id` and the other record fields lists of N.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Sampler

from vltrain.data.dataset import MAX_CONSECUTIVE_SKIPS, RESERVED_KEYS, SkippingDataset, check_reserved, located, pad_collate
from vltrain.data.encode import encode_unlabeled
from vltrain.data.formats import Conversation, DataFormatError, parse_record, read_records, record_id
from vltrain.data.media import MediaOptions
from vltrain.data.packing import pack_examples
from vltrain.families import RopeIndex

PROBLEM_TYPES = ("single_label", "multi_label", "regression")
DEFAULT_PROMPT = "What is in the image?"
TARGET = "target"
# Keys a classification Example builds itself; a record's extra field may not take one of these names.
CLS_RESERVED_KEYS = RESERVED_KEYS | {TARGET}
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class LabelSpec:
    problem_type: str  # one of PROBLEM_TYPES
    num_labels: int
    classes: tuple[str, ...] | None = None  # class names by id; len == num_labels when given

    def __post_init__(self):
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={self.problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int):
            raise ValueError(f"num_labels must be an integer, got {self.num_labels!r}")
        if self.problem_type == "regression" and self.num_labels != 1:
            raise ValueError(f"num_labels={self.num_labels}: a regression head predicts one number (num_labels=1)")
        if self.problem_type == "single_label" and self.num_labels < 2:
            raise ValueError(f"num_labels={self.num_labels}: single_label classification needs at least 2 classes")
        if self.num_labels < 1:
            raise ValueError(f"num_labels={self.num_labels} must be >= 1")
        if self.classes is not None:
            classes = tuple(self.classes)
            object.__setattr__(self, "classes", classes)  # a list from a YAML config becomes a tuple
            if self.problem_type == "regression":
                raise ValueError("classes: a regression target has no class names")
            if not all(isinstance(c, str) and c for c in classes):
                raise ValueError(f"classes must be non-empty strings, got {list(classes)}")
            if len(classes) != self.num_labels:
                raise ValueError(f"classes lists {len(classes)} names but num_labels={self.num_labels}")
            duplicates = sorted(name for name, n in Counter(classes).items() if n > 1)
            if duplicates:
                raise ValueError(f"classes: {duplicates[0]!r} is listed more than once")

    def name(self, class_id: int) -> str:
        """The class's name from `classes`, else its id as a string."""
        return self.classes[class_id] if self.classes is not None else str(class_id)


# ------------------------------------------------------------------------------------------- labels
def _class_id(value, spec: LabelSpec, where: str, what: str = "label") -> int:
    """One class: an int id, a class name (a name match wins), or a digit string id; errors say
    "`where`: `what` <value> ..."."""
    if isinstance(value, bool) or value is None:
        raise DataFormatError(f"{where}: {what} {value!r} is not a class (give an integer id or a class name)")
    if isinstance(value, str):
        if spec.classes is not None and value in spec.classes:
            return spec.classes.index(value)
        if not _INTEGER.fullmatch(value.strip()):
            known = f"one of the classes {list(spec.classes)}" if spec.classes else \
                "an integer id (class names need the config's `classes` list)"
            raise DataFormatError(f"{where}: {what} {value!r} is not {known}")
        class_id = int(value)
    elif isinstance(value, int):
        class_id = value
    else:
        raise DataFormatError(f"{where}: {what} {value!r} is a {type(value).__name__}, not an integer class id or "
                              "a class name")
    if not 0 <= class_id < spec.num_labels:
        raise DataFormatError(f"{where}: {what} {value!r} is outside the {spec.num_labels} classes "
                              f"(ids 0..{spec.num_labels - 1})")
    return class_id


def _is_multi_hot(value: list, num_labels: int) -> bool:
    return len(value) == num_labels and all(type(v) in (int, float) and v in (0, 1) for v in value)


def parse_label(value, spec: LabelSpec, where: str):
    """A record's `label` as the training target (module docstring): int (single_label), list[float] of length
    num_labels with 0/1 (multi_label), float (regression); DataFormatError naming `where` and the value otherwise.
    Digit strings: "3" -> 3 when no class is NAMED "3"; with classes given, a name match wins, else an integer id.
    A multi_label list of length num_labels holding only 0 and 1 is read as the 0/1 vector, not as ids."""
    if spec.problem_type == "single_label":
        if isinstance(value, list):
            raise DataFormatError(f"{where}: label {value!r} is a list; a single_label record has one class "
                                  "(lists are for problem_type multi_label)")
        return _class_id(value, spec, where)
    if spec.problem_type == "multi_label":
        if not isinstance(value, list):
            raise DataFormatError(f"{where}: label {value!r}: a multi_label label is a list of class ids / names "
                                  f"or a 0/1 list of length {spec.num_labels}")
        if _is_multi_hot(value, spec.num_labels):
            return [float(v) for v in value]
        target = [0.0] * spec.num_labels
        for item in value:
            target[_class_id(item, spec, where, f"label {value!r}: item")] = 1.0
        return target
    if isinstance(value, bool) or value is None or not isinstance(value, (int, float, str)):
        raise DataFormatError(f"{where}: label {value!r} is not a number (problem_type regression)")
    try:
        number = float(value)
    except ValueError:
        raise DataFormatError(f"{where}: label {value!r} is not a number (problem_type regression)") from None
    if not math.isfinite(number):
        raise DataFormatError(f"{where}: label {value!r} is not a finite number")
    return number


# ------------------------------------------------------------------------------------------ records
def _parse_prompt(record: dict, index: int, source: str) -> Conversation:
    """formats.parse_record of the prompt-only record; its errors name the field 'prompt' for a prompt record."""
    try:
        return parse_record(record, index, source, require_reply=False)
    except DataFormatError as e:
        raise DataFormatError(str(e).replace(" conversations[0]", " prompt")) from None


def parse_cls_record(record: dict, index: int, source: str, spec: LabelSpec, default_prompt: str, *,
                     require_label: bool = True) -> Conversation:
    """One classification record (module docstring) as a prompt-only Conversation with `extra["target"]` (None for
    a record without `label` when not `require_label`: prediction)."""
    sample_id = record_id(record, index, source)
    where = f"{source}: sample {index} (id={sample_id!r})"
    if "labels" in record:
        raise DataFormatError(f"{where}: field 'labels' is reserved (the model's token labels); name the class "
                              "label 'label'")
    if "label" not in record and require_label:
        raise DataFormatError(f"{where}: missing field 'label'")
    target = parse_label(record["label"], spec, where) if "label" in record else None
    rest = {k: v for k, v in record.items() if k not in ("label", "prompt")}
    has_turns = "conversations" in record or "messages" in record
    if has_turns:
        if "prompt" in record:
            name = "conversations" if "conversations" in record else "messages"
            raise DataFormatError(f"{where}: both 'prompt' and {name!r}; a record gives its prompt in one of them")
        conv = parse_record(rest, index, source, require_reply=False)
        if conv.has_reply:
            raise DataFormatError(f"{where}: a classification record's conversation must end with the user turn "
                                  "(the label is the answer)")
    else:
        prompt = record.get("prompt")
        if prompt is None:
            prompt = default_prompt
        if not isinstance(prompt, str):
            raise DataFormatError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__}")
        conv = _parse_prompt({**rest, "conversations": [{"from": "human", "value": prompt}]}, index, source)
    clash = sorted(CLS_RESERVED_KEYS & conv.extra.keys())
    if clash:
        raise DataFormatError(f"{where}: field {clash[0]!r} would overwrite the Example's own {clash[0]!r}; "
                              "rename it in the data file")
    conv.extra[TARGET] = target
    return conv


def load_cls_records(path: str | Path, spec: LabelSpec, default_prompt: str = DEFAULT_PROMPT, *,
                     require_label: bool = True) -> list[Conversation]:
    """Every record of a classification file, validated up front (one user turn: media + prompt text, or a
    conversation ending with a user turn); `conv.extra["target"]` = parse_label(record["label"]), the record's
    other fields stay in `conv.extra` (they reach the batch as lists). `require_label=False` (prediction): a
    record without `label` gets target None."""
    return [parse_cls_record(r, i, str(path), spec, default_prompt, require_label=require_label)
            for i, r in enumerate(read_records(path))]


def label_counts(conversations: list[Conversation], spec: LabelSpec) -> list[int]:
    """single_label: samples per class; multi_label: positive samples per label (both of length num_labels)."""
    if spec.problem_type == "regression":
        raise ValueError("label_counts: a regression target has no classes to count")
    counts = [0] * spec.num_labels
    for conv in conversations:
        target = conv.extra[TARGET]
        if spec.problem_type == "single_label":
            counts[target] += 1
        else:
            for class_id, positive in enumerate(target):
                counts[class_id] += int(positive)
    return counts


def _fits(target, spec: LabelSpec) -> bool:
    """`target` has the type and range `parse_label` gives for `spec`."""
    if spec.problem_type == "single_label":
        return type(target) is int and 0 <= target < spec.num_labels
    if spec.problem_type == "multi_label":
        return isinstance(target, list) and len(target) == spec.num_labels and all(v in (0.0, 1.0) for v in target)
    return type(target) is float


# ------------------------------------------------------------------------------------------ dataset
class ClassificationDataset(SkippingDataset):
    """Classification records (a data file, or Conversations from `load_cls_records`), encoded on access
    (module docstring). An unusable sample (missing media, media beyond `max_seq_length`, a processor error) is
    replaced by the next one and listed in its `skipped`, as SFTDataset does."""

    def __init__(self, path_or_conversations: str | Path | list[Conversation], processor, media: MediaOptions, *,
                 spec: LabelSpec, max_seq_length: int, default_prompt: str = DEFAULT_PROMPT, image_folder=None,
                 system_prompt=None, thinking: str = "keep", source: str | None = None,
                 max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS):
        conversations, source = self._records(path_or_conversations,
                                              lambda path: load_cls_records(path, spec, default_prompt), source,
                                              "records")
        self.spec = spec
        self.conversations = [self._checked(c, i, source, spec) for i, c in enumerate(conversations)]
        self.path = source or self.conversations[0].source
        self._set_options(processor, media, max_seq_length=max_seq_length, image_folder=image_folder,
                          system_prompt=system_prompt, thinking=thinking, max_consecutive_skips=max_consecutive_skips)

    @staticmethod
    def _checked(conv: Conversation, position: int, source: str | None, spec: LabelSpec) -> Conversation:
        """`conv` with its source / index filled in; a reply, a missing target or one of another spec refused."""
        conv = located(conv, position, source)
        where = f"{conv.source}: sample {conv.index} (id={conv.sample_id!r})"
        if conv.has_reply:
            raise DataFormatError(f"{where}: a classification record's conversation must end with the user turn")
        if TARGET not in conv.extra:
            raise DataFormatError(f"{where}: no parsed 'target' (load classification records with load_cls_records)")
        if conv.extra[TARGET] is not None and not _fits(conv.extra[TARGET], spec):
            raise DataFormatError(f"{where}: target {conv.extra[TARGET]!r} is not a {spec.problem_type} target of "
                                  f"{spec.num_labels} labels (loaded with another LabelSpec?)")
        return check_reserved(conv)

    def encode(self, index: int) -> dict:
        conv = self.conversations[index]
        example = encode_unlabeled(conv, self.processor, self.media, image_folder=self.image_folder,
                                   system_prompt=self.system_prompt, thinking=self.thinking,
                                   add_generation_prompt=False, max_seq_length=self.max_seq_length)
        return example | conv.extra

    def targets(self) -> list:
        """Every sample's parsed target, in dataset order (for ClassBalancedSampler and class weights)."""
        return [conv.extra[TARGET] for conv in self.conversations]


# ------------------------------------------------------------------------------------------ batches
_TARGET_DTYPES = {"single_label": torch.int64, "multi_label": torch.float32, "regression": torch.float32}


class ClsCollator:
    """Picklable `collate_fn`: right-padded batches (attention_mask) or one packed row (position_ids (4, 1, L),
    no attention_mask), then `batch["target"]` as a tensor: int64 (N,) / float32 (N, C) / float32 (N,)."""

    def __init__(self, model_config, *, packing: bool, pad_token_id: int, problem_type: str):
        if problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
        self.packing, self.pad_token_id, self.problem_type = packing, pad_token_id, problem_type
        self.rope_index = RopeIndex(model_config) if packing else None

    def __call__(self, examples: list[dict]) -> dict:
        if self.packing:
            batch = pack_examples(examples, self.rope_index)
        else:
            batch = pad_collate(examples, self.pad_token_id)
        if any(t is None for t in batch[TARGET]):  # unlabelled records (prediction): no targets at all
            if not all(t is None for t in batch[TARGET]):
                raise DataFormatError("a batch mixes records with and without 'label': label every record or none")
            del batch[TARGET]
            return batch
        batch[TARGET] = torch.tensor(batch[TARGET], dtype=_TARGET_DTYPES[self.problem_type])
        return batch


class ClassBalancedSampler(Sampler[int]):
    """`len(targets)` indices per epoch, drawn with replacement, each with probability proportional to
    1 / (samples of its class), so every class is drawn about equally often. A multi_label sample counts as its
    rarest positive label; samples without any positive label form one more group of their own.

    Deterministic in (seed, epoch): every rank draws the same sequence (accelerate shards this sampler's batches
    across ranks). Call `set_epoch(epoch)` before each epoch, as with DistributedSampler; without it every epoch
    repeats epoch 0's draw.
    """

    def __init__(self, targets: list, seed: int = 0):
        if not targets:
            raise ValueError("ClassBalancedSampler needs at least one target")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in targets):
            groups = list(targets)
        elif all(isinstance(t, list) for t in targets):
            positives = Counter(i for t in targets for i, p in enumerate(t) if p)
            groups = [min((i for i, p in enumerate(t) if p), key=lambda i: (positives[i], i), default=-1)
                      for t in targets]
        else:
            raise ValueError("ClassBalancedSampler needs class targets (single_label ints or multi_label lists); "
                             "a regression target has no classes")
        counts = Counter(groups)
        self.weights = torch.tensor([1.0 / counts[g] for g in groups], dtype=torch.float64)
        self.groups = groups
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.multinomial(self.weights, len(self.weights), replacement=True, generator=generator).tolist())

    def __len__(self) -> int:
        return len(self.weights)
