"""DPO throughput / memory: vltrain against TRL's DPOTrainer, same architecture, pairs and card, one process.

    python benchmarks/bench_dpo.py --preset qwen2_5_vl_3b --runs trl:full,vltrain:full,trl:lora,vltrain:lora \
        --pairs 16 --steps 3 --warmup 1 --out results.json
    python benchmarks/bench_dpo.py --preset tiny_qwen2_5_vl --pairs 4 --steps 1 --warmup 1    # CPU smoke test (fp32)

The architecture is a preset of benchmarks/bench_sft.py (published config.json values, random init, bf16,
sdpa) with the special-token ids of vltrain's offline tiny tokenizer (there is no model hub and no Qwen
tokenizer here): vocab size, embeddings, LM head and every other dimension stay the preset's. The model
and processor are written once with `save_pretrained` to a work folder; both tools load that folder (TRL
builds its reference model from the policy's path, so a config-only model does not work for it).

Data: `--pairs` seeded synthetic pairs, each with one random-noise PNG of one of several sizes, a prompt of
50-300 words and chosen / rejected answers of 50-400 words each (words from the tiny tokenizer's corpus,
about one token each; the tiny preset: 10-40 and 10-60 words, smaller images). vltrain reads them as an upstream-format DPO JSON file (vltrain.data.pairs); TRL gets
the same records as a `datasets.Dataset` in its conversational vision format ("images": [PIL image],
"prompt": [user message], "chosen" / "rejected": [assistant message]). One optimizer step = every pair once
(gradient accumulation over micro-batches) for both tools; sigmoid DPO, beta 0.1, lr 1e-5, torch AdamW
(fused on CUDA), gradient clipping at 1.0.

Runs (`--runs`, comma-separated `tool:mode[:gcN]`):
- trl:      `trl.DPOTrainer`, `--trl_micro_batch` pairs per micro-batch (its collator: 2 x pairs padded
            rows, every image twice in one vision call), bf16 autocast, its own fused LM-head log-probs.
- vltrain:  PairDataset + PairCollator packed into one row per micro-batch filled to `--token_budget`
            tokens (each image's pixels once), kernels "all", `loops.dpo.dpo_loss`, reference from
            `vltrain.build.build_reference` (frozen copy; LoRA: the policy with adapters off).
Modes: full (everything trains) or lora (r64 / alpha 128 / dropout 0.05 on the LLM linears, the rest
frozen; TRL runs with `disable_dropout=False` so that its LoRA dropout is the same 0.05, not zeroed).
`gc1` (default) is non-reentrant gradient checkpointing on every layer, `gc0` off.

Reported per run (one table line, and every field in `--out` JSON):
- pairs/s and real tokens/s over the median timed step (`step_s`: GPU-synchronised, from the start of the
  step's first micro-batch to the end of its optimizer step; the step's micro-batches are collated before
  that for both tools, as transformers' Trainer prefetches them), and `wall_pairs_per_s` from step end to
  step end (data loading included). Real tokens: chosen + rejected sequences including the prompt, each
  sequence once, counted by one tool-neutral tokenisation (the same figure for both tools); also each tool's
  own count of the non-pad tokens in the batches it built (`tool_tokens`; TRL's from the attention masks its
  policy forwards get) and of their padded size (`tool_padded_tokens`).
- MFU against the bf16 matmul ceiling measured in this run, from bench_sft's `model_flops` (its FLOP
  accounting: 6 x params x tokens for trained linears, 4 x for frozen ones under LoRA, attention terms,
  recomputation not counted) applied to the USEFUL work of DPO: the policy's forward + backward over both
  sequences of every pair with the pair's image encoded once, plus the reference's forward (a third of a
  full-mode forward + backward) over the same. The same FLOP figure for both tools, so MFU ratios are
  throughput ratios; the vision work a tool repeats is reported separately:
- vision-tower work per pair of the first timed step: calls, and the images and patches of the data that
  reach the tower (forward hooks on every vision tower -- policy and reference together); the one-token
  dummy video vltrain runs for image-only batches (so every rank runs both paths) is counted apart.
- peak memory (torch.cuda.max_memory_allocated, reset after the models are placed and before the first
  step), first-step loss (sigmoid DPO with policy == reference starts at log 2 = 0.693: a correctness check),
  or "OOM" (caught, memory freed, the next run goes on).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sft import PRESETS, matmul_ceiling, model_flops  # noqa: E402

# Image sizes (width, height), multiples of 28 (patch 14 x merge 2) so no tool resizes them.
IMAGE_SIZES = {
    "tiny": [(56, 56), (84, 56), (112, 84), (56, 112)],
    "real": [(224, 224), (336, 336), (448, 448), (672, 448), (896, 672)],
}
# Words per prompt and per answer (about one token each); the tiny preset's are short for the CPU smoke test.
TEXT_WORDS = {"tiny": ((10, 40), (10, 60)), "real": ((50, 300), (50, 400))}
LORA = dict(r=64, lora_alpha=128, lora_dropout=0.05)
LR, BETA, MAX_GRAD_NORM = 1e-5, 0.1, 1.0


# ----------------------------------------------------------------------------------- model + processor
def build_processor(preset: str):
    """vltrain's offline processor (Qwen chat template, tiny BPE); for a real preset its image processor keeps
    every benchmark image at its own size (no resize), and must match the preset's patching."""
    from vltrain.tiny import build_tiny_processor

    processor = build_tiny_processor("qwen2_5_vl")
    if not preset.startswith("tiny_"):
        vc = PRESETS[preset]["vision_config"]
        ip = processor.image_processor
        for name, want in (("patch_size", vc["patch_size"]), ("merge_size", vc["spatial_merge_size"]),
                           ("temporal_patch_size", vc["temporal_patch_size"])):
            setattr(ip, name, want)
        factor = vc["patch_size"] * vc["spatial_merge_size"]
        ip.size = {"shortest_edge": 4 * factor * factor, "longest_edge": 1280 * factor * factor}
    return processor


