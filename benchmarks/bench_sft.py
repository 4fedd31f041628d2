"""SFT throughput / memory: the HF-default path vs vltrain, same architecture, data and card, one process.

    python benchmarks/bench_sft.py --preset qwen2_5_vl_3b --runs hf:full:gc0,vltrain:full:gc0 --out results.json
    python benchmarks/bench_sft.py --preset tiny_qwen2_5_vl --steps 2 --warmup 1      # CPU smoke test

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
Modes: full (every parameter trains) or lora (peft r64 / alpha 128 / dropout 0.05 on the LLM
linears, everything else frozen). `gc1` turns on non-reentrant gradient checkpointing (`gcN`: every
N-th layer); suffixes: `c` = + kernels compile_layers (`cx`: compiled, with liger's RMSNorm/SwiGLU
left out), `@T` = this run's token budget (vltrain) or micro-batch size (hf), e.g.
`vltrain:full:gc1c@32768`, `hf:full:gc0@1`.

Reported per run: real (non-pad) tokens/s, MFU against the bf16 matmul ceiling measured in this run
(median of 8192^3 matmuls), peak memory (torch.cuda.max_memory_allocated), or "OOM".
MFU counts model FLOPs only: 6 x params x tokens for trained linears (4 x for frozen ones under LoRA:
no weight gradients), attention 6 x 2 x layers x heads x head_dim x sum(len^2)/2 (causal) in the LLM
and the same without the causal half in the vision tower; recomputation under checkpointing is not
counted.
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
        ids, types, lab = [text(prompt_len // 2)], [torch.zeros(prompt_len // 2, dtype=torch.long)], []
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
    v_heads = vc.num_heads
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


def prepare_model(model, path, mode, gc_every, compile_layers=""):
    from vltrain.families import family_spec

    if path == "vltrain":
        from vltrain.attention import enable_packed_attention
        from vltrain.kernels import apply_kernels

        enable_packed_attention(model)
        # "cx": compile without liger's RMSNorm / SwiGLU (inductor fuses those itself)
        kernels = ["fused_linear_ce", "vision_window_varlen", "patch_embed_linear"] if compile_layers == "cx" else ["all"]
        apply_kernels(model, kernels + (["compile_layers"] if compile_layers else []), strict=False)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        spec = family_spec(model)
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05,
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
    Path(out_path).write_text(table)
    print(table[:6000])


def sync_report(model, batches, num_tokens, opt, params, out_path: str) -> None:
    """One step with torch's CUDA sync debug mode on: every device -> host synchronisation is counted by
    the Python line that caused it, and the table goes to `out_path` (the GPU idles after each one)."""
    import collections
    import warnings

    counts = collections.Counter()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            vltrain_step(model, batches, num_tokens, opt, params)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            counts[f"{w.filename}:{w.lineno}"] += 1
    lines = [f"{n:6d}  {where}" for where, n in counts.most_common()]
    Path(out_path).write_text(f"{sum(counts.values())} syncs in one step ({len(batches)} micro-batches)\n" +
                              "\n".join(lines) + "\n")
    print("\n".join(lines[:20]))


def run_one(spec: str, args, device, ceiling) -> dict:
    path, mode, gcs = spec.split(":")
    # gc0: off, gc1: every layer, gcN: every N-th layer; "c": + kernels compile_layers ("cx": compiled, with
    # only the non-elementwise kernels); "@T": this run's token budget (vltrain) or micro-batch size (hf)
    m = re.fullmatch(r"gc(\d+)(cx|c)?(?:@(\d+))?", gcs)
    if not m or (m[2] and path != "vltrain"):
        raise SystemExit(f"bad run spec {spec!r}: want path:mode:gcN[c|cx][@budget] (c/cx: vltrain only)")
    gc_every, compile_layers, budget = int(m[1]), m[2] or "", int(m[3]) if m[3] else None
    result = {"run": spec, "preset": args.preset, "path": path, "mode": mode, "gc": gc_every,
              "compile_layers": compile_layers}
    if path == "hf":
        result["micro_batch"] = budget or args.hf_micro_batch
    else:
        result["token_budget"] = budget or args.token_budget
    torch.manual_seed(0)
    model = None
    try:
        model = build_model(args.preset, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        examples = synthetic_examples(model.config, args.num_samples, seed=0, long_tokens=args.long_tokens)
        flops = model_flops(model, examples, lora=mode == "lora")
        model = prepare_model(model, path, mode, gc_every, compile_layers)
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
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of one vltrain step here")
    ap.add_argument("--sync_report", default=None, help="write the device->host syncs of one vltrain step here (GPU)")
    args = ap.parse_args()
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
                  f"pad {r['padded_tokens'] / r['real_tokens'] - 1:5.1%}  loss {r['losses'][0]:.3f}", flush=True)
        else:
            print(f"{args.preset:<14} {spec:<22} {r['error']} (peak {r['peak_gib']:.1f} GiB)", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
