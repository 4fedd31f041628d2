"""Do LoRA gradients under `compile_layers` equal eager's on the GPU? (#15, round 8: the compiled LoRA runs of
bench_sft.py learned ~40x faster per step than HF and eager vltrain, while full fine-tuning agreed to 4 digits.
Round 9 found why: inductor's fused kernels kept the small adapter contribution that eager rounds away in bf16;
compile_layers now emulates eager's casts. RESULTS.md round 9.)

    python benchmarks/probe_lora_compile.py [model_type ...]
    LORA_DROPOUT=0.05 python benchmarks/probe_lora_compile.py   # with adapter dropout: compare the norms
    PROBE=train LORA_DROPOUT=0.05 python benchmarks/probe_lora_compile.py   # loss curves, below

A tiny model in bf16 on CUDA, the vision tests' mixed SFT batch (padded), LoRA r8 (no dropout, B drawn at random
so that every adapter weight gets a gradient), one forward + backward per kernel list; prints the relative L2
error of every LoRA gradient against the eager run with the same kernels (the worst and the median), the total
gradient norms, and the same for full fine-tuning; with and without gradient checkpointing.

PROBE=train: the bench's recipe instead (adapters from peft's default init, B = 0; AdamW), STEPS steps at LR on
the one batch, and the loss curves of eager (twice, with different dropout seeds: the noise floor), compiled,
compiled without eager's bf16 rounding between fused ops (inductor's default, vltrain's before round 9), and
compiled with checkpointing: does the compiled run learn faster than eager, as bench_sft's 7B runs did at lr 1e-5?
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, "tests")
from conftest import stock_and_copy  # noqa: E402
from vision_helpers import rel_err, sft_batch  # noqa: E402

from vltrain.families import family_spec  # noqa: E402
from vltrain.kernels import apply_kernels  # noqa: E402

DROPOUT = float(os.environ.get("LORA_DROPOUT", "0"))  # > 0: only the gradient norms are comparable
STEPS, LR = int(os.environ.get("STEPS", "8")), float(os.environ.get("LR", "1e-3"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run (liger's kernels fall back to stock)


def batch_for(model_type, processor, tmp):
    """The vision tests' mixed SFT batch (text, one image, two images of different sizes, a video), padded."""
    import json
    from pathlib import Path

    from conftest import mixed_records, write_image, write_video

    media_dir = Path(tmp)
    write_image(media_dir / "a.png", (64, 64), seed=1)
    write_image(media_dir / "b.png", (96, 64), seed=2)
    write_video(media_dir / "clip.mp4")
    (media_dir / "train.json").write_text(json.dumps(mixed_records()))
    batch = sft_batch(model_type, processor, media_dir, media_dir / "train.json")
    return {k: v.to(DEVICE) for k, v in batch.items()}


def grads(model, batch, lora: bool, kernels: list[str], gc: bool):
    torch._dynamo.reset()  # every compiled run compiles its own layers (no recompile limit reached)
    model = prepared(model, kernels, gc, lora=lora, b_random=True)
    torch.manual_seed(0)
    model.train()
    out = model(**batch)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def prepared(model, kernels: list[str], gc: bool, lora: bool = True, b_random: bool = False):
    """A copy of `model` with `kernels`, LoRA r8 (`b_random`: B drawn at random, else peft's zeros) and checkpointing."""
    model = copy.deepcopy(model)
    if kernels:
        apply_kernels(model, kernels, strict=False)
    if lora:
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(0)  # the same adapter init in every run
        init = "gaussian" if b_random else True
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=DROPOUT, init_lora_weights=init,
                                                 target_modules=family_spec(model).llm_lora_regex()))
        if b_random:  # B != 0, so that every adapter weight gets a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data.normal_(0, 0.02)
    if gc:
        from vltrain.models import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    return model


def curve(model, batch, kernels: list[str], gc: bool, seed: int = 0, fused_casts: bool = False) -> list[float]:
    """STEPS AdamW steps of LoRA on `batch`; the loss before each."""
    import vltrain.kernels.compile_layers as compile_layers

    torch._dynamo.reset()
    numerics = compile_layers.EAGER_NUMERICS
    if fused_casts:
        compile_layers.EAGER_NUMERICS = {}
    try:
        model = prepared(model, kernels, gc)
    finally:  # the layers are compiled (the options read) in prepared
        compile_layers.EAGER_NUMERICS = numerics
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        torch.manual_seed(seed + step)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def train_curves(model_type, stock, batch):
    runs = {"eager": dict(kernels=["all"], gc=False), "eager, other seed": dict(kernels=["all"], gc=False, seed=1000),
            "compiled": dict(kernels=["all", "compile_layers"], gc=False),
            "compiled, fused casts": dict(kernels=["all", "compile_layers"], gc=False, fused_casts=True),
            "compiled + GC": dict(kernels=["all", "compile_layers"], gc=True),
            "eager + GC": dict(kernels=["all"], gc=True)}
    base = None
    for name, kw in runs.items():
        losses = curve(stock, batch, **kw)
        base = base or losses
        drop = (losses[0] - losses[-1]) / max(base[0] - base[-1], 1e-12)
        print(f"{model_type} lora dropout={DROPOUT} lr={LR} {name:26s}: loss drop {drop:.3f}x eager's; "
              + " ".join(f"{x:.5f}" for x in losses), flush=True)


def main():
    import tempfile

    for model_type in sys.argv[1:] or ["qwen2_5_vl"]:
        stock, _, processor = stock_and_copy(model_type, dtype=torch.bfloat16, device=DEVICE)
        with tempfile.TemporaryDirectory() as tmp:
            batch = batch_for(model_type, processor, tmp)
        if os.environ.get("PROBE") == "train":
            train_curves(model_type, stock, batch)
            continue
        for lora in (True, False):
            runs = ((["all"], False), (["all"], True), (["rms_norm"], False), (["swiglu"], False), ([], False))
            for kernels, gc in runs if lora else runs[:1]:
                ref_loss, ref = grads(stock, batch, lora, kernels, gc)
                loss, got = grads(stock, batch, lora, kernels + ["compile_layers"], gc)
                errs = sorted(((rel_err(got[n], ref[n]), n) for n in ref), reverse=True)
                norms = sum(g.norm() ** 2 for g in got.values()).sqrt().item(), sum(g.norm() ** 2 for g in ref.values()).sqrt().item()
                print(f"{model_type} {'lora' if lora else 'full'} kernels={kernels}{' GC' if gc else ''}+compile_layers: "
                      f"grad norm {norms[0]:.4g} vs {norms[1]:.4g}; loss {loss:.6f} vs "
                      f"{ref_loss:.6f}; worst grad rel err {errs[0][0]:.3g} ({errs[0][1]}), median "
                      f"{errs[len(errs) // 2][0]:.3g}, {len(errs)} grads", flush=True)


if __name__ == "__main__":
    main()
