"""FP8 training (kernels "float8": torchao Float8Linear on the LLM decoder-layer linears) vs bf16, one GPU.

    python benchmarks/bench_fp8.py --preset qwen2_5_vl_3b --out benchmarks/results/fp8_3b.json     # H200, < 5 min
    python benchmarks/bench_fp8.py --preset tiny_qwen2_5_vl --steps 2 --warmup 1 --agreement_steps 3  # CPU smoke test

Two measurements, in one process, on bench_sft.py's vltrain path (its preset architectures, random init, its
synthetic samples, packed micro-batches of `--token_budget` tokens, kernels "all", AdamW, the global token mean):

1. Speed, four rows: bf16, float8, bf16 + compile_layers, float8 + compile_layers. One optimizer step trains
   `--num_samples` samples; `--warmup` untimed steps (they hold the compiles), then the median of `--steps`
   timed ones. Reported: real tokens/s, speed-up over the bf16 row, MFU against the bf16 matmul ceiling measured
   here (float8 rows too: the same model FLOPs, so MFU compares directly; float8 can exceed the bf16 ceiling's
   share in principle), peak memory (torch.cuda.max_memory_allocated).
2. Loss agreement: `--agreement_steps` steps from the same initial weights (seeded, checked) on the same data,
   bf16 and then float8 (eager, same kernels otherwise): per-step losses and their largest relative difference.
   The data cycles through a pool of `--agreement_pool` samples, `--agreement_samples` per step, at lr
   `--agreement_lr`: the samples recur, so the loss falls well below its random-init value over 50 steps (a
   run that learns), unlike fresh uniform-random tokens, on which any two runs agree trivially.

On CPU (tests) the model is float32 and the float8 matmuls are emulated: the baseline rows are labelled "fp32",
MFU and memory are NaN, and the numbers show only that everything runs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_sft  # noqa: E402
from bench_sft import PRESETS, matmul_ceiling, micro_batches, model_flops, prepare_model, synthetic_examples  # noqa: E402

# A small-but-not-tiny Qwen2.5-VL for the GPU test of tests/test_float8.py (4 layers of hidden 1024; the 3B's
# vocabulary, so bench_sft's media token ids fit): every float8 linear is large enough for torch._scaled_mm.
SMALL = {"small_qwen2_5_vl": ("qwen2_5_vl_3b", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                                    num_attention_heads=8, num_key_value_heads=2),  # head_dim 128 as the 3B: mrope [16, 24, 24]
                              dict(depth=4, out_hidden_size=1024))}


def build(preset: str, device, dtype):
    """bench_sft.build_model, plus the SMALL presets (a published preset with fewer, narrower layers)."""
    if preset not in SMALL:
        return bench_sft.build_model(preset, device, dtype)
    from transformers import AutoConfig, AutoModelForImageTextToText

    parent, text, vision = SMALL[preset]
    p = copy.deepcopy(PRESETS[parent])
    p["text_config"].update(text)
    p["vision_config"].update(vision)
    config = AutoConfig.for_model(p.pop("model_type"), image_token_id=bench_sft.IMAGE, video_token_id=bench_sft.VIDEO,
                                  vision_start_token_id=bench_sft.VSTART, vision_end_token_id=bench_sft.VEND, **p)
    config.use_cache = False
    with torch.device(device):
        return AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")


def prepare(model, *, float8: bool, compile_layers: bool, gc_every: int):
    """bench_sft's vltrain path (packed attention, kernels "all", checkpointing), float8 first when asked."""
    if float8:
        from vltrain.kernels import apply_kernels

        apply_kernels(model, ["float8"])
    model = prepare_model(model, "vltrain", "full", gc_every, "c" if compile_layers else "")
    model.train()
    return model


def to_device(batches, device, dtype):
    out = []
    for b in batches:
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}
        for k in ("pixel_values", "pixel_values_videos"):
            if k in b:
                b[k] = b[k].to(dtype)
        out.append(b)
    return out


