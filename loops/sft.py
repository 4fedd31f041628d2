"""Supervised fine-tuning, one explicit accelerate loop.

    accelerate launch recipes/sft.py [config.yaml] [section.field=value ...]

`train(cfg, accelerator, model, processor, train_loader, eval_loader)` takes built objects and runs
the loop; `sft_loss(model, batch, num_tokens)` is the per-batch loss for research code.

Loss normalisation (deliberate, as in torchtitan): the loss of an optimizer step is the sum of token
losses over every micro-batch on every rank divided by the number of supervised tokens in that whole
step, so gradient accumulation 2 x micro-batch 1 gives the same gradient as 1 x 2, and long samples
weigh by their tokens rather than per sample.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vltrain.checkpoint import export_model, load_checkpoint, resolve_resume, save_checkpoint
from vltrain.data.encode import IGNORE_INDEX
from vltrain.distributed import deepspeed_offloads_optimizer, fill_deepspeed_auto
from vltrain.optim import build_optimizer, build_scheduler
from vltrain.tracking import format_step, peak_memory_gib, print0
from vltrain.vision import complete_modalities, link_dummy_features

MODEL_INPUTS = (
    "input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "labels", "pixel_values",
    "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
)


def count_label_tokens(batch: dict) -> torch.Tensor:
    """Supervised tokens after the causal shift (what the loss averages over)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def sft_loss(model, batch: dict, num_tokens: torch.Tensor | int) -> torch.Tensor:
    """Sum of next-token losses in `batch` divided by `num_tokens`.

    batch: padded (B, L) or packed tensors from the collators; num_tokens: the supervised tokens of the
    whole optimizer step (all micro-batches, all ranks). A batch without images or without videos gets
    a dummy one appended (vltrain.vision.complete_modalities), so every rank runs the same modules.
    """
    unwrapped = getattr(model, "module", model)
    batch, added = complete_modalities(unwrapped, batch)
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS and v is not None}
    with link_dummy_features(unwrapped) if added else nullcontext():
        return model(**inputs, num_items_in_batch=num_tokens).loss


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # one global-mean loss per optimizer step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    num_skipped: int = 0
    export_dir: Path | None = None


def _batches(accelerator, loader, start_epoch: int, skip: int):
    """Endless (epoch, index, batch) over `loader`, starting `skip` batches into `start_epoch`.

    The skipped batches are dropped at the sampler (never loaded or decoded); the epoch is set first,
    so the resumed epoch has the same order as the straight run's."""
    epoch = start_epoch
    while True:
        loader.set_epoch(epoch)
        source, index = loader, 0
        if epoch == start_epoch and skip:
            source, index = accelerator.skip_first_batches(loader, skip), skip
        # Data loading never draws from the training RNG (a new DataLoader iterator does, for its
        # worker seed): a resumed run's dropout then matches the straight run's exactly.
        with torch.random.fork_rng(devices=[]):
            iterator = iter(source)
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(iterator, None)
            if batch is None:
                break
            yield epoch, index, batch
            index += 1
        epoch += 1


