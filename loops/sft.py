"""Supervised fine-tuning, one explicit accelerate loop.

    accelerate launch recipes/sft.py [config.yaml] [section.field=value ...]

`train(accelerator, model, train_loader, train_cfg, optim_cfg, eval_loader=None)` takes built objects and runs
the loop (export and `accelerator.end_training()` are the caller's); `sft_loss(model, batch, num_tokens)` is the
per-batch loss for research code.

Loss normalisation (deliberate, as in torchtitan): the loss of an optimizer step is the sum of token losses
over every micro-batch on every rank divided by the number of supervised tokens in that whole step, so
gradient accumulation 2 x micro-batch 1 gives the same gradient as 1 x 2, and long samples weigh by their
tokens rather than per sample.

Faults (vltrain.faults): a step whose loss or gradient norm is not finite on any rank is skipped (no update),
logged with its sample ids; `train.max_bad_steps` in a row stop the run. SIGTERM / SIGINT finish the current
step, write a checkpoint and return with `result.preempted` set.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from vltrain.training import (LoopResult, end_of_step, finish_result, finish_step, log_metrics, log_step,
                              next_micro_batches, prepare_run, start_steps)
from vltrain.config import DataConfig
from vltrain.data.encode import IGNORE_INDEX
from vltrain.data.skips import SkipLedger
from vltrain.faults import Preemption, backward
from vltrain.progress import model_inputs
from vltrain.tracking import print0
from vltrain.vision import complete_modalities, link_dummy_features


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
    with link_dummy_features(unwrapped) if added else nullcontext():
        return model(**model_inputs(batch), num_items_in_batch=num_tokens).loss


@dataclass
class TrainResult(LoopResult):
    eval_losses: list[tuple[int, float]] = field(default_factory=list)


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


def _eval_and_log(accelerator, model, loader, step: int, output_dir) -> tuple[int, float]:
    loss = evaluate(accelerator, model, loader)
    log_metrics(accelerator, output_dir, {"eval_loss": loss}, step)
    print0(f"eval step {step}: loss {loss:.4f}")
    return step, loss


def train(accelerator, model, train_loader, train_cfg, optim_cfg, eval_loader=None, *,
          max_bad_fraction: float = DataConfig.max_bad_fraction) -> TrainResult:
    """Run SFT (train_cfg: a TrainConfig, optim_cfg: an OptimConfig). The data layer's skipped samples are
    counted against `max_bad_fraction` (`data.max_bad_fraction`) of this rank's share of the dataset."""
    tcfg, ga = train_cfg, accelerator.gradient_accumulation_steps
    assert ga == tcfg.gradient_accumulation_steps, "build the Accelerator with the config's accumulation steps"
    skips = SkipLedger(max_bad_fraction, max(1, len(train_loader.dataset) // accelerator.num_processes))
    run = prepare_run(accelerator, model, train_loader, tcfg, optim_cfg, eval_loader)
    model, state = run.model, run.state
    world = accelerator.num_processes

    result = TrainResult(step=state.step, model=model)
    truncations: list[dict] = []  # this run's, this rank's, one per encode (an epoch counts again); each was warned
    guard, batches, bar = start_steps(accelerator, run, "sft")
    with Preemption() as preemption:
        while state.step < run.num_steps:
            t0 = time.perf_counter()
            micro_batches = next_micro_batches(batches, state, ga)
            num_tokens = accelerator.reduce(sum(count_label_tokens(b) for b in micro_batches).to(accelerator.device), "sum")
            step_loss = torch.zeros((), device=accelerator.device)
            real_tokens, sample_ids = 0, []
            for mb in micro_batches:
                skips.add(mb.pop("skipped", []))
                truncations += mb.pop("truncated", [])
                sample_ids += mb.get("id", [])
                real_tokens += int(mb["attention_mask"].sum()) if "attention_mask" in mb else mb["input_ids"].numel()
                with accelerator.accumulate(model):
                    loss = sft_loss(model, mb, num_tokens)
                    # accelerate divides by the accumulation steps and DDP averages over ranks: undo both so
                    # the gradient is that of the global token mean.
                    backward(accelerator, model, loss * ga * world)
                    step_loss += loss.detach()
            step_loss, grad_norm, stepped = finish_step(accelerator, run, guard, optim_cfg.max_grad_norm, step_loss,
                                                        sample_ids)
            result.losses.append(step_loss)
            tokens_per_s = (accelerator.reduce(torch.tensor(real_tokens, device=accelerator.device), "sum").item()
                            / (time.perf_counter() - t0))
            log_step(accelerator, run, bar, {"loss": step_loss, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s},
                     stepped)
            bar.update(1)
            result.preempted = end_of_step(
                accelerator, run, preemption, skips,
                lambda step: result.eval_losses.append(_eval_and_log(accelerator, model, run.eval_loader, step,
                                                                     tcfg.output_dir)))
            if result.preempted:
                break
    bar.close()

    if run.eval_loader is not None and result.preempted is None:
        result.eval_losses.append(_eval_and_log(accelerator, model, run.eval_loader, state.step, tcfg.output_dir))
    return finish_result(accelerator, run, result, skips, truncations)