def train_step(model, batches, num_tokens: int, opt, params) -> float:
    """One optimizer step over `batches` (accumulated, global token mean); the step's loss."""
    total = 0.0
    for b in batches:
        loss = model(**b, num_items_in_batch=num_tokens).loss
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(total)


def num_label_tokens(examples) -> int:
    return sum(int((e["labels"][1:] != -100).sum()) for e in examples)


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def speed_row(args, device, dtype, ceiling, *, float8: bool, compile_layers: bool) -> dict:
    baseline = "bf16" if device.type == "cuda" else "fp32"
    row = {"precision": "float8" if float8 else baseline, "compile_layers": compile_layers, "dtype": str(dtype)}
    model = None
    try:
        torch.manual_seed(0)
        torch._dynamo.reset()  # each compiled row compiles its own layers
        model = build(args.preset, device, dtype)
        examples = synthetic_examples(model.config, args.num_samples, seed=0, long_tokens=args.sample_tokens)
        flops = model_flops(model, examples, lora=False)
        model = prepare(model, float8=float8, compile_layers=compile_layers, gc_every=args.gc)
        batches = to_device(micro_batches("vltrain", examples, model, args), device, dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        real, num_tokens = sum(len(e["input_ids"]) for e in examples), num_label_tokens(examples)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        t_row = time.perf_counter()
        for step in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses.append(train_step(model, batches, num_tokens, opt, params))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]
        row.update(ok=True, step_s=step_s, step_times=times, real_tokens=real, micro_batches=len(batches),
                   tokens_per_s=real / step_s, tflops=flops / step_s / 1e12, mfu=flops / step_s / ceiling,
                   peak_gib=peak_gib(device), losses=losses, kernels=list(model._vltrain_kernels),
                   row_s=time.perf_counter() - t_row)
    except torch.OutOfMemoryError as e:
        row.update(ok=False, error="OOM", detail=str(e)[:300], peak_gib=peak_gib(device))
    except Exception as e:  # one failing row must not take the other rows and the agreement down
        import traceback

        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:200]}", detail=traceback.format_exc()[-3000:],
                   peak_gib=peak_gib(device))
        print(row["detail"], file=sys.stderr)
    finally:
        del model
        release(device)
    return row