def build_config(preset: str, tokenizer):
    """The preset's config with the tiny tokenizer's special ids (vocab size and dimensions unchanged)."""
    from transformers import AutoConfig

    from vltrain.tiny import tiny_config

    if preset.startswith("tiny_"):
        config = tiny_config(preset[5:], tokenizer)
    else:
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
               ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<|im_end|>")}
        p = copy.deepcopy(PRESETS[preset])
        p["text_config"].update(pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], bos_token_id=None)
        config = AutoConfig.for_model(p.pop("model_type"), image_token_id=ids["<|image_pad|>"],
                                      video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                                      vision_end_token_id=ids["<|vision_end|>"], **p)
    config.use_cache = False
    return config


def check_patching(processor, config) -> None:
    ip, vc = processor.image_processor, config.vision_config
    got = (ip.patch_size, ip.merge_size, ip.temporal_patch_size)
    want = (vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size)
    assert got == want, f"image processor patching {got} != vision config {want}"


# ----------------------------------------------------------------------------------- synthetic pairs
def _words() -> list[str]:
    from vltrain.tiny import _CORPUS

    return sorted({w for w in re.findall(r"[A-Za-z]+", _CORPUS.lower()) if len(w) > 1})


def write_pairs(folder: Path, num_pairs: int, seed: int, sizes, words_per=TEXT_WORDS["real"]) -> list[dict]:
    """Upstream-format DPO records in `folder/pairs.json`, their images in `folder/images/`."""
    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    words = _words()
    (folder / "images").mkdir(parents=True, exist_ok=True)

    def text(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    records = []
    for i in range(num_pairs):
        width, height = sizes[i % len(sizes)]
        name = f"{i:04d}.png"
        Image.fromarray(np_rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / "images" / name)
        (prompt_lo, prompt_hi), (answer_lo, answer_hi) = words_per
        chosen, rejected = text(answer_lo, answer_hi), text(answer_lo, answer_hi)
        records.append({"id": f"pair{i}", "image": name, "prompt": "<image>\n" + text(prompt_lo, prompt_hi),
                        "chosen": chosen, "rejected": rejected + (" no" if rejected == chosen else "")})
    (folder / "pairs.json").write_text(json.dumps(records, indent=1))
    return records


def conversational(record: dict) -> dict:
    """A record as TRL's conversational messages (its collator puts the image before the user text)."""
    prompt = record["prompt"].removeprefix("<image>\n")
    return {"prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": record["chosen"]}],
            "rejected": [{"role": "assistant", "content": record["rejected"]}]}


