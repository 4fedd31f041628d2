"""Typed configuration: nested dataclasses, loaded from YAML, overridden with dotted `key=value` pairs.

    cfg = load_config(SFTConfig, "recipes/configs/demo.yaml", ["optim.lr=1e-4", "train.max_steps=10"])

Unknown keys (with a did-you-mean), wrong types, non-finite numbers (nan, inf), values out of range, contradictory
or orphaned options (set but meaningless with the rest of the config) and missing folders (`data.image_folder`,
`train.resume`) raise `ValueError` naming the dotted field, in one line, before any model loads: the recipes
validate in `setup` (vltrain.run.parse_config). A missing data file is reported by `vltrain.run.open_run`, also
before the model loads (configs may name data files that are written later, e.g. by tests and the inspector).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


# --------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    # A hub id, a local folder, or `tiny:<model_type>` (a freshly initialised tiny model, offline).
    name_or_path: str = "tiny:qwen2_5_vl"
    # The dtype the weights load in (mixed precision comes from the accelerate config)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    # "auto" picks flash_attention_2 when flash-attn is installed, else sdpa.
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    trust_remote_code: bool = False  # run code shipped with the checkpoint (only for checkpoints you trust)
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, ~30% slower
    # With gradient_checkpointing: recompute only every n-th layer (1 = all), trading memory for speed.
    checkpoint_every_n_layers: int = 1
    # Kernels applied to the loaded instance (see vltrain.kernels); empty = the stock model.
    kernels: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.checkpoint_every_n_layers < 1:
            raise ValueError(f"model.checkpoint_every_n_layers must be >= 1, got {self.checkpoint_every_n_layers}")
        if self.checkpoint_every_n_layers != 1 and not self.gradient_checkpointing:
            raise ValueError("model.checkpoint_every_n_layers is set but model.gradient_checkpointing is false")


@dataclass
class MediaConfig:
    """Image/video sizing and frame sampling, with the upstream's meaning (see vltrain.data.media)."""

    image_min_pixels: int | None = None  # smallest image area in pixels after resizing (None: the processor's)
    image_max_pixels: int | None = None  # largest image area in pixels after resizing: bounds media tokens per image
    image_resized_width: int | None = None  # resize every image to exactly this width (with image_resized_height)
    image_resized_height: int | None = None  # resize every image to exactly this height (with image_resized_width)
    video_min_pixels: int | None = None  # smallest frame area in pixels after resizing
    video_max_pixels: int | None = None  # largest frame area in pixels after resizing: bounds media tokens per frame
    video_resized_width: int | None = None  # resize every frame to exactly this width (with video_resized_height)
    video_resized_height: int | None = None  # resize every frame to exactly this height (with video_resized_width)
    fps: float | None = None  # None and no nframes: 2 frames per second
    nframes: int | None = None  # take exactly this many frames per video (instead of fps)


