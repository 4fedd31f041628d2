"""SFT throughput / memory: the HF-default path vs vltrain, same architecture, data and card, one process.

    python benchmarks/bench_sft.py --preset qwen2_5_vl_3b --runs hf:full:gc0,vltrain:full:gc0 --out results.json
    python benchmarks/bench_sft.py --preset tiny_qwen2_5_vl --steps 2 --warmup 1      # CPU smoke test
    python benchmarks/bench_sft.py --preset tiny_qwen2_5_vl --runs vltrain:full:gc0,loop:full:gc0 --steps 2 --warmup 1

Architectures are built from preset configs (the published config.json values, random init, bf16):
weights do not change speed. Every run trains on the same synthetic samples (seeded): text of 50-2000
tokens (about a fifth of it supervised), images of several sizes, a few text-only samples and one
video. One optimizer step = every sample once (gradient accumulation over micro-batches).

Paths:
- hf:       right-padded micro-batches of `--hf_micro_batch` samples with an attention_mask, sdpa,
            the model's own loss (logits materialised), torch AdamW(fused=True).
- vltrain:  micro-batches filled to `--token_budget` tokens and packed into one row (PackCollator,
            packed varlen attention), kernels "all" (fused linear CE, one-call vision window
            attention, Conv3d as Linear), same optimizer.
- loop:     what a user's run gets: the preset saved with `save_pretrained` and loaded by
            vltrain.build.build_model (model.kernels [all], packing), the data a LLaVA JSON with real image
            and video files read by SFTDataset through build_loader (packing, token budget `@T`,
            `--num_workers` workers), the Accelerator of vltrain.distributed with the mixed precision of
            accelerate_configs/single_gpu.yaml (bf16 on a GPU; float32 on CPU, like the other paths there),
            and loops.sft.train itself. Timed from the loop's own per-step `tokens_per_s` in
            <output_dir>/metrics.jsonl (train.log_every=1). See `run_loop` for how the data matches.
Modes: full (every parameter trains) or lora (peft r64 / alpha 128 / dropout 0.05 (`--lora_dropout`) on the LLM
linears, everything else frozen). `gc1` turns on non-reentrant gradient checkpointing (`gcN`: every
N-th layer); suffixes: `c` = + kernels compile_layers (`cx`: compiled, with liger's RMSNorm/SwiGLU
left out; vltrain and loop), `@T` = this run's token budget (vltrain, loop) or micro-batch size (hf), e.g.
`+name` = also this kernel, `-name` = "all" without this kernel (vltrain, loop), e.g.
`vltrain:full:gc1c@32768`, `hf:full:gc0@1`, `loop:full:gc1@16384`, `vltrain:full:gc1+vision_positions@16384`.

Reported per run: real (non-pad) tokens/s, MFU against the bf16 matmul ceiling measured in this run
(median of 8192^3 matmuls), peak memory (torch.cuda.max_memory_allocated), or "OOM". Every hf / vltrain run's
losses are compared step by step with the first run of its mode (`check_losses`): one that differs by more
than 0.2% gets a WARNING line -- it does not train like the reference (round 8's compiled LoRA runs, before
compile_layers kept eager's bf16 rounding: RESULTS.md round 9).
MFU counts model FLOPs only: 6 x params x tokens for trained linears (4 x for frozen ones under LoRA:
no weight gradients), attention 6 x 2 x layers x heads x head_dim x sum(len^2)/2 (causal) in the LLM
and the same without the causal half in the vision tower; recomputation under checkpointing is not
counted.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import gc
import json
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE, VIDEO, VSTART, VEND = 151655, 151656, 151652, 151653
PRESETS = {
    # Qwen/Qwen2-VL-2B-Instruct
    "qwen2_vl_2b": dict(model_type="qwen2_vl", text_config=dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2), tie_word_embeddings=True),
    # Qwen/Qwen2.5-VL-3B-Instruct
    "qwen2_5_vl_3b": dict(model_type="qwen2_5_vl", text_config=dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, tokens_per_second=2), tie_word_embeddings=True),
    # Qwen/Qwen2.5-VL-7B-Instruct
    "qwen2_5_vl_7b": dict(model_type="qwen2_5_vl", text_config=dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, tokens_per_second=2), tie_word_embeddings=False),
    # Qwen/Qwen3-VL-4B-Instruct
    "qwen3_vl_4b": dict(model_type="qwen3_vl", text_config=dict(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                   "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                           num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17], patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2), tie_word_embeddings=True),
    # Qwen/Qwen3.5-4B (hybrid 3 linear : 1 full attention; text and vision sizes checked against published
    # copies of its config.json: text 2560/9216/32 layers, head_dim 256, vision 24 x 1024/4096, no deepstack)
    "qwen3_5_4b": dict(model_type="qwen3_5", text_config=dict(
        vocab_size=248320, hidden_size=2560, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=16,
        num_key_value_heads=4, head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128,
        linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32, max_position_embeddings=262144,
        layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 8, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "mrope_section": [11, 11, 10],
                         "mrope_interleaved": True, "partial_rotary_factor": 0.25}),
        vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                           num_position_embeddings=2304, patch_size=16, spatial_merge_size=2, temporal_patch_size=2),
        tie_word_embeddings=True),
}


def build_model(preset: str, device, dtype):
    from transformers import AutoConfig, AutoModelForImageTextToText

    global IMAGE, VIDEO, VSTART, VEND
    if preset.startswith("tiny_"):
        from vltrain.tiny import build_tokenizer, tiny_config

        config = tiny_config(preset[5:], build_tokenizer())
        IMAGE, VIDEO, VSTART, VEND = (config.image_token_id, config.video_token_id, config.vision_start_token_id,
                                      config.vision_end_token_id)
    else:
        p = copy.deepcopy(PRESETS[preset])
        config = AutoConfig.for_model(p.pop("model_type"), image_token_id=IMAGE, video_token_id=VIDEO,
                                      vision_start_token_id=VSTART, vision_end_token_id=VEND, **p)
    config.use_cache = False
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


# ----------------------------------------------------------------------------------- synthetic data
def synthetic_examples(config, num_samples: int, seed: int, long_tokens: int = 0):
    """Examples as the SFT encoder makes them (input_ids, labels, mm_token_type_ids, media tensors)."""
    from vltrain.families import family_spec

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    patch, tp, merge = vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size
    dim = 3 * tp * patch * patch
    vocab = min(config.text_config.vocab_size, 150000)
    factor = patch * merge
    timestamped = family_spec(config.model_type).timestamped_video
    sizes = [(448, 448), (224, 336), (672, 448), (896, 672), (336, 336)]

    def text(n):
        return torch.randint(10, min(vocab, IMAGE) - 10 if vocab > IMAGE else vocab - 20, (n,), generator=gen)

    def grid(h, w, t=1):
        return torch.tensor([[t, h // patch, w // patch]])

    examples = []
    for i in range(num_samples):
        if long_tokens:
            n_text, media = long_tokens, ["image"]
        else:
            n_text = rng.randint(50, 2000)
            media = ["video"] if i == 3 else [] if i % 5 == 4 else ["image"] * (2 if i % 4 == 1 else 1)
        prompt_len = max(10, int(n_text * 0.8))
        ids, types = [text(prompt_len // 2)], [torch.zeros(prompt_len // 2, dtype=torch.long)]
        ex = {}
        pix, grids = [], []
        for kind in media:
            if kind == "image":
                h, w = sizes[rng.randrange(len(sizes))]
                h, w = (h // factor) * factor, (w // factor) * factor
                g = grid(h, w)
                n = int(g.prod()) // merge**2
                ids += [torch.tensor([VSTART]), torch.full((n,), IMAGE), torch.tensor([VEND])]
                types += [torch.zeros(1, dtype=torch.long), torch.ones(n, dtype=torch.long), torch.zeros(1, dtype=torch.long)]
                pix.append(torch.randn(int(g.prod()), dim, generator=gen))
                grids.append(g)
            else:  # 8 frames of 336x336 -> 4 temporal groups
                h = w = (336 // factor) * factor
                g = grid(h, w, t=4)
                per_frame = (h // patch) * (w // patch) // merge**2
                for frame in range(4):
                    if timestamped or frame == 0:
                        if timestamped:
                            ids.append(text(3)), types.append(torch.zeros(3, dtype=torch.long))
                        ids.append(torch.tensor([VSTART])), types.append(torch.zeros(1, dtype=torch.long))
                    ids.append(torch.full((per_frame,), VIDEO)), types.append(torch.full((per_frame,), 2))
                    if timestamped or frame == 3:
                        ids.append(torch.tensor([VEND])), types.append(torch.zeros(1, dtype=torch.long))
                ex["pixel_values_videos"] = torch.randn(int(g.prod()), dim, generator=gen)
                ex["video_grid_thw"] = g
                if config.model_type == "qwen2_5_vl":
                    ex["second_per_grid_ts"] = torch.tensor([1.0])
        rest = prompt_len - prompt_len // 2
        ids.append(text(rest)), types.append(torch.zeros(rest, dtype=torch.long))
        answer = text(n_text - prompt_len)
        input_ids = torch.cat(ids + [answer])
        labels = torch.full_like(input_ids, -100)
        labels[-len(answer):] = answer
        ex.update(input_ids=input_ids, labels=labels, mm_token_type_ids=torch.cat(types + [torch.zeros(len(answer), dtype=torch.long)]))
        if pix:
            ex["pixel_values"], ex["image_grid_thw"] = torch.cat(pix), torch.cat(grids)
        examples.append(ex)
    return examples


# ----------------------------------------------------------------------------------- FLOPs
def model_flops(model, examples, lora: bool) -> float:
    """Useful FLOPs of one forward+backward over `examples` (see the module docstring)."""
    cfg = model.config
    tc, vc = cfg.text_config, cfg.vision_config
    lm = model.model.language_model
    visual = model.model.visual
    llm_params = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    head_params = tc.vocab_size * tc.hidden_size
    vis_params = sum(p.numel() for p in visual.parameters())
    per = 4 if lora else 6
    n_llm = sum(len(e["input_ids"]) for e in examples)
    patches = sum(int(e[k].shape[0]) for e in examples for k in ("pixel_values", "pixel_values_videos") if k in e)
    flops = per * (llm_params + head_params) * n_llm + (2 if lora else 6) * vis_params * patches
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    layer_types = getattr(tc, "layer_types", None) or ["full_attention"] * tc.num_hidden_layers
    n_full = sum(t == "full_attention" for t in layer_types)
    sq = sum(len(e["input_ids"]) ** 2 for e in examples)
    flops += 6 * 2 * n_full * tc.num_attention_heads * head_dim * sq / 2
    v_dim = (getattr(vc, "hidden_size", None) if cfg.model_type != "qwen2_vl" else vc.embed_dim)
    v_sq = 0
    for e in examples:
        for key in ("image_grid_thw", "video_grid_thw"):
            for g in e.get(key, []):
                v_sq += int(g[0]) * (int(g[1]) * int(g[2])) ** 2  # full attention per frame (windows: less)
    flops += (2 if lora else 6) * 2 * vc.depth * v_dim * v_sq  # frozen under LoRA: forward only
    return float(flops)


def matmul_ceiling(device) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = []
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2]


# ----------------------------------------------------------------------------------- runs
def micro_batches(path, examples, model, args, budget=None):
    from vltrain.data.dataset import pad_collate
    from vltrain.data.packing import PackCollator, TokenBudgetBatchSampler

    if path == "hf":
        k = budget or args.hf_micro_batch
        batches = [pad_collate(examples[i:i + k], pad_token_id=0) for i in range(0, len(examples), k)]
    else:
        lengths = [len(e["input_ids"]) for e in examples]
        budget = max(budget or args.token_budget, max(lengths))
        sampler = TokenBudgetBatchSampler(lengths, budget, shuffle=False)
        collate = PackCollator(model.config)
        batches = [collate([examples[i] for i in idx]) for idx in sampler]
    from vltrain.progress import model_inputs

    return [model_inputs(b) for b in batches]  # tensors the model takes (batches also carry ids, skip records)


def kernel_list(model, compile_layers: str, extra_kernels=()) -> list[str]:
    """The kernels of a vltrain / loop run: "all" ("cx": compiled, without liger's RMSNorm / SwiGLU, which
    inductor fuses itself), each "+name" added, each "-name" left out of "all"."""
    from vltrain.kernels import OLD_NAMES, OPT_IN, applicable_kernels

    plus = [k[1:] for k in extra_kernels if k[0] == "+"]
    minus = {k[1:] for k in extra_kernels if k[0] == "-"}
    if compile_layers == "cx":
        kernels = [k for k in ("fused_linear_ce", "vision_varlen", "patch_embed_linear") if k in applicable_kernels(model)]
    elif minus:
        kernels = [k for k in applicable_kernels(model) if k not in OPT_IN and k not in OLD_NAMES and k not in minus]
    else:
        kernels = ["all"]
    return kernels + plus + (["compile_layers"] if compile_layers else [])


def prepare_model(model, path, mode, gc_every, compile_layers="", extra_kernels=(), lora_dropout: float = 0.05):
    from vltrain.families import family_spec

    if path == "vltrain":
        from vltrain.attention import enable_packed_attention
        from vltrain.kernels import apply_kernels

        enable_packed_attention(model)
        # "cx": compile without liger's RMSNorm / SwiGLU (inductor fuses those itself)
        apply_kernels(model, kernel_list(model, compile_layers, extra_kernels), strict=False)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        spec = family_spec(model)
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=lora_dropout,
                                                 target_modules=spec.llm_lora_regex()))
    if gc_every:
        from vltrain.models import enable_gradient_checkpointing

        enable_gradient_checkpointing(model, every_n_layers=gc_every)
    return model


def vltrain_step(model, batches, num_tokens, opt, params) -> None:
    """One optimizer step of the vltrain path (micro-batches accumulated, global token mean)."""
    for b in batches:
        model(**b, num_items_in_batch=num_tokens).loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def profile_step(model, batches, num_tokens, opt, params, out_path: str) -> None:
    """One warm step, then one step under torch.profiler; the top CUDA ops go to `out_path`."""
    from torch.profiler import ProfilerActivity, profile

    vltrain_step(model, batches, num_tokens, opt, params)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False) as prof:
        vltrain_step(model, batches, num_tokens, opt, params)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    summary = kernel_summary(prof)
    Path(out_path).write_text(summary + "\n\n" + table)
    print(summary + "\n\n" + table[:4000])


# GPU kernel name -> category, first match wins (cuBLAS / CUTLASS GEMMs, attention, liger's Triton kernels, ...)
KERNEL_CATEGORIES = (
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "matmul", "_mm_")),
    ("attention", ("flash", "fmha", "attn", "attention", "varlen")),
    ("triton (liger, compiled)", ("triton",)),
    ("copy / cast", ("copy", "memcpy", "memset", "cast", "convert", "to_copy")),
    ("reduce / norm", ("reduce", "norm", "softmax", "sum")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
)


def kernel_summary(prof) -> str:
    """Device time of one profiled step by kernel category, and the GPU's busy time (the union of its kernels'
    intervals) over the step's wall time: the idle rest is the host not keeping the GPU fed."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_category: dict[str, float] = {}
    for e in kernels:
        name = e.name.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "other")
        by_category[category] = by_category.get(category, 0.0) + e.time_range.elapsed_us()
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    wall = (spans[-1][1] - spans[0][0]) if spans else 0.0
    total = sum(by_category.values()) or 1.0
    lines = [f"GPU busy {busy / 1e3:.1f} ms of {wall / 1e3:.1f} ms from first to last kernel "
             f"({busy / max(wall, 1e-9):.1%}); {len(kernels)} kernels"]
    lines += [f"  {c:<26} {t / 1e3:9.1f} ms  {t / total:6.1%}" for c, t in
              sorted(by_category.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def sync_report(model, batches, num_tokens, opt, params, out_path: str) -> None:
    """One step with torch's CUDA sync debug mode on: every device -> host synchronisation is counted by
    the Python line that caused it, and the table goes to `out_path` (the GPU idles after each one)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            vltrain_step(model, batches, num_tokens, opt, params)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    write_sync_report(caught, out_path, f"one step ({len(batches)} micro-batches)")


def write_sync_report(caught, out_path: str, what: str) -> None:
    """The sync debug mode's warnings in `caught`, counted by the Python line that caused them, to `out_path`."""
    import collections

    counts = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    lines = [f"{n:6d}  {where}" for where, n in counts.most_common()]
    Path(out_path).write_text(f"{sum(counts.values())} syncs in {what}\n" + "\n".join(lines) + "\n")
    print(f"{sum(counts.values())} syncs in {what} -> {out_path}\n" + "\n".join(lines[:20]), flush=True)


# ----------------------------------------------------------------------------------- the loop path
WORDS = ("red green blue yellow purple orange white black circle square triangle cross star the quick brown fox "
         "jumps over lazy dog what colour shape image video describe answer yes no maybe camera bus road man "
         "walking is in this").split()
IMAGE_SIZES = [(448, 448), (224, 336), (672, 448), (896, 672), (336, 336)]  # (h, w), as synthetic_examples


def write_video_file(path: Path, num_frames: int, size: int, fps: int, seed: int) -> Path:
    """An mpeg4 file of `num_frames` noise frames of `size` x `size` (PyAV)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for _ in range(num_frames):
            frame = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_llava_data(folder: Path, tokenizer, num_samples: int, seed: int, copies: int = 1) -> Path:
    """A LLaVA JSON of `num_samples` conversations with the statistics of `synthetic_examples` -- text of
    50-2000 tokens of which the last fifth is the supervised reply, one or two noise images (PNG and JPEG)
    of the same sizes, every fifth sample text-only, sample 3 an 8-frame 336x336 mp4. The same seed draws
    the same text lengths and image sizes as `synthetic_examples` (words come from a generator of their own),
    so the paths train on samples of the same shapes. Returns the JSON's path; the media files lie beside it."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng, words = random.Random(seed), random.Random(seed + 1)  # rng: the draws of synthetic_examples, in its order
    pixels = np.random.default_rng(seed)
    probe = [words.choice(WORDS) for _ in range(2000)]
    tokens_per_word = len(tokenizer(" ".join(probe))["input_ids"]) / len(probe)

    def text(num_tokens: int) -> str:
        return " ".join(words.choice(WORDS) for _ in range(max(1, round(num_tokens / tokens_per_word))))

    records = []
    for i in range(num_samples):
        n_text = rng.randint(50, 2000)
        media = ["video"] if i == 3 else [] if i % 5 == 4 else ["image"] * (2 if i % 4 == 1 else 1)
        prompt_len = max(10, int(n_text * 0.8))
        record = {"id": f"s{i}"}
        for k, kind in enumerate(media):
            if kind == "video":
                write_video_file(folder / f"s{i}.mp4", num_frames=8, size=336, fps=4, seed=seed + i)
                record["video"] = f"s{i}.mp4"
            else:
                h, w = IMAGE_SIZES[rng.randrange(len(IMAGE_SIZES))]
                name = f"s{i}_{k}.{'png' if (i + k) % 2 == 0 else 'jpg'}"
                Image.fromarray(pixels.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
                record.setdefault("image", []).append(name)
        placeholders = "".join(f"<{kind}>\n" for kind in media)
        record["conversations"] = [{"from": "human", "value": placeholders + text(prompt_len)},
                                   {"from": "gpt", "value": text(n_text - prompt_len)}]
        records.append(record)
    # `copies`: the records again (new ids, same media), so that one epoch holds that many optimizer steps
    records = [dict(r, id=f"{r['id']}_{c}") if c else r for c in range(copies) for r in records]
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


def preset_config(preset: str, tokenizer):
    """The preset's config (or a tiny one for `tiny_<model_type>`) with `tokenizer`'s media and special token ids.

    The loop path's tokenizer is the tiny offline one (512 tokens). Speed is unchanged by that: the embedding
    table and the LM head keep the preset's vocabulary size (the head still computes every one of its logits),
    and a token id only picks the embedding row that is read."""
    from transformers import AutoConfig

    from vltrain.tiny import SPECIAL_TOKENS, tiny_config

    if preset.startswith("tiny_"):
        return tiny_config(preset[5:], tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    p = copy.deepcopy(PRESETS[preset])
    config = AutoConfig.for_model(p.pop("model_type"), image_token_id=ids["<|image_pad|>"],
                                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"], **p)
    config.text_config.pad_token_id, config.text_config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    return config


def save_preset_model(preset: str, folder: Path, device, dtype) -> None:
    """The preset architecture (random init, seeded) and the tiny offline processor (vltrain.tiny), saved together
    into `folder` as a user's checkpoint folder is: what build_model loads (see `preset_config` for the ids)."""
    from transformers import AutoModelForImageTextToText

    from vltrain.tiny import build_tiny_processor

    model_type = preset[5:] if preset.startswith("tiny_") else PRESETS[preset]["model_type"]
    processor = build_tiny_processor(model_type)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(preset_config(preset, processor.tokenizer), dtype=dtype)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model


def loop_config(workdir: Path, data_path: Path, args, *, mode: str, gc_every: int, compile_layers: str,
                extra_kernels=(),
                budget: int, model_type: str, device):
    """The SFTConfig of a loop run (a user's config: packing, token budget, kernels [all], default optimizer
    apart from a constant lr without warm-up). train.gradient_accumulation_steps is set by `run_loop`."""
    from vltrain.config import DataConfig, SFTConfig, from_dict

    lora = mode == "lora"
    return from_dict(SFTConfig, {
        "model": {"name_or_path": str(workdir / "model"), "dtype": "bfloat16" if device.type == "cuda" else "float32",
                  "attn_implementation": "sdpa", "gradient_checkpointing": gc_every > 0,
                  "checkpoint_every_n_layers": max(gc_every, 1),
                  "kernels": kernel_list(model_type, compile_layers, extra_kernels)},
        "data": {"train_path": str(data_path), "image_folder": str(data_path.parent), "packing": True,
                 "max_tokens_per_batch": budget, "max_seq_length": min(budget, DataConfig.max_seq_length),
                 "num_workers": args.num_workers, "nframes": 8},
        # LoRA as prepare_model's: r64 / alpha 128 / dropout 0.05 on the LLM, everything else frozen
        "trainable": {"freeze_llm": lora, "freeze_vision_tower": lora, "freeze_merger": lora},
        "lora": {"enabled": lora, **({"dropout": args.lora_dropout} if lora else {})},
        "optim": {"lr": 1e-5, "warmup_steps": 0, "scheduler": "constant"},
        "train": {"output_dir": str(workdir / "out"), "report_to": "none", "max_steps": args.warmup + args.steps,
                  "log_every": 1, "seed": 0},
    })


class LoopStepWindow:
    """`--profile` / `--sync_report` for the loop path: loops.sft's `finish_step` wrapped so that a torch.profiler
    trace covers the loop's step cycle after step `warmup + 1` (its logging, checkpoint check, the next
    step's data, forward, backward and optimizer step) and the sync debug mode the cycle after that -- the
    same Python the user's run executes, observed from outside. Files: the `--profile` / `--sync_report`
    path with `.loop` before the suffix."""

    def __init__(self, args, device):
        self.args, self.device, self.calls = args, device, 0
        self.profile = args.profile and loop_file(args.profile)
        self.sync_report = args.sync_report and device.type == "cuda" and loop_file(args.sync_report)
        self.prof = self.caught = self.catcher = None

    def __enter__(self):
        import loops.sft

        self.original = loops.sft.finish_step

        def wrapped(*a, **k):
            out = self.original(*a, **k)
            self.calls += 1
            self.after_step(self.calls)
            return out

        loops.sft.finish_step = wrapped
        return self

    def __exit__(self, *exc):
        import loops.sft

        loops.sft.finish_step = self.original
        if self.catcher is not None:  # the run ended inside the sync window
            torch.cuda.set_sync_debug_mode("default")
            self.catcher.__exit__(None, None, None)

    def after_step(self, step: int) -> None:
        import warnings

        from torch.profiler import ProfilerActivity, profile

        first = self.args.warmup + 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if self.profile and step == first:
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False)
            self.prof.__enter__()
        elif self.prof is not None and step == first + 1:
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
            text = kernel_summary(self.prof) + "\n\n" + table
            Path(self.profile).write_text(text)
            print(f"loop profile -> {self.profile}\n" + text[:4000], flush=True)
            self.prof = None
        if self.sync_report and step == first + 1:
            self.catcher = warnings.catch_warnings(record=True)
            self.caught = self.catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif self.catcher is not None and step == first + 2:
            torch.cuda.set_sync_debug_mode("default")
            self.catcher.__exit__(None, None, None)
            self.catcher = None
            write_sync_report(self.caught, self.sync_report, "one loop step cycle")


def loop_file(path: str) -> str:
    p = Path(path)
    return str(p.with_name(f"{p.stem}.loop{p.suffix}"))


def mixed_precision_of(accelerate_config: str) -> str:
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / accelerate_config).read_text())["mixed_precision"]


def run_loop(args, device, ceiling, *, mode: str, gc_every: int, compile_layers: str, budget: int, extra_kernels=(),
             workdir: Path) -> dict:
    """One run of loops.sft.train built as recipes/sft.py builds it; the result fields of the other paths.

    As in the other paths one optimizer step trains every sample once: train.gradient_accumulation_steps is
    the loader's micro-batch count (not shuffled, so every step holds the same micro-batches). Each step
    is therefore an epoch of its own (unless `--loop_epoch_steps K` writes the data K times: about K steps per epoch,
    each step the same position of every epoch) and starts by waiting for the loader's first micro-batch (workers
    prefetch within an epoch only), a wait that a dataset of many steps per epoch has once per epoch:
    `epoch_start_s` measures it (a fresh iterator's first micro-batch with the workers running) so that it
    can be told apart from the loop's own cost. The step time is the step's tokens (each sample encoded once
    here) over the loop's logged tokens_per_s; FLOPs are `model_flops` of those encoded samples."""
    import os

    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import set_seed

    from loops.sft import train
    from vltrain.build import build_model
    from vltrain.config import dump_config
    from vltrain.data.dataset import SFTDataset
    from vltrain.data.loader import build_loader
    from vltrain.data.media import MediaOptions
    from vltrain.distributed import build_accelerator
    from vltrain.plots import METRICS_FILE, read_metrics
    from vltrain.tiny import build_tiny_processor

    model_type = args.preset[5:] if args.preset.startswith("tiny_") else PRESETS[args.preset]["model_type"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_setup = time.perf_counter()

    def phase(name: str) -> None:  # where the loop path is, for a run that stalls
        print(f"loop: {name} ({time.perf_counter() - t_setup:.1f} s)", flush=True)

    copies = args.loop_epoch_steps
    data_path = write_llava_data(workdir / "data", build_tiny_processor(model_type).tokenizer, args.num_samples,
                                 seed=0, copies=copies)
    phase("data written")
    save_preset_model(args.preset, workdir / "model", device, dtype)
    phase("preset saved")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cfg = loop_config(workdir, data_path, args, mode=mode, gc_every=gc_every, compile_layers=compile_layers,
                      extra_kernels=extra_kernels,
                      budget=budget, model_type=model_type, device=device)
    set_seed(cfg.train.seed)
    data = cfg.data
    built = build_model(cfg.model, cfg.trainable, cfg.lora, packing=data.packing)
    print("\n".join(built.report), flush=True)
    phase("model built")
    media = MediaOptions.from_config(data, image_factor=built.spec.image_factor)
    dataset = SFTDataset(str(data_path), built.processor, media, max_seq_length=data.max_seq_length,
                         image_folder=data.image_folder)
    loader = build_loader(dataset, data, built.processor, built.model.config, micro_batch_size=1, shuffle=False,
                          seed=cfg.train.seed)
    # The Accelerator comes after the loader: its accumulation steps are the loader's micro-batches (build_model
    # needs the accelerator's device only for a quantized base).
    # one step = one copy's worth of micro-batches (packing fills a micro-batch across the copies' boundary)
    ga = max(1, round(len(loader) / copies))
    if len(loader) % ga:
        raise SystemExit(f"--loop_epoch_steps {copies}: the loader's {len(loader)} micro-batches do not split into "
                         f"steps of {ga}")
    cfg.train.gradient_accumulation_steps = ga
    epoch_steps = len(loader) // ga
    phase("loader built (lengths measured)")
    dump_config(cfg, workdir / "config.yaml")  # the run's config, as a recipe writes it
    examples = [dataset[i] for i in range(len(dataset))]
    micro = list(loader.batch_sampler)  # unshuffled: every epoch the same micro-batches, in this order
    step_tokens = [sum(len(examples[i]["input_ids"]) for mb in micro[k * ga:(k + 1) * ga] for i in mb)
                   for k in range(epoch_steps)]  # the real tokens of each optimizer step of an epoch
    real = sum(step_tokens) / epoch_steps
    base = built.model.get_base_model() if hasattr(built.model, "get_base_model") else built.model
    flops = model_flops(base, examples, lora=mode == "lora") / epoch_steps
    setup_s = time.perf_counter() - t_setup
    phase("examples encoded, training starts")

    saved_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    # what `accelerate launch --config_file accelerate_configs/single_gpu.yaml` sets (no autocast on CPU)
    os.environ["ACCELERATE_MIXED_PRECISION"] = (args.loop_mixed_precision or mixed_precision_of(
        "accelerate_configs/single_gpu.yaml") if device.type == "cuda" else "no")
    try:
        accelerator = build_accelerator(cfg.train)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t_train = time.perf_counter()
        with LoopStepWindow(args, device):
            result = train(accelerator, built.model, loader, cfg.train, cfg.optim,
                           max_bad_fraction=data.max_bad_fraction)
        train_s = time.perf_counter() - t_train
        phase("training done")
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        precision = accelerator.mixed_precision
        accelerator.end_training()
    finally:
        if saved_precision is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = saved_precision
        AcceleratorState._reset_state(True)  # process-wide singletons: a later loop run builds its own
        GradientState._reset_state()
        PartialState._reset_state()
    losses = result.losses
    del built, result
    logged = {r["step"]: r for r in read_metrics(Path(cfg.train.output_dir) / METRICS_FILE) if "tokens_per_s" in r}
    num_steps = args.warmup + args.steps
    if sorted(logged) != list(range(1, num_steps + 1)):
        raise RuntimeError(f"{cfg.train.output_dir}/{METRICS_FILE} has steps {sorted(logged)}, expected 1..{num_steps}")
    times = [step_tokens[(step - 1) % epoch_steps] / logged[step]["tokens_per_s"] for step in range(args.warmup + 1, num_steps + 1)]
    step_s = sorted(times)[len(times) // 2]
    batches = iter(loader)  # the workers start (not timed), then a new epoch's first micro-batch is timed
    next(batches)
    del batches
    t0 = time.perf_counter()
    next(iter(loader))
    epoch_start_s = time.perf_counter() - t0
    return dict(
        ok=True, step_s=step_s, real_tokens=real, padded_tokens=real, micro_batches=ga, epoch_steps=epoch_steps,
        tokens_per_s=real / step_s, tflops=flops / step_s / 1e12, mfu=flops / step_s / ceiling, peak_gib=peak,
        losses=losses, step_times=times, memory_gib=[logged[s]["memory_gib"] for s in sorted(logged)],
        epoch_start_s=epoch_start_s, mixed_precision=precision, kernels=cfg.model.kernels,
        num_workers=data.num_workers, setup_s=setup_s, train_s=train_s,
    )


def run_one(spec: str, args, device, ceiling) -> dict:
    path, mode, gcs = spec.split(":")
    # gc0: off, gc1: every layer, gcN: every N-th layer; "c": + kernels compile_layers ("cx": compiled, with
    # only the non-elementwise kernels); "@T": this run's token budget (vltrain) or micro-batch size (hf)
    m = re.fullmatch(r"gc(\d+)(cx|c)?((?:[+-]\w+)*)(?:@(\d+))?", gcs)
    if not m or path not in ("hf", "vltrain", "loop") or mode not in ("full", "lora") or ((m[2] or m[3]) and path == "hf"):
        raise SystemExit(f"bad run spec {spec!r}: want hf|vltrain|loop:full|lora:gcN[c|cx][+kernel...][-kernel...]"
                         "[@budget] (c/cx/+kernel/-kernel: not hf)")
    if path == "loop" and args.long_tokens:
        raise SystemExit(f"{spec}: --long_tokens is not implemented for the loop path (its data is write_llava_data's)")
    gc_every, compile_layers, budget = int(m[1]), m[2] or "", int(m[4]) if m[4] else None
    extra = re.findall(r"[+-]\w+", m[3])  # "+name": also this kernel, "-name": "all" without it
    result = {"run": spec, "preset": args.preset, "path": path, "mode": mode, "gc": gc_every,
              "compile_layers": compile_layers, "extra_kernels": extra}
    if path == "hf":
        result["micro_batch"] = budget or args.hf_micro_batch
    else:
        result["token_budget"] = budget or args.token_budget
    torch.manual_seed(0)
    torch._dynamo.reset()  # each compiled run compiles its own layers: no earlier run's cache entries count
    model = None            # toward dynamo's recompile limit (past it, later rows would run eager unnoticed)
    try:
        if path == "loop":
            with tempfile.TemporaryDirectory(prefix="bench_loop_") as tmp:
                workdir = Path(args.workdir) / spec.replace(":", "_") if args.workdir else Path(tmp)
                result.update(run_loop(args, device, ceiling, mode=mode, gc_every=gc_every, extra_kernels=extra,
                                       compile_layers=compile_layers, budget=result["token_budget"], workdir=workdir))
            return result
        model = build_model(args.preset, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        examples = synthetic_examples(model.config, args.num_samples, seed=0, long_tokens=args.long_tokens)
        flops = model_flops(model, examples, lora=mode == "lora")
        model = prepare_model(model, path, mode, gc_every, compile_layers, extra, lora_dropout=args.lora_dropout)
        model.train()
        batches = micro_batches(path, examples, model, args, budget)
        real = sum(len(e["input_ids"]) for e in examples)
        padded = sum(b["input_ids"].numel() for b in batches)
        num_tokens = sum(int((e["labels"][1:] != -100).sum()) for e in examples)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        batches = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]
        for b in batches:
            for k in ("pixel_values", "pixel_values_videos"):
                if k in b:
                    b[k] = b[k].to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        if args.profile and path == "vltrain":
            profile_step(model, batches, num_tokens, opt, params, args.profile)
        if args.sync_report and path == "vltrain" and device.type == "cuda":
            sync_report(model, batches, num_tokens, opt, params, args.sync_report)
        for step in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            total = 0.0
            for b in batches:
                loss = model(**b, num_items_in_batch=num_tokens).loss if path == "vltrain" else \
                    model(**b).loss * (int((b["labels"][:, 1:] != -100).sum()) / num_tokens)
                loss.backward()
                total += loss.detach()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(total))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]
        result.update(
            ok=True, step_s=step_s, real_tokens=real, padded_tokens=padded, micro_batches=len(batches),
            tokens_per_s=real / step_s, tflops=flops / step_s / 1e12, mfu=flops / step_s / ceiling,
            peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
            losses=losses,
        )
    except torch.OutOfMemoryError as e:
        result.update(ok=False, error="OOM", detail=str(e)[:300],
                      peak_gib=torch.cuda.max_memory_allocated(device) / 2**30)
    except Exception as e:  # one failing variant must not take the rest of the sweep down
        import traceback

        result.update(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}", detail=traceback.format_exc()[-3000:],
                      peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)
        print(result["detail"], file=sys.stderr)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2_5_vl_3b")
    ap.add_argument("--runs", default="hf:full:gc1,vltrain:full:gc1")
    ap.add_argument("--num_samples", type=int, default=16)
    ap.add_argument("--long_tokens", type=int, default=0, help="one sample per run of this many text tokens + an image")
    ap.add_argument("--hf_micro_batch", type=int, default=4)
    ap.add_argument("--token_budget", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of one vltrain step here (loop: of one step cycle, to the "
                         "path with .loop before its suffix; see LoopStepWindow)")
    ap.add_argument("--sync_report", default=None, help="write the device->host syncs of one vltrain step here (GPU; loop: as --profile)")
    ap.add_argument("--num_workers", type=int, default=2, help="loop: data.num_workers (DataLoader worker processes)")
    ap.add_argument("--workdir", default=None,
                    help="loop: keep its model, data, config.yaml and out/metrics.jsonl under WORKDIR/<run spec> "
                         "(default: a temporary folder, deleted)")
    ap.add_argument("--lora_dropout", type=float, default=0.05,
                    help="the adapters' dropout in lora runs, every path")
    ap.add_argument("--loop_mixed_precision", choices=["no", "bf16"], default=None,
                    help="loop: accelerate's mixed precision (default: accelerate_configs/single_gpu.yaml's, bf16); "
                         "'no' = the bf16 model without autocast, as the vltrain path runs")
    ap.add_argument("--loop_epoch_steps", type=int, default=1,
                    help="loop: the data written this many times, one step = about one copy's micro-batches, so one "
                         "epoch holds about this many optimizer steps (1: every step is an epoch and waits for the "
                         "epoch's first micro-batch)")
    ap.add_argument("--torch_varlen", action="store_true",
                    help="attention through torch.nn.attention.varlen.varlen_attn (its custom op) instead of the "
                         "direct call of torch's flash kernels (vltrain.attention.flash_varlen): the A/B of round 6")
    ap.add_argument("--two_tower_calls", action="store_true",
                    help="visual_merge runs the vision tower once per modality (images, then videos), as before "
                         "round 7, instead of once over both: the A/B of round 7")
    ap.add_argument("--fused_casts", action="store_true",
                    help="compiled layers without vltrain's emulate_precision_casts: inductor drops the round-to-bf16 "
                         "between fused ops, as before round 9 (compiled LoRA then trains differently from eager)")
    args = ap.parse_args()
    if args.fused_casts:
        import vltrain.kernels.compile_layers

        vltrain.kernels.compile_layers.EAGER_NUMERICS = {}
    if args.two_tower_calls:
        from vltrain.kernels import visual_merge

        visual_merge._one_tower_call = lambda self, kwargs: False
    if args.torch_varlen:
        import vltrain.attention

        vltrain.attention._aten_flash_usable = lambda device_index: False
    # `kill -USR1 <pid>` prints every thread's Python stack (a DataLoader worker forked later inherits it)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ceiling = matmul_ceiling(device)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"card {card} | bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s | preset {args.preset}", flush=True)
    results = []
    for spec in args.runs.split(","):
        r = run_one(spec, args, device, ceiling)
        r.update(card=card, ceiling_tflops=ceiling / 1e12, argv=" ".join(sys.argv))
        results.append(r)
        if r.get("ok"):
            print(f"{args.preset:<14} {spec:<22} {r['tokens_per_s']:>9.0f} tok/s  MFU {r['mfu']:6.1%}  "
                  f"peak {r['peak_gib']:5.1f} GiB  step {r['step_s']:.2f}s  mb {r['micro_batches']}  "
                  f"pad {r['padded_tokens'] / r['real_tokens'] - 1:5.1%}  loss {r['losses'][0]:.3f}"
                  + (f"  setup {r['setup_s']:.0f}s  epoch start {r['epoch_start_s']:.2f}s" if r["path"] == "loop" else ""),
                  flush=True)
        else:
            print(f"{args.preset:<14} {spec:<22} {r['error']} (peak {r['peak_gib']:.1f} GiB)", flush=True)
        for line in check_losses(results):
            if line.startswith(f"WARNING {spec}:"):
                print(line, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))


LOSS_TOLERANCE = 2e-3  # relative; bf16 full fine-tuning agrees with HF to ~2e-4 over the benchmark's steps


def check_losses(results: list[dict], tolerance: float = LOSS_TOLERANCE) -> list[str]:
    """Every hand-step run (hf / vltrain) against the first successful one of the same mode (full / lora): its
    largest relative loss difference over the steps they share goes to `loss_rel_diff` (and the run it was compared
    with to `loss_reference`); one warning line for each run beyond `tolerance` -- it does not train like the
    reference, so its speed is not a like-for-like figure. The loop path's data differ (write_llava_data): skipped."""
    warnings, reference = [], {}
    for r in results:
        if not r.get("ok") or r["path"] == "loop" or not r.get("losses"):
            continue
        ref = reference.setdefault(r["mode"], r)
        if ref is r:
            continue
        pairs = list(zip(r["losses"], ref["losses"]))
        r["loss_reference"] = ref["run"]
        r["loss_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)
        if r["loss_rel_diff"] > tolerance:
            warnings.append(f"WARNING {r['run']}: losses {[round(v, 4) for v in r['losses']]} differ from "
                            f"{ref['run']}'s {[round(v, 4) for v in ref['losses']]} by up to {r['loss_rel_diff']:.2%}: "
                            "it does not train like the reference, its speed is not a like-for-like figure")
    return warnings


if __name__ == "__main__":
    main()
