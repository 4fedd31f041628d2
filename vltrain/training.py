"""What every training loop does around its step, shared so that no loop copies it (loops/sft.py, dpo.py, grpo.py).

    run = prepare_run(accelerator, model, train_loader, train_cfg, optim_cfg, eval_loader)   # before step 0
    guard, batches, bar = start_steps(accelerator, run, "sft")                              # just before step 0
    ... the loop's own step ...
    stop = end_of_step(accelerator, run, preemption, skips, eval_fn)                        # after every step
    return finish_result(accelerator, run, result, skips, truncations)                      # after the loop

`prepare_run` builds the optimizer (parameter groups) and scheduler, prepares model / optimizer / loaders,
resumes from `train.resume`, and prints the derived numbers before step 0. `end_of_step` asks every rank
whether a signal arrived, evaluates every `train.eval_every` steps, writes checkpoints every
`train.save_every` steps (and at once on a signal), and says whether to stop. `finish_result` fills the loop's
result (a `LoopResult`) with the data layer's skipped and truncated samples summed over the ranks and the run's step
and loss history.

Metrics go through `log_metrics` only: the trackers (`accelerator.log`) and `<train.output_dir>/metrics.jsonl`, one
JSON line per call, which `vltrain.plots` draws. `prepare_run` starts that file empty, or for a resumed run keeps its
lines up to the resumed step, so the file holds one history.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from vltrain.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from vltrain.distributed import deepspeed_offloads_optimizer, fill_deepspeed_auto, gather_lists, sum_over_ranks
from tqdm.auto import tqdm

from vltrain.faults import NonFiniteGuard, optimizer_step
from vltrain.optim import build_optimizer, build_scheduler
from vltrain.plots import METRICS_FILE, read_metrics
from vltrain.progress import TrainState, describe_run, resumable_batches, total_steps
from vltrain.tracking import format_step, peak_memory_gib, print0


@dataclass
class Run:
    """The prepared objects of one training run and its state (checkpointed with every save)."""

    model: object
    optimizer: object
    scheduler: object
    train_loader: object
    eval_loader: object
    train_cfg: object
    num_steps: int
    state: TrainState
    skipped_before: int  # skipped samples counted before a resume (all ranks)
    bad_before: int  # non-finite steps counted before a resume


@dataclass
class LoopResult:
    """What every loop's `train` returns; each loop's result class adds its own fields (metrics, evaluations)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # this run's steps (a resumed run: the steps after resume)
    history: list[float] = field(default_factory=list)  # every step's loss, resumed runs included
    num_skipped: int = 0  # samples skipped by the data layer, all ranks
    skipped: dict = field(default_factory=dict)  # the skip ledger's summary (ids and reasons)
    truncated: dict = field(default_factory=dict)  # samples cut to data.max_seq_length: count and the first records
    num_bad_steps: int = 0  # optimizer steps skipped for non-finite values
    preempted: str | None = None  # the signal's name when a signal stopped the run
    model: object = None  # the prepared model (export it with vltrain.checkpoint.export_model)