@dataclass
class DataConfig(MediaConfig):
    # LLaVA JSON (a list) or JSONL; OpenAI-style `messages` records too. A list of files (each in any of these
    # formats) is read as one dataset, each sample keeping its own file and index in skip records and errors
    # (vltrain.data.mixture); a `synthetic:*` demo name stands alone.
    train_path: str | list[str] = ""
    # With a list of train files: one weight per file (need not sum to 1; 0 leaves a file out). Each epoch draws
    # as many samples as all files hold, file i round(w_i / sum(w) x that) of them: a file asked for more than it
    # has repeats (every record once before any twice), one asked for fewer gives a random subset, both drawn anew
    # every epoch from train.seed. None: the files are simply concatenated. Evaluation reads eval_path as it is.
    weights: list[float] | None = None
    eval_path: str | None = None  # held-out records in the same format (None: no evaluation)
    image_folder: str | None = None  # relative media paths are resolved against this folder
    # Longest example in tokens; longer text is cut (media never), the cut is counted and logged
    max_seq_length: int = 32768
    # Default system turn: literal text, or `builtin:think_answer` (vltrain.data.template.SYSTEM_PROMPTS);
    # None keeps the chat template's default.
    system_prompt: str | None = None
    num_workers: int = 2  # DataLoader worker processes that decode media and encode examples
    # On CUDA: batches in page-locked memory, copied to the GPU without the host waiting on the GPU (a
    # pageable copy synchronizes the stream: the host can no longer queue kernels ahead).
    pin_memory: bool = True
    # Pack each micro-batch into one row (vltrain.data.packing): no padding, attention within examples.
    packing: bool = False
    # Fill micro-batches up to this many tokens instead of train.micro_batch_size samples (None: off).
    max_tokens_per_batch: int | None = None
    # Samples that cannot be used are skipped and logged (file, index, id, reason); the run stops with an
    # error once the skipped samples exceed this fraction of the dataset.
    max_bad_fraction: float = 0.05
    # What happens to <think> blocks of thinking models (Qwen3-VL-Thinking, Qwen3.5): "keep" trains
    # them as text in every assistant turn; "off" trains non-thinking answers (the template's empty block).
    thinking: Literal["keep", "off"] = "keep"

    def train_paths(self) -> list[str]:
        """data.train_path as a list of files ([] when unset)."""
        from vltrain.data.mixture import train_files

        return train_files(self.train_path)

    def is_synthetic(self) -> bool:
        """data.train_path names a generated demo set (`synthetic:*`, vltrain.data.loader.resolve_synthetic_data)."""
        return isinstance(self.train_path, str) and self.train_path.startswith("synthetic:")

    def validate(self) -> None:
        from vltrain.data.mixture import check_mixture_config

        check_mixture_config(self.train_path, self.weights)
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < self.max_seq_length:
            raise ValueError(f"data.max_tokens_per_batch ({self.max_tokens_per_batch}) must be >= data.max_seq_length "
                             f"({self.max_seq_length}) so that every example fits in a micro-batch")
        if self.fps is not None and self.nframes is not None:
            raise ValueError("data.fps and data.nframes cannot both be set: choose one way to sample video frames")
        for name in ("image", "video"):
            lo, hi = getattr(self, f"{name}_min_pixels"), getattr(self, f"{name}_max_pixels")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"data.{name}_min_pixels ({lo}) is larger than data.{name}_max_pixels ({hi})")
            w, h = getattr(self, f"{name}_resized_width"), getattr(self, f"{name}_resized_height")
            if (w is None) != (h is None):
                raise ValueError(f"data.{name}_resized_width and data.{name}_resized_height must be set together")
        if self.max_seq_length < 16:
            raise ValueError(f"data.max_seq_length must be at least 16, got {self.max_seq_length}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.nframes is not None and self.nframes < 2:
            raise ValueError(f"data.nframes must be at least 2, got {self.nframes}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0: load in the main process), got {self.num_workers}")
        from vltrain.data.template import resolve_system_prompt

        resolve_system_prompt(self.system_prompt)  # an unknown builtin: name fails here


@dataclass
class TrainableConfig:
    freeze_vision_tower: bool = False  # do not train the vision encoder blocks
    freeze_merger: bool = False  # do not train the vision-to-LLM merger (projector)
    freeze_llm: bool = False  # do not train the language model (LoRA needs it: adapters train instead)
    unfreeze_topk_llm: int = 0  # with freeze_llm: train the top k decoder layers anyway
    unfreeze_topk_vision: int = 0  # with freeze_vision_tower: train the top k vision blocks anyway

    def validate(self) -> None:
        for name in ("unfreeze_topk_llm", "unfreeze_topk_vision"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainable.{name} must be >= 0 (a number of top layers), got {getattr(self, name)}")
        if self.unfreeze_topk_llm and not self.freeze_llm:
            raise ValueError("trainable.unfreeze_topk_llm needs trainable.freeze_llm=true (the LLM is already trained)")
        if self.unfreeze_topk_vision and not self.freeze_vision_tower:
            raise ValueError(
                "trainable.unfreeze_topk_vision needs trainable.freeze_vision_tower=true (the tower is already trained)"
            )


@dataclass
class LoraConfig:
    enabled: bool = False  # train low-rank adapters instead of the LLM's weights (peft)
    rank: int = 64  # adapter rank r
    alpha: int = 128  # adapter scaling: the update is scaled by alpha / rank
    dropout: float = 0.05  # dropout on the adapter input
    bias: Literal["none", "all", "lora_only"] = "none"  # which biases train with the adapters
    use_dora: bool = False  # weight-decomposed adapters (DoRA)
    vision_lora: bool = False  # add adapters to the vision blocks too
    vision_lora_merger: bool = False  # ... and to the merger
    namespan_exclude: list[str] = field(default_factory=list)  # module-name substrings to skip
    num_lora_modules: int = -1  # only the last N target modules (-1: all)
    moe_experts: bool = False  # adapters on fused expert weights (peft target_parameters)
    bits: Literal[16, 8, 4] = 16  # 4/8: QLoRA base weights via bitsandbytes
    merge_on_export: bool = False  # also write a merged full model next to the adapter

    def validate(self, trainable: "TrainableConfig") -> None:
        """Combinations that cannot mean what the user wants."""
        lora = self  # reads as the config section it is
        if not lora.enabled:
            for name in ("use_dora", "vision_lora", "vision_lora_merger", "moe_experts", "merge_on_export"):
                if getattr(lora, name):
                    raise ValueError(f"lora.{name}=true needs lora.enabled=true")
            defaults = LoraConfig()
            for name in ("rank", "alpha", "dropout", "bias", "namespan_exclude", "num_lora_modules"):
                if getattr(lora, name) != getattr(defaults, name):
                    raise ValueError(f"lora.{name}={getattr(lora, name)!r} only means something with lora.enabled=true "
                                     f"(set lora.enabled=true, or drop lora.{name})")
            if lora.bits != 16:
                raise ValueError(f"lora.bits={lora.bits} (QLoRA) needs lora.enabled=true")
            return
        if lora.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {lora.rank}")
        if lora.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0 (the update is scaled by alpha / rank), got {lora.alpha}")
        if not 0 <= lora.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {lora.dropout}")
        if lora.moe_experts and lora.dropout:
            raise ValueError("lora.moe_experts=true needs lora.dropout=0 (peft's adapters on fused expert weights "
                             "have no dropout)")
        if lora.moe_experts and lora.use_dora:
            raise ValueError("lora.moe_experts=true cannot be combined with lora.use_dora=true (peft has no DoRA for "
                             "fused expert weights)")
        if not trainable.freeze_llm:
            raise ValueError(
                "lora.enabled=true trains the LLM through adapters: set trainable.freeze_llm=true "
                "(trainable.unfreeze_topk_llm still trains the top layers fully)"
            )
        if lora.vision_lora and not trainable.freeze_vision_tower:
            raise ValueError("lora.vision_lora=true needs trainable.freeze_vision_tower=true (adapters replace full "
                             "training)")
        if lora.vision_lora_merger and not lora.vision_lora:
            raise ValueError("lora.vision_lora_merger=true needs lora.vision_lora=true")
        if lora.vision_lora_merger and not trainable.freeze_merger:
            raise ValueError("lora.vision_lora_merger=true needs trainable.freeze_merger=true (adapters replace full "
                             "training)")
        if lora.bits != 16 and not (trainable.freeze_llm and trainable.unfreeze_topk_llm == 0):
            raise ValueError("lora.bits=4/8 quantizes the LLM: trainable.unfreeze_topk_llm must be 0 (4/8-bit weights "
                             "cannot train)")


@dataclass
class OptimConfig:
    lr: float = 1e-5  # the language model's learning rate
    vision_lr: float | None = None  # None: same as lr
    merger_lr: float | None = None  # None: same as lr
    head_lr: float | None = None  # a classifier's head (recipes/cls.py only); None: same as lr
    weight_decay: float = 0.0  # AdamW weight decay (never on norms, biases and embeddings)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # 0 disables clipping
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # learning-rate schedule after warm-up
    warmup_ratio: float = 0.03  # fraction of the steps with a linear warm-up from 0
    warmup_steps: int | None = None  # overrides warmup_ratio
    min_lr_ratio: float = 0.0  # the schedule ends at lr x this
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"  # adamw_8bit: bitsandbytes' 8-bit AdamW states

    def validate(self) -> None:
        for name in ("lr", "vision_lr", "merger_lr", "head_lr"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm < 0:
            raise ValueError(f"optim.max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise ValueError(f"optim.betas[{i}] must be in [0, 1), got {beta}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.min_lr_ratio and self.scheduler == "constant":
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} is where a decay ends, but "
                             "optim.scheduler=constant does not decay: drop it or choose cosine / linear")


@dataclass
class TrainConfig:
    output_dir: str = "outputs/sft"  # config.yaml, checkpoints/, final/, metrics.jsonl, plots.png and logs go here
    seed: int = 42  # seeds model init (tiny models), data order and sampling
    num_epochs: float = 1.0  # passes over the training data (max_steps > 0 takes precedence)
    max_steps: int = -1  # > 0 overrides num_epochs; -1: train for num_epochs
    micro_batch_size: int = 1  # examples per forward pass on each process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    log_every: int = 1  # optimizer steps between log lines (and tracker / metrics.jsonl records)
    eval_every: int = 0  # optimizer steps; 0: only at the end (when there is eval data)
    save_every: int = 0  # optimizer steps; 0: no intermediate checkpoints
    save_total_limit: int = 2  # checkpoints kept (older ones are deleted); 0 or less: keep every checkpoint
    # Tracker for the metrics; tensorboard writes under output_dir/<run_name> (tensorboard --logdir OUTPUT_DIR)
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    run_name: str | None = None  # the tracker's run name (None: the recipe's name)
    resume: str | None = None  # "auto" or a checkpoint folder (checked when the config loads)
    eval_exact_match: int = 0  # after training: exact-match accuracy of greedy answers on this many eval samples
    # A step whose loss or gradient norm is not finite is skipped (no update); this many in a row stop the run.
    max_bad_steps: int = 5

    def validate(self) -> None:
        if self.micro_batch_size < 1:
            raise ValueError(f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"train.gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.max_bad_steps < 1:
            raise ValueError(f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.max_steps < 1 and self.max_steps != -1:
            raise ValueError(f"train.max_steps must be > 0, or -1 to train for train.num_epochs, got {self.max_steps}")
        if self.num_epochs < 0:
            raise ValueError(f"train.num_epochs must be >= 0, got {self.num_epochs}")
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise ValueError(f"train.num_epochs={self.num_epochs:g} with train.max_steps={self.max_steps} trains "
                             "nothing: set train.max_steps > 0 or train.num_epochs > 0")
        if self.log_every < 1:
            raise ValueError(f"train.log_every must be >= 1, got {self.log_every}")
        for name, zero in (("eval_every", "only at the end"), ("save_every", "no intermediate checkpoints"),
                           ("eval_exact_match", "off")):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0 (0: {zero}), got {getattr(self, name)}")
        if self.run_name is not None and self.report_to == "none":
            raise ValueError(f"train.run_name={self.run_name!r} names a tracker run, but train.report_to=none "
                             "starts no tracker: drop it or set train.report_to")
        if self.resume is not None and self.resume != "auto":
            check_resume_folder(self.resume)


CHECKPOINT_COMPLETE = "COMPLETE"  # the marker a checkpoint writes last (vltrain.checkpoint imports it as COMPLETE)


def check_resume_folder(resume: str) -> None:
    """ValueError naming `train.resume` when the folder is missing or not a complete checkpoint: at config load
    (TrainConfig.validate) and again in vltrain.checkpoint.resolve_resume, after the model is built."""
    path = Path(resume)
    if not path.exists():
        raise ValueError(f"train.resume={resume!r}: no such folder (give a checkpoint folder, "
                         "<train.output_dir>/checkpoints/step_N, or 'auto')")
    if not (path / CHECKPOINT_COMPLETE).is_file():
        hint = " (that is the checkpoints folder: pick one step_N in it, or use 'auto')" if (
            path.is_dir() and any(path.glob("step_*"))) else ""
        raise ValueError(f"train.resume={resume!r} is not a complete checkpoint (no {CHECKPOINT_COMPLETE} "
                         f"marker){hint}")


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")  # media paths under a URL folder are fetched (vltrain.data.media)


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        for section in (self.model, self.data, self.trainable, self.optim, self.train):
            section.validate()
        self.lora.validate(self.trainable)
        trainable, lora = self.trainable, self.lora
        all_frozen = trainable.freeze_vision_tower and trainable.freeze_merger and trainable.freeze_llm
        unfrozen = trainable.unfreeze_topk_llm or trainable.unfreeze_topk_vision
        if all_frozen and not unfrozen and not lora.enabled and not hasattr(self, "cls"):  # a classifier: its head
            raise ValueError("trainable.freeze_vision_tower, trainable.freeze_merger and trainable.freeze_llm are all "
                             "true, with no trainable.unfreeze_topk_* and no lora.enabled: nothing to train")
        vision_trains = not trainable.freeze_vision_tower or trainable.unfreeze_topk_vision or lora.vision_lora
        if self.optim.vision_lr is not None and not vision_trains:
            raise ValueError(f"optim.vision_lr={self.optim.vision_lr:g} is set but nothing in the vision tower trains "
                             "(trainable.freeze_vision_tower=true, no trainable.unfreeze_topk_vision, no "
                             "lora.vision_lora): drop it")
        if self.optim.merger_lr is not None and trainable.freeze_merger and not lora.vision_lora_merger:
            raise ValueError(f"optim.merger_lr={self.optim.merger_lr:g} is set but the merger does not train "
                             "(trainable.freeze_merger=true, no lora.vision_lora_merger): drop it")
        from vltrain.data.mixture import check_weights_match_files

        check_weights_match_files(self.data.train_path, self.data.weights)
        synthetic = self.data.is_synthetic()  # the demo generates its eval split
        for name in ("eval_every", "eval_exact_match"):
            if getattr(self.train, name) and not (self.data.eval_path or synthetic):
                raise ValueError(f"train.{name}={getattr(self.train, name)} needs data.eval_path (there is nothing to "
                                 "evaluate on)")
        if not self.data.train_path and not self.model.name_or_path.startswith("tiny:"):
            raise ValueError("data.train_path is required")
        if self.optim.head_lr is not None and not hasattr(self, "cls"):
            raise ValueError("optim.head_lr is the learning rate of a classifier's head (recipes/cls.py); this model "
                             "has none")
        # a synthetic:* demo writes its data (and points data.image_folder at it) when the run opens
        folder = self.data.image_folder
        if folder and not synthetic and not _URL.match(folder) and not Path(folder).is_dir():
            what = "is a file, not a folder" if Path(folder).exists() else "does not exist"
            raise ValueError(f"data.image_folder={folder!r} {what} (relative media paths are resolved against it; "
                             "data.image_folder=null when the records give absolute paths)")


@dataclass
class DPOSection:
    """Preference-loss options (vltrain.preference): `loss_type` names one loss or several, combined with
    `loss_weights` (default 1.0 each), e.g. loss_type: [sigmoid, sft], loss_weights: [1.0, 0.2]."""

    # One preference loss or several (vltrain.preference.LossType)
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None  # weight of each loss_type (None: 1.0 each)
    beta: float = 0.1  # the implicit reward's temperature (higher: stay closer to the reference)
    label_smoothing: float = 0.0  # conservative DPO (sigmoid) / robust DPO (robust)
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    # One pass of the reference over every train / eval pair before training, cached on disk (keyed by the
    # data file, model, media and template options) and reused by later runs; the reference is then freed.
    precompute_ref_log_probs: bool = False
    ref_cache_dir: str | None = None  # None: <train.output_dir>/ref_logps
    # Run this SFT config first (`recipes/sft.py NAME`) when model.name_or_path does not exist yet; its
    # export must be model.name_or_path (the demo: SFT teaches one behaviour, DPO another).
    init_from_sft: str | None = None
    # After training: greedy answers to this many held-out prompts, counted as the chosen / rejected reply
    # (exact match, stripped) -- the demo's before/after check; 0 = off. Needs data.eval_path.
    eval_generations: int = 0

    def validate(self) -> None:
        from vltrain.preference import validate_loss_options

        validate_loss_options(self.loss_type, self.loss_weights, beta=self.beta, label_smoothing=self.label_smoothing,
                              simpo_gamma=self.simpo_gamma, simpo_gamma_default=DPOSection.simpo_gamma)
        if self.eval_generations < 0:
            raise ValueError(f"dpo.eval_generations must be >= 0, got {self.eval_generations}")
        if self.ref_cache_dir is not None and not self.precompute_ref_log_probs:
            raise ValueError("dpo.ref_cache_dir is set but dpo.precompute_ref_log_probs is false")


@dataclass
class DPOConfig(SFTConfig):
    """SFT's sections (model, data, trainable, lora, optim, train: same meaning) plus `dpo`."""

    dpo: DPOSection = field(default_factory=DPOSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="outputs/dpo"))

    def validate(self) -> None:
        super().validate()
        self.dpo.validate()
        if self.train.eval_exact_match:
            raise ValueError("train.eval_exact_match is an SFT option; DPO's generation check is dpo.eval_generations")
        if self.dpo.eval_generations and not (self.data.eval_path or self.data.is_synthetic()):
            raise ValueError("dpo.eval_generations needs data.eval_path (held-out pairs to answer)")
        from vltrain.preference import needs_reference

        if self.dpo.precompute_ref_log_probs and not needs_reference(self.dpo.loss_type):
            raise ValueError(f"dpo.precompute_ref_log_probs=true but dpo.loss_type={self.dpo.loss_type} is "
                             "reference-free (sft, simpo and orpo read no reference log-probs): drop it")
        if self.dpo.precompute_ref_log_probs and self.data.weights is not None:
            raise ValueError("dpo.precompute_ref_log_probs scores the pairs of one epoch's draw, which data.weights "
                             "may leave some pairs out of: drop data.weights (the files are then concatenated)")


@dataclass
class GRPOSection:
    """Rollouts, rewards and the policy loss of GRPO and its variants (vltrain.policy_gradient, vltrain.rewards)."""

    num_generations: int = 8  # completions per prompt (a group)
    max_completion_length: int = 256  # longest completion in tokens (cut completions finish with 'length')
    max_prompt_length: int | None = None  # None: data.max_seq_length; a longer prompt is skipped (media never cut)
    temperature: float = 1.0  # rollout sampling temperature (> 0)
    top_p: float = 1.0  # rollout nucleus sampling (1 = off)
    top_k: int = 0  # rollout top-k sampling (0 = off)
    min_p: float = 0.0  # rollout min-p sampling (0 = off)
    repetition_penalty: float = 1.0  # rollout repetition penalty (1 = off)
    generation_batch_size: int = 8  # prompts per generate call (x num_generations rows)
    # Reward functions: "path/file.py:function", "path/file.py" (its REWARDS list, or every *_reward function),
    # "builtin:accuracy", "builtin:format"; weighted by reward_weights (default 1.0 each).
    rewards: list[str] = field(default_factory=lambda: ["builtin:accuracy", "builtin:format"])
    reward_weights: list[float] | None = None  # weight of each reward (None: 1.0 each)
    # Seconds one call of a reward may take before the run stops with an error naming it (None or 0: no limit);
    # with a limit a sync reward from a file runs in a worker thread (vltrain.rewards says what that means).
    reward_timeout: float | None = 60.0
    # Divide advantages by the reward std of the group, the batch, or not at all
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # How token losses are averaged (dapo: over all tokens of the batch)
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence = GSPO
    epsilon: float = 0.2  # PPO clipping range of the importance ratio
    epsilon_high: float | None = None  # None: epsilon
    beta: float = 0.0  # KL to the reference; 0 loads no reference
    num_iterations: int = 1  # optimizer steps per rollout batch
    mask_truncated_completions: bool = False  # completions cut at max_completion_length get no gradient
    log_completions: int = 4  # prompts (with their completions and rewards) written to completions.jsonl per log
    # Held-out mean reward of greedy answers to this many eval prompts, before and after training; 0 = off.
    eval_prompts: int = 0
    init_from_sft: str | None = None  # as dpo.init_from_sft: an SFT config run first when the model is missing

    def validate(self) -> None:
        positive = ("num_generations", "max_completion_length", "generation_batch_size", "num_iterations")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"grpo.max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if not 0 < self.temperature:
            raise ValueError(f"grpo.temperature must be > 0 (rollouts sample), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"grpo.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"grpo.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"grpo.min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"grpo.repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.num_generations < 2:
            raise ValueError("grpo.num_generations must be >= 2: group-normalised advantages need a group")
        if self.epsilon < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError("grpo.epsilon and grpo.epsilon_high must be >= 0")
        # cispo has no lower clip (epsilon is unused there): only the clipped surrogates compare the two
        if self.epsilon_high is not None and self.epsilon_high < self.epsilon and self.loss_type != "cispo":
            raise ValueError(f"grpo.epsilon_high={self.epsilon_high} is below grpo.epsilon={self.epsilon}: the upper "
                             "clip (clip-higher, DAPO) must be >= the lower one (None: the same)")
        if self.beta < 0:
            raise ValueError(f"grpo.beta must be >= 0, got {self.beta}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"grpo.reward_weights has {len(self.reward_weights)} values for {len(self.rewards)} "
                             "grpo.rewards")
        if self.eval_prompts < 0 or self.log_completions < 0:
            raise ValueError("grpo.eval_prompts and grpo.log_completions must be >= 0")
        if self.reward_timeout is not None and not self.reward_timeout >= 0:
            raise ValueError(f"grpo.reward_timeout must be >= 0 seconds (0 or None: no limit), got "
                             f"{self.reward_timeout}")


@dataclass
class GRPOConfig(SFTConfig):
    """SFT's sections (same meaning) plus `grpo`; train.micro_batch_size counts prompts (each with
    grpo.num_generations completions)."""

    grpo: GRPOSection = field(default_factory=GRPOSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="outputs/grpo"))

    def validate(self) -> None:
        super().validate()
        self.grpo.validate()
        if self.train.eval_exact_match:
            raise ValueError("train.eval_exact_match is an SFT option; GRPO's generation check is grpo.eval_prompts")
        if self.data.max_tokens_per_batch is not None:
            raise ValueError("data.max_tokens_per_batch is not supported by GRPO: its batches are prompts "
                             "(train.micro_batch_size) whose completions are generated")
        if self.train.save_every % self.grpo.num_iterations:
            raise ValueError(f"train.save_every ({self.train.save_every}) must be a multiple of grpo.num_iterations "
                             f"({self.grpo.num_iterations}): checkpoints are written between rollout batches")
        if self.grpo.eval_prompts and not (self.data.eval_path or self.data.is_synthetic()):
            raise ValueError("grpo.eval_prompts needs data.eval_path (held-out prompts)")


@dataclass
class CLSSection:
    """A classification head on the model (vltrain.classifier) and its loss (vltrain.classification)."""

    num_labels: int | None = None  # None: len(classes) (regression: 1)
    classes: list[str] | None = None  # class names by id: records may give names instead of ids
    # One class per sample, several, or a number
    problem_type: Literal["single_label", "multi_label", "regression"] = "single_label"
    # None: cross_entropy (single_label), bce (multi_label), mse (regression); or focal_loss,
    # class_balanced_cross_entropy, class_balanced_focal_loss (single_label)
    loss_type: str | None = None
    label_smoothing: float = 0.0  # cross_entropy / class_balanced_cross_entropy
    focal_alpha: list[float] | None = None  # focal_loss: one weight per class (None: 1 each)
    focal_gamma: float = 2.0  # focal losses: the focusing exponent (0 = cross-entropy)
    class_balanced_beta: float = 0.999  # class-balanced losses: effective-number beta (Cui et al. 2019)
    mlp_head_dim: int = 0  # 0: a linear head; > 0: a 2-layer MLP head with this hidden size
    mlp_head_dropout: float = 0.0  # the MLP head's dropout
    prompt: str = "What is in the image?"  # the user message of records without a `prompt` field
    balanced_sampler: bool = False  # draw training samples so that every class comes up about equally often
    # Evaluation: every train.eval_every steps (and at the end); the best evaluation by `metric_for_best` is kept
    # (exported as final/) and stops training after `early_stopping_patience` evaluations without an
    # improvement larger than `early_stopping_threshold` (0 = never stop early).
    metric_for_best: str = "loss"
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement (0 = never)
    early_stopping_threshold: float = 0.01  # smallest change of metric_for_best that counts as an improvement

    def validate(self) -> None:
        from vltrain.classification import LOSSES_FOR

        if self.classes is not None:
            if len(set(self.classes)) != len(self.classes) or not self.classes:
                raise ValueError(f"cls.classes must be distinct names, got {self.classes}")
            if self.num_labels is None:
                self.num_labels = len(self.classes)
            elif self.num_labels != len(self.classes):
                raise ValueError(f"cls.num_labels={self.num_labels} but cls.classes names {len(self.classes)} classes")
        if self.num_labels is None:
            if self.problem_type != "regression":
                raise ValueError("set cls.num_labels (the upstream's --num_labels) or cls.classes")
            self.num_labels = 1
        if self.problem_type == "regression" and self.num_labels != 1:
            raise ValueError(f"cls.problem_type=regression predicts one number: cls.num_labels must be 1, got "
                             f"{self.num_labels}")
        if self.problem_type != "regression" and self.num_labels < 2:
            raise ValueError(f"cls.num_labels must be >= 2 for {self.problem_type}, got {self.num_labels}")
        allowed = LOSSES_FOR[self.problem_type]
        if self.loss_type is None:
            self.loss_type = allowed[0]
        if self.loss_type not in allowed:
            raise ValueError(f"cls.loss_type={self.loss_type!r} does not fit cls.problem_type={self.problem_type}: "
                             f"choose one of {', '.join(allowed)}")
        defaults = CLSSection()
        orphans = {"label_smoothing": ("cross_entropy", "class_balanced_cross_entropy"), "focal_alpha": ("focal_loss",),
                   "focal_gamma": ("focal_loss", "class_balanced_focal_loss"),
                   "class_balanced_beta": ("class_balanced_cross_entropy", "class_balanced_focal_loss")}
        for name, losses in orphans.items():
            if getattr(self, name) != getattr(defaults, name) and self.loss_type not in losses:
                raise ValueError(f"cls.{name} only applies to cls.loss_type {' / '.join(losses)}, not {self.loss_type}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"cls.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.focal_alpha is not None and len(self.focal_alpha) != self.num_labels:
            raise ValueError(f"cls.focal_alpha has {len(self.focal_alpha)} values for {self.num_labels} classes")
        for i, alpha in enumerate(self.focal_alpha or []):
            if not alpha >= 0:  # a negative weight trains that class's loss upwards
                raise ValueError(f"cls.focal_alpha[{i}] must be >= 0 (a class weight), got {alpha}")
        if not self.focal_gamma >= 0:
            raise ValueError(f"cls.focal_gamma must be >= 0, got {self.focal_gamma}")
        if not 0 <= self.class_balanced_beta < 1:
            raise ValueError(f"cls.class_balanced_beta must be in [0, 1), got {self.class_balanced_beta}")
        if self.mlp_head_dim < 0 or not 0 <= self.mlp_head_dropout < 1:
            raise ValueError("cls.mlp_head_dim must be >= 0 and cls.mlp_head_dropout in [0, 1)")
        if self.mlp_head_dropout and not self.mlp_head_dim:
            raise ValueError("cls.mlp_head_dropout needs cls.mlp_head_dim > 0 (a linear head has no dropout)")
        if self.balanced_sampler and self.problem_type == "regression":
            raise ValueError("cls.balanced_sampler needs classes: it does not apply to regression")
        metrics = CLS_METRICS[self.problem_type]
        if self.metric_for_best not in metrics:
            raise ValueError(f"cls.metric_for_best={self.metric_for_best!r}: for {self.problem_type} choose one of "
                             f"{', '.join(metrics)}")
        if self.early_stopping_patience < 0 or self.early_stopping_threshold < 0:
            raise ValueError("cls.early_stopping_patience and cls.early_stopping_threshold must be >= 0")
        if self.early_stopping_threshold != defaults.early_stopping_threshold and not self.early_stopping_patience:
            raise ValueError(f"cls.early_stopping_threshold={self.early_stopping_threshold} only means something with "
                             "cls.early_stopping_patience > 0 (early stopping is off): set both, or drop it")


CLS_METRICS = {"single_label": ("loss", "accuracy", "macro_f1", "macro_precision", "macro_recall", "auroc"),
               "multi_label": ("loss", "accuracy", "macro_f1", "micro_f1", "macro_precision", "macro_recall", "auroc"),
               "regression": ("loss", "mse", "mae", "r2")}


@dataclass
class CLSConfig(SFTConfig):
    """SFT's sections (same meaning; optim.head_lr for the head) plus `cls`."""

    cls: CLSSection = field(default_factory=CLSSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="outputs/cls"))

    def validate(self) -> None:
        super().validate()
        self.cls.validate()
        if self.train.eval_exact_match:
            raise ValueError("train.eval_exact_match is an SFT option; classification reports accuracy and F1 on "
                             "data.eval_path")
        has_eval = bool(self.data.eval_path or self.data.is_synthetic())  # the synthetic demo writes its eval split
        if self.cls.metric_for_best != "loss" and not has_eval:
            raise ValueError(f"cls.metric_for_best={self.cls.metric_for_best} picks the best evaluation, but without "
                             "data.eval_path there is none: set data.eval_path, or drop it")
        if self.cls.early_stopping_patience and not (self.train.eval_every and has_eval):
            raise ValueError("cls.early_stopping_patience needs evaluations: set data.eval_path and train.eval_every")
        if self.cls.balanced_sampler and self.data.max_tokens_per_batch is not None:
            raise ValueError("cls.balanced_sampler cannot be combined with data.max_tokens_per_batch (both choose the "
                             "batches)")
        if self.cls.balanced_sampler and self.data.weights is not None:
            raise ValueError("cls.balanced_sampler cannot be combined with data.weights (both choose the samples)")


# --------------------------------------------------------------------------------------- loading
def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML / CLI value to the annotated type, or raise naming the field."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ValueError(f"{name} must be one of {list(args)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        item_types = args if fixed else (args[0] if args else Any,) * len(value)
        if origin is tuple and len(item_types) != len(value):
            raise ValueError(f"{name} must have {len(item_types)} items, got {value!r}")
        items = [_coerce(v, t, f"{name}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return _build(tp, value, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value) if tp is float else value
            if tp is int:
                number = int(value) if isinstance(value, int) or str(value).lstrip("-").isdigit() else None
                if number is None:
                    # accept "1e4" / 1e4.0 for integers when it is integral
                    as_float = float(value)
                    if not as_float.is_integer():
                        raise ValueError
                    number = int(as_float)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} must be {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is float and not math.isfinite(number):  # no field means anything by nan or inf (None is "no limit")
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


# Upstream and HF Trainer / peft names of fields that are spelled differently here (README's tables)
UPSTREAM_NAMES = {
    "model_id": "model.name_or_path", "model_name_or_path": "model.name_or_path",
    "disable_flash_attn2": "model.attn_implementation", "use_liger": "model.kernels",
    "data_path": "data.train_path", "dataloader_num_workers": "data.num_workers",
    "dataloader_pin_memory": "data.pin_memory",
    "num_train_epochs": "train.num_epochs", "per_device_train_batch_size": "train.micro_batch_size",
    "logging_steps": "train.log_every", "save_steps": "train.save_every",
    "eval_steps": "train.eval_every", "resume_from_checkpoint": "train.resume", "max_train_steps": "train.max_steps",
    "learning_rate": "optim.lr", "lr_scheduler_type": "optim.scheduler", "adam_epsilon": "optim.eps",
    "adam_beta1": "optim.betas", "adam_beta2": "optim.betas",
    "lora_enable": "lora.enabled", "lora_rank": "lora.rank", "lora_r": "lora.rank", "r": "lora.rank",
    "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "lora_bias": "lora.bias",
    "lora_namespan_exclude": "lora.namespan_exclude",
}


def _all_fields() -> set[str]:
    """Every `section.field` of the four whole configs."""
    names = set()
    for root in (SFTConfig, DPOConfig, GRPOConfig, CLSConfig):
        for section, tp in typing.get_type_hints(root).items():
            names |= {f"{section}.{f.name}" for f in dataclasses.fields(tp)}
    return names


def _did_you_mean(key: str, known: set[str], prefix: str, section_like: bool = False) -> str:
    """'; did you mean 'x.y'?' for a mistyped field: an upstream name, the name of a field of exactly one other
    section (`train.lr` -> `optim.lr`), or a close spelling in the same section (difflib); else ''. A key holding a
    mapping (`section_like`) is a mistyped section: only spellings are compared."""
    section = f"{prefix}." if prefix else ""
    if key in UPSTREAM_NAMES and not section_like:
        return f"; did you mean {UPSTREAM_NAMES[key]!r}?"
    if "." not in prefix and not section_like:  # the top level or a section: the exact name in another section
        elsewhere = {dotted for dotted in _all_fields() if dotted.split(".", 1)[1] == key}
        if len(elsewhere) == 1:
            return f"; did you mean {elsewhere.pop()!r}?"
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {section + close[0]!r}?" if close else ""


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else key
            hint = _did_you_mean(str(key), known, prefix, section_like=isinstance(values[key], dict))
            raise ValueError(f"unknown config field {where!r}{hint}; known fields here: {sorted(known)}")
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def from_dict(cls, values: dict, prefix: str = ""):
    """One config dataclass (a whole config or a section such as DataConfig) from plain values, validated."""
    cfg = _build(cls, values, prefix)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Build `cls` from a YAML file (optional) plus `key.sub=value` overrides, then validate it."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            raise ValueError(f"config file {where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(tree, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level")
    for item in overrides or []:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key, raw)
    cfg = _build(cls, tree)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg, path: str | Path) -> None:
    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, list):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    Path(path).write_text(yaml.safe_dump(plain(config_to_dict(cfg)), sort_keys=False))


# --------------------------------------------------------------------------------------- --help
def _field_comments(cls) -> dict[str, str]:
    """{field: its comment}: the comment at the end of the field's line, else the comment lines right above it;
    a section's docstring-less fields inherit nothing (every field carries its own comment, tested)."""
    import inspect

    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        above: list[str] = []
        for line in inspect.getsource(klass).splitlines()[1:]:
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("#").strip())
                continue
            name = stripped.split(":", 1)[0].strip()
            if ":" in stripped and name.isidentifier() and not stripped.startswith(("def ", "class ", '"""')):
                trailing = stripped.split("  # ", 1)[1].strip() if "  # " in stripped else ""
                text = trailing or " ".join(above)
                if text:
                    comments[name] = text
            above = []
    return comments


def _type_name(tp) -> str:
    text = str(tp) if not isinstance(tp, type) else tp.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def field_help(cls) -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, meaning) of every field of a whole config class (SFTConfig, DPOConfig, ...)."""
    rows = []
    defaults = cls()
    for section in dataclasses.fields(cls):
        sub = getattr(defaults, section.name)
        hints = typing.get_type_hints(type(sub))
        comments = _field_comments(type(sub))
        for f in dataclasses.fields(sub):
            rows.append((f"{section.name}.{f.name}", _type_name(hints[f.name]), repr(getattr(sub, f.name)),
                         comments.get(f.name, "")))
    return rows


def config_help(cls) -> str:
    """The `--help` text of a recipe: every config field with its type, default and meaning, section by section."""
    lines, current = [], None
    for name, tp, default, meaning in field_help(cls):
        section = name.split(".", 1)[0]
        if section != current:
            lines.append(f"\n{section}:")
            current = section
        lines.append(f"  {name} ({tp}, default {default})" + (f"\n      {meaning}" if meaning else ""))
    return "\n".join(lines).lstrip("\n")