def agreement_run(preset: str, device, *, num_samples: int = 4, steps: int = 50, pool: int = 16, lr: float = 1e-4,
                  token_budget: int = 16384, gc_every: int = 1, sample_tokens: int = 0, seed: int = 0) -> dict:
    """`steps` steps of bf16 (fp32 on CPU) and then of float8 from the same initial weights on the same data:
    step k trains on samples k*num_samples .. of a pool of `pool`, cyclically. Returns the per-step losses of
    both, their relative differences and the largest one."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = types.SimpleNamespace(token_budget=token_budget)
    losses, checksums = {}, []
    examples = None
    for float8 in (False, True):
        torch.manual_seed(seed)
        model = build(preset, device, dtype)
        checksums.append(float(model.lm_head.weight.detach().float().sum()))
        if examples is None:
            examples = synthetic_examples(model.config, pool, seed=seed, long_tokens=sample_tokens)
        model = prepare(model, float8=float8, compile_layers=False, gc_every=gc_every)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")
        run = []
        for step in range(steps):
            chosen = [examples[(step * num_samples + i) % pool] for i in range(num_samples)]
            batches = to_device(micro_batches("vltrain", chosen, model, args), device, dtype)
            run.append(train_step(model, batches, num_label_tokens(chosen), opt, params))
        losses["float8" if float8 else "baseline"] = run
        del model, opt, params
        release(device)
    assert checksums[0] == checksums[1], "both runs start from the same weights"
    rel = [abs(f - b) / abs(b) for b, f in zip(losses["baseline"], losses["float8"])]
    return {"steps": steps, "samples_per_step": num_samples, "pool": pool, "lr": lr, "dtype": str(dtype),
            "baseline": losses["baseline"], "float8": losses["float8"], "rel_diff": rel, "max_rel_diff": max(rel),
            "mean_rel_diff": sum(rel) / len(rel)}


def table(rows: list[dict], preset: str) -> str:
    lines = [f"{'preset':<16} {'run':<24} {'tok/s':>9} {'speed-up':>8} {'MFU':>7} {'peak GiB':>8} {'step s':>7}"]
    for r in rows:
        name = r["precision"] + (" + compile_layers" if r["compile_layers"] else "")
        if r.get("ok"):
            lines.append(f"{preset:<16} {name:<24} {r['tokens_per_s']:>9.0f} {r['speedup']:>7.2f}x {r['mfu']:>7.1%} "
                         f"{r['peak_gib']:>8.1f} {r['step_s']:>7.3f}")
        else:
            lines.append(f"{preset:<16} {name:<24} {r['error']}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="qwen2_5_vl_3b", help=f"{sorted(PRESETS)}, {sorted(SMALL)} or tiny_<model_type>")
    ap.add_argument("--num_samples", type=int, default=16, help="samples per timed step")
    ap.add_argument("--token_budget", type=int, default=16384)
    ap.add_argument("--sample_tokens", type=int, default=0,
                    help="every sample this many text tokens + one image (bench_sft's long_tokens; small on CPU)")
    ap.add_argument("--gc", type=int, default=1, help="gradient checkpointing every N layers (0: off)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile_layers compiles in them)")
    ap.add_argument("--no_compile", action="store_true", help="only the two eager rows")
    ap.add_argument("--agreement_steps", type=int, default=50)
    ap.add_argument("--agreement_samples", type=int, default=4, help="samples per agreement step")
    ap.add_argument("--agreement_pool", type=int, default=16)
    ap.add_argument("--agreement_lr", type=float, default=1e-4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        from vltrain.kernels.float8 import check_float8_supported

        check_float8_supported("float8", device)
    ceiling = matmul_ceiling(device)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    import torchao

    print(f"card {card} | bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s | preset {args.preset} | torch "
          f"{torch.__version__} | torchao {torchao.__version__}", flush=True)
    t_start = time.perf_counter()
    result = {"preset": args.preset, "card": card, "ceiling_tflops": ceiling / 1e12, "torch": torch.__version__,
              "torchao": torchao.__version__, "argv": " ".join(sys.argv), "runs": []}

    def save():
        result["total_s"] = time.perf_counter() - t_start
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))

    for compile_layers in (False,) if args.no_compile else (False, True):
        for float8 in (False, True):
            row = speed_row(args, device, dtype, ceiling, float8=float8, compile_layers=compile_layers)
            first = result["runs"][0] if result["runs"] else row
            row["speedup"] = row["tokens_per_s"] / first["tokens_per_s"] if row.get("ok") and first.get("ok") else math.nan
            result["runs"].append(row)
            print(table([row], args.preset).splitlines()[1] + f"  ({time.perf_counter() - t_start:.0f} s)", flush=True)
            save()
    agreement = agreement_run(args.preset, device, num_samples=args.agreement_samples, steps=args.agreement_steps,
                              pool=args.agreement_pool, lr=args.agreement_lr, token_budget=args.token_budget,
                              gc_every=args.gc, sample_tokens=args.sample_tokens)
    result["agreement"] = agreement
    save()
    print(table(result["runs"], args.preset))
    a = agreement
    print(f"loss agreement over {a['steps']} steps ({a['samples_per_step']} samples/step, pool {a['pool']}, "
          f"lr {a['lr']}): {a['dtype']} {a['baseline'][0]:.4f} -> {a['baseline'][-1]:.4f}, float8 "
          f"{a['float8'][0]:.4f} -> {a['float8'][-1]:.4f}; max rel diff {a['max_rel_diff']:.2e}, "
          f"mean {a['mean_rel_diff']:.2e} ({result['total_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