@torch.no_grad()
def evaluate(accelerator, model, loader) -> float:
    """Token-mean loss over the whole eval loader, reduced across ranks."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    for batch in loader:
        n = count_label_tokens(batch)
        if n == 0:
            continue
        total += sft_loss(model, batch, 1).detach().float()
        count += n
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return (total / count.clamp(min=1)).item()


def _eval_and_log(accelerator, model, loader, step: int) -> tuple[int, float]:
    loss = evaluate(accelerator, model, loader)
    accelerator.log({"eval_loss": loss}, step=step)
    print0(f"eval step {step}: loss {loss:.4f}")
    return step, loss


def train(cfg, accelerator, model, processor, train_loader, eval_loader=None) -> TrainResult:
    """Run SFT as configured by `cfg` (an SFTConfig); returns losses and where the export went."""
    tcfg = cfg.train
    ga = accelerator.gradient_accumulation_steps
    assert ga == tcfg.gradient_accumulation_steps, "build the Accelerator with the config's accumulation steps"
    optimizer = build_optimizer(model, cfg.optim, cpu_offload=deepspeed_offloads_optimizer(accelerator))
    fill_deepspeed_auto(accelerator, model, cfg.optim.max_grad_norm)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / ga)  # a prepared loader's len() is this rank's share
    total_steps = tcfg.max_steps if tcfg.max_steps > 0 else max(1, math.ceil(tcfg.num_epochs * steps_per_epoch))
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)  # not prepared: we step it once per step

    step, epoch, batch_index = 0, 0, 0
    resume_from = resolve_resume(tcfg.resume, tcfg.output_dir)
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, scheduler)
        step, epoch, batch_index = state["step"], state["epoch"], state["next_batch"]
        print0(f"resumed from {resume_from} at step {step}")

    world = accelerator.num_processes
    print0(
        f"steps: {total_steps} ({steps_per_epoch}/epoch) | micro-batch {tcfg.micro_batch_size} x accumulation {ga} "
        f"x {world} process(es) = {tcfg.micro_batch_size * ga * world} samples/step"
    )
    for group in optimizer.param_groups:
        print0(f"  param group {group.get('name', '?'):<18} lr {group['lr']:.2e}  wd {group['weight_decay']}  "
               f"params {sum(p.numel() for p in group['params']):,}")

    result = TrainResult(step=step)
    batches = _batches(accelerator, train_loader, epoch, batch_index)
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="sft", dynamic_ncols=True)
    model.train()
    while step < total_steps:
        t0 = time.perf_counter()
        micro_batches = []
        for _ in range(ga):
            epoch, batch_index, batch = next(batches)
            micro_batches.append(batch)
        batch_index += 1
        num_tokens = accelerator.reduce(sum(count_label_tokens(b) for b in micro_batches).to(accelerator.device), "sum")
        step_loss = torch.zeros((), device=accelerator.device)
        real_tokens = 0
        for mb in micro_batches:
            result.num_skipped += int(mb.pop("num_skipped", 0))
            real_tokens += int(mb["attention_mask"].sum()) if "attention_mask" in mb else mb["input_ids"].numel()
            with accelerator.accumulate(model):
                loss = sft_loss(model, mb, num_tokens)
                # accelerate divides by the accumulation steps and DDP averages over ranks: undo both so
                # the gradient is that of the global token mean.
                accelerator.backward(loss * ga * world)
                step_loss += loss.detach()
        assert accelerator.sync_gradients, "micro-batches out of step with accelerate's accumulation counter"
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        step_loss = accelerator.reduce(step_loss, "sum").item()
        result.losses.append(step_loss)
        if step % tcfg.log_every == 0 or step == total_steps:
            dt = time.perf_counter() - t0
            metrics = {
                "loss": step_loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": accelerator.reduce(torch.tensor(real_tokens, device=accelerator.device), "sum").item() / dt,
                "memory_gib": peak_memory_gib(accelerator.device),
                "epoch": epoch,
            }
            accelerator.log(metrics, step=step)
            if accelerator.is_main_process:
                bar.write(format_step(step, total_steps, metrics))
        bar.update(1)

        if eval_loader is not None and tcfg.eval_every and step % tcfg.eval_every == 0 and step < total_steps:
            result.eval_losses.append(_eval_and_log(accelerator, model, eval_loader, step))
        if tcfg.save_every and (step % tcfg.save_every == 0 or step == total_steps):
            save_checkpoint(accelerator, tcfg.output_dir, step, scheduler,
                            {"epoch": epoch, "next_batch": batch_index}, tcfg.save_total_limit)
    bar.close()

    if eval_loader is not None:
        result.eval_losses.append(_eval_and_log(accelerator, model, eval_loader, step))
    num_skipped = int(accelerator.reduce(torch.tensor(result.num_skipped, device=accelerator.device), "sum"))
    result.num_skipped = num_skipped
    if num_skipped:
        print0(f"skipped {num_skipped} sample(s) that could not be used (see warnings above)")
    result.step = step
    result.export_dir = export_model(accelerator, model, processor, cfg, Path(tcfg.output_dir) / "final")
    accelerator.end_training()
    return result