def trl_dataset(records: list[dict], image_folder: Path):
    from datasets import Dataset
    from PIL import Image

    rows = []
    for r in records:
        with Image.open(image_folder / r["image"]) as image:
            rows.append({"images": [image.convert("RGB")], **conversational(r)})
    return Dataset.from_list(rows)


def measure_pairs(records: list[dict], image_folder: Path, processor) -> list[dict]:
    """Tool-neutral sizes of every pair: [{"chosen": tokens, "rejected": tokens, "patches": P, "grid": (1, 3)}]
    from the processor run on the chat template of prompt + answer (the image's tokens included)."""
    from PIL import Image

    sizes = []
    for r in records:
        conv = conversational(r)
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": conv["prompt"][0]["content"]}]}
        with Image.open(image_folder / r["image"]) as image:
            image = image.convert("RGB")
            entry = {}
            for name in ("chosen", "rejected"):
                reply = {"role": "assistant", "content": [{"type": "text", "text": r[name]}]}
                text = processor.apply_chat_template([user, reply], tokenize=False)
                out = processor(text=[text], images=[image], return_tensors="pt")
                entry[name] = int(out["input_ids"].shape[1])
            entry["grid"] = out["image_grid_thw"]
            entry["patches"] = int(out["image_grid_thw"].prod())
        sizes.append(entry)
    return sizes


def useful_flops(model, pair_sizes: list[dict], lora: bool) -> float:
    """The step's useful FLOPs (module docstring): policy forward + backward, image once per pair, plus the
    reference forward, from bench_sft.model_flops on stand-in examples of the right sizes."""
    examples = []
    for p in pair_sizes:
        examples.append({"input_ids": torch.empty(p["chosen"]), "pixel_values": torch.empty(p["patches"], 0),
                         "image_grid_thw": p["grid"]})
        examples.append({"input_ids": torch.empty(p["rejected"])})
    return model_flops(model, examples, lora=lora) + model_flops(model, examples, lora=False) / 3