def prepare_run(accelerator, model, train_loader, train_cfg, optim_cfg, eval_loader=None, *,
                steps_per_batch: int = 1) -> Run:
    """Optimizer + scheduler, `accelerator.prepare`, resume, and the banner (see the module docstring).
    `steps_per_batch`: optimizer steps per step's worth of batches (GRPO: grpo.num_iterations), so that
    train.num_epochs passes over the data that many times."""
    optimizer = build_optimizer(model, optim_cfg, cpu_offload=deepspeed_offloads_optimizer(accelerator))
    fill_deepspeed_auto(accelerator, model, optim_cfg.max_grad_norm)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    ga = accelerator.gradient_accumulation_steps
    num_steps, steps_per_epoch = total_steps(train_cfg, train_loader, ga, steps_per_batch)
    scheduler = build_scheduler(optimizer, optim_cfg, num_steps)  # not prepared: loops step it once per step

    state = TrainState()
    resume_from = resolve_resume(train_cfg.resume, train_cfg.output_dir)
    if resume_from is not None:
        state = TrainState.from_dict(load_checkpoint(accelerator, resume_from, scheduler))
        print0(f"resumed from {resume_from} at step {state.step}")
    start_metrics_file(accelerator, train_cfg.output_dir, state.step if resume_from is not None else None)
    print0(describe_run(train_loader, ga, accelerator.num_processes, num_steps, steps_per_epoch))
    if train_cfg.max_steps > 0:
        print0(f"  train.max_steps={train_cfg.max_steps} sets the length ({num_steps / steps_per_epoch:.2f} epochs); "
               f"train.num_epochs={train_cfg.num_epochs:g} is not used")
    for group in optimizer.param_groups:  # the configured (peak) rate; the scheduler's first one when warm-up starts lower
        peak, first = group.get("initial_lr", group["lr"]), group["lr"]
        warmup = f" (warm-up from {first:.2e})" if first != peak and state.step == 0 else ""
        print0(f"  param group {group.get('name', '?'):<18} peak lr {peak:.2e}{warmup}  wd {group['weight_decay']}  "
               f"params {sum(p.numel() for p in group['params']):,}")
    return Run(model, optimizer, scheduler, train_loader, eval_loader, train_cfg, num_steps, state,
               skipped_before=state.num_skipped, bad_before=state.num_bad_steps)


def start_steps(accelerator, run: Run, desc: str) -> tuple[NonFiniteGuard, object, tqdm]:
    """Just before the first step: the non-finite step guard (vltrain.faults), the endless batch iterator from the
    resumed position (vltrain.progress.resumable_batches), the progress bar, and the model in train mode."""
    guard = NonFiniteGuard(run.train_cfg.max_bad_steps)
    batches = resumable_batches(accelerator, run.train_loader, run.state.epoch, run.state.next_batch)
    bar = tqdm(total=run.num_steps, initial=run.state.step, disable=not accelerator.is_main_process, desc=desc,
               dynamic_ncols=True)
    run.model.train()
    return guard, batches, bar


def end_of_step(accelerator, run: Run, preemption, skips, eval_fn=None) -> str | None:
    """After optimizer step `run.state.step`: maybe evaluate (`eval_fn(step)`), maybe checkpoint; returns the
    signal's name when the run must stop now (a checkpoint was written), else None."""
    tcfg, state = run.train_cfg, run.state
    stop = preemption.requested(accelerator)  # collective, before eval: a preempted run saves at once
    if (not stop and eval_fn is not None and run.eval_loader is not None and tcfg.eval_every
            and state.step % tcfg.eval_every == 0 and state.step < run.num_steps):
        eval_fn(state.step)
    if stop or (tcfg.save_every and (state.step % tcfg.save_every == 0 or state.step == run.num_steps)):
        state.num_skipped = run.skipped_before + sum_over_ranks(accelerator, skips.count)
        save_checkpoint(accelerator, tcfg.output_dir, state.step, run.scheduler, state.to_dict(), tcfg.save_total_limit)
    if not stop:
        return None
    name = preemption.signal_name or "signal"
    print0(f"{name} received: stopped after step {state.step}, checkpoint written; resume with train.resume=auto")
    return name


def data_report(accelerator, run: Run, skips, truncations: list[dict]) -> dict:
    """{"num_skipped", "skipped", "truncated"} over every rank (skips counted before a resume included)."""
    num_skipped = run.skipped_before + sum_over_ranks(accelerator, skips.count)
    skipped = {**skips.summary(), "num_skipped": num_skipped,
               "records": gather_lists(accelerator, skips.summary()["records"])}
    if num_skipped:
        print0(f"skipped {num_skipped} sample(s) that could not be used (see warnings above)")
    truncated = {"num_truncated": sum_over_ranks(accelerator, len(truncations)),
                 "records": gather_lists(accelerator, truncations[:100])[:100]}
    if truncated["num_truncated"]:
        print0(f"truncated {truncated['num_truncated']} sample(s) to data.max_seq_length (see warnings above)")
    return {"num_skipped": num_skipped, "skipped": skipped, "truncated": truncated}