def write_checkpoint(preset: str, folder: Path, device, dtype, pair_sizes) -> dict:
    """Random-init model + processor saved to `folder`; returns the FLOPs of one step per mode."""
    from transformers import AutoModelForImageTextToText

    processor = build_processor(preset)
    config = build_config(preset, processor.tokenizer)
    check_patching(processor, config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    flops = {mode: useful_flops(model, pair_sizes, lora=mode == "lora") for mode in ("full", "lora")}
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return flops


# ----------------------------------------------------------------------------------- counters
def vision_towers(*models) -> list[torch.nn.Module]:
    """Every distinct vision tower module in `models` (peft-wrapped or not): a module named `*visual`."""
    towers, seen = [], set()
    for model in models:
        if model is None:
            continue
        for name, module in model.named_modules():
            if name.split(".")[-1] == "visual" and id(module) not in seen:
                seen.add(id(module))
                towers.append(module)
    if not towers:
        raise RuntimeError("no vision tower (a module named '*.visual') found")
    return towers


class WorkCounter:
    """Forward hooks counting, during one step, what reaches the vision towers and, given `policy`, the
    tokens its training forwards run (non-pad, and rows x length). Vision: calls (all, and those with the
    data's media), and the grid rows (images) and patches of the data's media; a one-merged-token grid
    (1, merge, merge) is counted apart as a dummy (vltrain.vision's dummy image / video for a batch without
    that modality; every benchmark image is larger). Counts stay tensors until `totals()`: the hooks add no
    host sync to the timed step."""

    def __init__(self, towers, merge_size: int, policy=None):
        self.dummy = [1, merge_size, merge_size]
        self.handles = [t.register_forward_hook(self._vision, with_kwargs=True) for t in towers]
        if policy is not None:
            self.handles.append(policy.register_forward_pre_hook(self._tokens, with_kwargs=True))
        self.reset()

    def reset(self):
        self.calls, self.grids, self.tokens, self.padded = 0, [], [], 0

    def _vision(self, module, args, kwargs, output):
        self.calls += 1
        self.grids.append(kwargs.get("grid_thw", args[1] if len(args) > 1 else None))

    def _tokens(self, module, args, kwargs):
        if not torch.is_grad_enabled():  # the reference's forward (TRL LoRA runs it through the same module)
            return
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if ids is None:
            return
        self.padded += ids.numel()
        self.tokens.append(mask.sum() if mask is not None else torch.tensor(ids.numel()))

    def totals(self) -> dict:
        calls = [grid.tolist() for grid in self.grids]
        rows = [row for call in calls for row in call]
        media = [row for row in rows if row != self.dummy]
        return {"vision_calls": self.calls, "vision_media_calls": sum(any(r != self.dummy for r in c) for c in calls),
                "vision_images": len(media),
                "vision_patches": sum(math.prod(row) for row in media), "vision_dummies": len(rows) - len(media),
                "tool_tokens": int(sum(int(t) for t in self.tokens)), "tool_padded_tokens": self.padded}

    def remove(self):
        for h in self.handles:
            h.remove()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------- TRL
def run_trl(mode: str, gc_on: bool, args, work: Path, records, device) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from vltrain.families import family_spec

    if args.pairs % args.trl_micro_batch:
        raise ValueError(f"--pairs ({args.pairs}) must be a multiple of --trl_micro_batch ({args.trl_micro_batch}) "
                         "so that one optimizer step sees every pair once")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(work / "model", dtype=dtype, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(work / "model")
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(**LORA, target_modules=family_spec(model).llm_lora_regex())
    config = DPOConfig(
        output_dir=str(work / "trl_out"), per_device_train_batch_size=args.trl_micro_batch,
        gradient_accumulation_steps=args.pairs // args.trl_micro_batch, max_steps=args.warmup + args.steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=gc_on, gradient_checkpointing_kwargs={"use_reentrant": False} if gc_on else None,
        beta=BETA, loss_type=["sigmoid"], max_length=None, report_to="none", save_strategy="no", logging_steps=1,
        dataloader_num_workers=args.num_workers, disable_tqdm=True, seed=0,
        disable_dropout=False,  # its default zeroes every dropout, LoRA's 0.05 too; vltrain keeps it
    )
    timer = _StepTimer(device, TrainerCallback, args.warmup)
    trainer = DPOTrainer(model=model, args=config, train_dataset=trl_dataset(records, work / "data" / "images"),
                         processing_class=processor, peft_config=peft_config, callbacks=[timer.callback])
    counter = WorkCounter(vision_towers(trainer.model, trainer.ref_model), model.config.vision_config.spatial_merge_size,
                          policy=_base(trainer.model))
    timer.counter = counter
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    try:
        trainer.train()
    finally:
        counter.remove()
    out = timer.result(args.warmup) | {"trainable_params": trainable, "micro_batches": config.gradient_accumulation_steps}
    del trainer, model
    return out


def _base(model):
    """The ForConditionalGeneration under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class _StepTimer:
    """Step times (on_step_begin .. on_step_end, synchronised), step-end-to-step-end wall times, logged losses
    and the work counts of the first timed step, as a transformers TrainerCallback."""

    def __init__(self, device, callback_base, warmup: int):
        timer = self
        self.device, self.warmup, self.counter, self.counts = device, warmup, None, None
        self.times, self.walls, self.losses, self.last_end = [], [], [], None

        class Callback(callback_base):
            def on_step_begin(self, args, state, control, **kwargs):
                sync(timer.device)
                if timer.counter is not None:
                    timer.counter.reset()
                timer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync(timer.device)
                end = time.perf_counter()
                timer.times.append(end - timer.t0)
                timer.walls.append(end - (timer.last_end if timer.last_end is not None else timer.t0))
                timer.last_end = end
                if timer.counts is None and len(timer.times) > timer.warmup:
                    timer.counts = timer.counter.totals()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    timer.losses.append(float(logs["loss"]))

        self.callback = Callback()

    def result(self, warmup: int) -> dict:
        return {"times": self.times[warmup:], "walls": self.walls[warmup:], "losses": self.losses,
                **(self.counts or {})}


# ----------------------------------------------------------------------------------- vltrain
def run_vltrain(mode: str, gc_on: bool, args, work: Path, records, device) -> dict:
    from accelerate import Accelerator

    from loops.dpo import dpo_loss
    from vltrain.build import build_model, build_reference
    from vltrain.config import DataConfig, DPOSection, LoraConfig, ModelConfig, TrainableConfig
    from vltrain.data.loader import build_loader
    from vltrain.data.media import MediaOptions
    from vltrain.data.pairs import PairCollator, PairDataset

    cuda = device.type == "cuda"
    lora = mode == "lora"
    model_cfg = ModelConfig(name_or_path=str(work / "model"), dtype="bfloat16" if cuda else "float32",
                            attn_implementation="sdpa", kernels=["all"], gradient_checkpointing=gc_on)
    trainable_cfg = TrainableConfig(freeze_llm=True, freeze_vision_tower=True, freeze_merger=True) if lora \
        else TrainableConfig()
    lora_cfg = LoraConfig(enabled=True, rank=LORA["r"], alpha=LORA["lora_alpha"], dropout=LORA["lora_dropout"]) \
        if lora else LoraConfig()
    data_cfg = DataConfig(train_path=str(work / "data" / "pairs.json"), image_folder=str(work / "data" / "images"),
                          packing=True, max_tokens_per_batch=args.token_budget,
                          max_seq_length=min(args.token_budget, 32768), num_workers=args.num_workers)
    dpo_cfg = DPOSection(loss_type=["sigmoid"], loss_weights=None, beta=BETA, label_smoothing=0.0, simpo_gamma=0.5,
                         precompute_ref_log_probs=False)
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    built = build_model(model_cfg, trainable_cfg, lora_cfg, packing=True, lora_reference=True)
    processor = built.processor
    media = MediaOptions.from_config(data_cfg, image_factor=built.spec.image_factor)
    dataset = PairDataset(data_cfg.train_path, processor, media, max_seq_length=data_cfg.max_seq_length,
                          image_folder=data_cfg.image_folder)
    loader = build_loader(dataset, data_cfg, processor, built.model.config, micro_batch_size=1, shuffle=False,
                          collate_fn=PairCollator(built.model.config, packing=True,
                                                  pad_token_id=processor.tokenizer.pad_token_id))
    reference = build_reference(built.model, model_cfg)
    params = [p for p in built.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=cuda)
    model, opt = accelerator.prepare(built.model, opt)
    reference.prepare(accelerator, model)
    counter = WorkCounter(vision_towers(model, reference.module),  # tokens: counted on the batches below
                          built.model.config.vision_config.spatial_merge_size)
    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, walls, losses, counts, last_end = [], [], [], None, None
    try:
        for step in range(args.warmup + args.steps):
            batches = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
                       for b in loader]  # the step's micro-batches first, as transformers' Trainer prefetches them
            num_pairs = sum(b["num_pairs"] for b in batches)
            assert num_pairs == args.pairs, (num_pairs, args.pairs)
            sync(device)
            counter.reset()
            t0 = time.perf_counter()
            total = torch.zeros((), device=device)
            for batch in batches:
                loss, _stats = dpo_loss(model, batch, dpo_cfg, reference, num_pairs=num_pairs)
                accelerator.backward(loss)
                total += loss.detach()
            accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(total))
            sync(device)
            end = time.perf_counter()
            times.append(end - t0)
            walls.append(end - (last_end if last_end is not None else t0))
            last_end = end
            if step == args.warmup:
                tokens = sum(b["input_ids"].numel() for b in batches)  # packed rows: no padding
                counts = counter.totals() | {"tool_tokens": tokens, "tool_padded_tokens": tokens}
    finally:
        counter.remove()
    out = {"times": times[args.warmup:], "walls": walls[args.warmup:], "losses": losses,
           "micro_batches": len(batches), "trainable_params": sum(p.numel() for p in params),
           "kernels": list(getattr(built.model, "_vltrain_kernels", [])), **counts}
    del model, opt, reference, built, batches, loader
    accelerator.free_memory()
    return out


# ----------------------------------------------------------------------------------- runs
def parse_spec(spec: str) -> tuple[str, str, bool]:
    parts = spec.split(":")
    if len(parts) == 2:
        parts.append("gc1")
    if len(parts) != 3 or parts[0] not in ("trl", "vltrain") or parts[1] not in ("full", "lora") \
            or parts[2] not in ("gc0", "gc1"):
        raise ValueError(f"bad run spec {spec!r}: want trl|vltrain:full|lora[:gc0|gc1]")
    return parts[0], parts[1], parts[2] == "gc1"


def run_one(spec: str, args, work: Path, records, pair_sizes, flops, device, ceiling) -> dict:
    tool, mode, gc_on = parse_spec(spec)
    result = {"run": spec, "preset": args.preset, "tool": tool, "mode": mode, "gc": int(gc_on), "pairs": args.pairs}
    if tool == "trl":
        result["micro_batch_pairs"] = args.trl_micro_batch
    else:
        result["token_budget"] = args.token_budget
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    try:
        out = (run_trl if tool == "trl" else run_vltrain)(mode, gc_on, args, work, records, device)
        step_s = sorted(out["times"])[len(out["times"]) // 2]
        wall_s = sorted(out["walls"])[len(out["walls"]) // 2]
        real = sum(p["chosen"] + p["rejected"] for p in pair_sizes)
        step_flops = flops[mode]
        result.update(
            ok=True, step_s=step_s, wall_step_s=wall_s, pairs_per_s=args.pairs / step_s,
            wall_pairs_per_s=args.pairs / wall_s, real_tokens=real, tokens_per_s=real / step_s,
            tflops=step_flops / step_s / 1e12, mfu=step_flops / step_s / ceiling,
            peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"),
            first_loss=out["losses"][0] if out["losses"] else float("nan"), losses=out["losses"],
            vision_calls_per_pair=out["vision_calls"] / args.pairs,
            vision_media_calls_per_pair=out["vision_media_calls"] / args.pairs,
            vision_images_per_pair=out["vision_images"] / args.pairs,
            vision_patches_per_pair=out["vision_patches"] / args.pairs,
            vision_dummies_per_pair=out["vision_dummies"] / args.pairs,
            patches_per_pair=sum(p["patches"] for p in pair_sizes) / args.pairs,
            **{k: v for k, v in out.items() if k not in ("times", "walls", "losses")},
            times=out["times"],
        )
    except torch.OutOfMemoryError as e:
        result.update(ok=False, error="OOM", detail=str(e)[:300],
                      peak_gib=torch.cuda.max_memory_allocated(device) / 2**30)
    except Exception as e:  # one failing run must not take the rest of the sweep down
        import traceback

        result.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}", detail=traceback.format_exc()[-3000:],
                      peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan"))
        print(result["detail"], file=sys.stderr)
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return result


def format_line(r: dict) -> str:
    head = f"{r['preset']:<16} {r['run']:<18}"
    if not r.get("ok"):
        return f"{head} {r['error']} (peak {r['peak_gib']:.1f} GiB)"
    return (f"{head} {r['pairs_per_s']:7.2f} pairs/s ({r['wall_pairs_per_s']:6.2f} wall)  {r['tokens_per_s']:8.0f} tok/s  "
            f"MFU {r['mfu']:6.1%}  peak {r['peak_gib']:5.1f} GiB  step {r['step_s']:.2f}s  "
            f"vision/pair: {r['vision_media_calls_per_pair']:.2f} calls {r['vision_images_per_pair']:.1f} img "
            f"{r['vision_patches_per_pair']:.0f} patches  loss0 {r['first_loss']:.4f}")


def prepare_workdir(work: Path, args, device) -> tuple[list[dict], list[dict], dict]:
    """Pairs, their tool-neutral sizes and the step FLOPs; the data and the checkpoint are written to `work`
    unless an earlier process (`--workdir`, same preset / pairs / seed / dtype) already wrote them there."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    key = {"preset": args.preset, "pairs": args.pairs, "seed": args.seed, "dtype": str(dtype)}
    meta_path = work / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    processor = build_processor(args.preset)
    if meta.get("key") == key:
        records = json.loads((work / "data" / "pairs.json").read_text())
        pair_sizes = measure_pairs(records, work / "data" / "images", processor)
        print(f"reusing the pairs and checkpoint in {work}", flush=True)
        return records, pair_sizes, meta["flops"]
    scale = "tiny" if args.preset.startswith("tiny_") else "real"
    records = write_pairs(work / "data", args.pairs, args.seed, IMAGE_SIZES[scale], TEXT_WORDS[scale])
    pair_sizes = measure_pairs(records, work / "data" / "images", processor)
    flops = write_checkpoint(args.preset, work / "model", device, dtype, pair_sizes)
    meta_path.write_text(json.dumps({"key": key, "flops": flops}))  # last: a torn preparation is redone
    return records, pair_sizes, flops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="qwen2_5_vl_3b")
    ap.add_argument("--runs", default="trl:full,vltrain:full")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--trl_micro_batch", type=int, default=2, help="pairs per TRL micro-batch")
    ap.add_argument("--token_budget", type=int, default=8192, help="tokens per vltrain micro-batch (packed)")
    ap.add_argument("--num_workers", type=int, default=2, help="DataLoader workers, both tools")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="model + data folder, reused by later calls with the same "
                    "preset / pairs / seed (default: a temporary one)")
    ap.add_argument("--prepare_only", action="store_true", help="write the pairs and checkpoint to --workdir, run nothing")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    specs = args.runs.split(",")
    for spec in specs:
        parse_spec(spec)
    qwen2_5 = sorted(name for name, p in PRESETS.items() if p["model_type"] == "qwen2_5_vl")
    if args.preset not in qwen2_5 + ["tiny_qwen2_5_vl"]:  # the processor, image sizes and LoRA targets are Qwen2.5-VL's
        raise ValueError(f"--preset {args.preset!r}: want tiny_qwen2_5_vl or one of {qwen2_5}")
    if args.steps < 1 or args.warmup < 0 or args.pairs < 1:
        raise ValueError("--steps must be >= 1, --warmup >= 0 and --pairs >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ceiling = matmul_ceiling(device)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"card {card} | bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s | preset {args.preset}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        work = Path(args.workdir or tmp)
        records, pair_sizes, flops = prepare_workdir(work, args, device)
        real = sum(p["chosen"] + p["rejected"] for p in pair_sizes)
        print(f"{args.pairs} pairs, {real} real tokens per step (chosen + rejected, prompt included), "
              f"{sum(p['patches'] for p in pair_sizes) / args.pairs:.0f} patches per pair (one image); "
              f"useful TFLOP per step: full {flops['full'] / 1e12:.2f}, lora {flops['lora'] / 1e12:.2f}", flush=True)
        if args.prepare_only:
            return []
        results = []
        for spec in specs:
            r = run_one(spec, args, work, records, pair_sizes, flops, device, ceiling)
            r.update(card=card, ceiling_tflops=ceiling / 1e12, argv=" ".join(sys.argv))
            results.append(r)
            print(format_line(r), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