def finish_result(accelerator, run: Run, result: LoopResult, skips, truncations: list[dict]) -> LoopResult:
    """After the loop: `result` with the data report (`data_report`), the step, the loss history and the bad steps."""
    report = data_report(accelerator, run, skips, truncations)
    result.num_skipped, result.skipped, result.truncated = report["num_skipped"], report["skipped"], report["truncated"]
    result.step, result.history, result.num_bad_steps = run.state.step, list(run.state.losses), run.state.num_bad_steps
    return result


def next_micro_batches(batches, state: TrainState, count: int) -> list[dict]:
    """The next `count` micro-batches of `resumable_batches`, advancing the state's data position."""
    micro_batches = []
    for _ in range(count):
        state.epoch, index, batch = next(batches)
        micro_batches.append(batch)
    state.next_batch = index + 1
    return micro_batches


def log_step(accelerator, run: Run, bar, metrics: dict, stepped: bool) -> None:
    """Every `train.log_every` steps (and the last): trackers + one fixed-format line above the progress bar."""
    step = run.state.step
    if step % run.train_cfg.log_every and step != run.num_steps:
        return
    metrics = {**metrics, "lr": run.scheduler.get_last_lr()[0], "memory_gib": peak_memory_gib(accelerator.device),
               "epoch": run.state.epoch}
    log_metrics(accelerator, run, metrics, step)
    if accelerator.is_main_process:
        bar.write(format_step(step, run.num_steps, metrics) + ("" if stepped else " | skipped (non-finite)"))


def start_metrics_file(accelerator, output_dir, resumed_step: int | None) -> Path:
    """`<output_dir>/metrics.jsonl` for a run starting now: empty (`resumed_step` None), or a resumed run's with only
    the lines of steps <= `resumed_step` (the steps after it are done again). Written by the main process."""
    path = Path(output_dir) / METRICS_FILE
    if not accelerator.is_main_process:
        return path
    kept = []
    if resumed_step is not None and path.is_file():
        kept = [record for record in read_metrics(path) if record["step"] <= resumed_step]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)  # never a half-written history, even when killed here
    return path


def finite_numbers(metrics: dict) -> dict:
    """The entries of `metrics` that are ints or finite floats (one-element tensors / numpy scalars as Python
    numbers); bools, nan, inf, strings and lists are left out."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            try:
                value = value.item()
            except (ValueError, RuntimeError):  # more than one element
                continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, int) or math.isfinite(value):
            out[key] = value
    return out


def log_metrics(accelerator, run_or_output_dir, metrics: dict, step: int) -> None:
    """Log `metrics` of optimizer step `step`: `accelerator.log` (the trackers) and, on the main process, the line
    `{"step": step, ...}` (`finite_numbers`) appended to `<output_dir>/metrics.jsonl`. `run_or_output_dir`: a `Run`
    (its train.output_dir) or the output folder."""
    accelerator.log(metrics, step=step)
    if not accelerator.is_main_process:
        return
    output_dir = run_or_output_dir.train_cfg.output_dir if isinstance(run_or_output_dir, Run) else run_or_output_dir
    path = Path(output_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:  # closed at once: each line is on disk before the next step
        f.write(json.dumps({"step": int(step), **finite_numbers(metrics)}) + "\n")


def finish_step(accelerator, run: Run, guard, max_grad_norm: float, step_loss, sample_ids: list) -> tuple[float, object, bool]:
    """After the step's micro-batches: the guarded optimizer step (vltrain.faults), the step counter and the loss
    history. Returns (the step's loss summed over ranks, grad norm, whether the update was applied)."""
    assert accelerator.sync_gradients, "micro-batches out of step with accelerate's accumulation counter"
    state = run.state
    grad_norm, stepped = optimizer_step(accelerator, run.model, run.optimizer, run.scheduler,
                                        max_grad_norm=max_grad_norm, loss=step_loss, guard=guard,
                                        step=state.step + 1, sample_ids=sample_ids)
    state.step += 1
    state.num_bad_steps = run.bad_before + guard.num_bad_steps
    loss = accelerator.reduce(step_loss, "sum").item()
    state.losses.append(loss)
    return loss, grad_norm, stepped
