"""Classification with a head on a Qwen-VL model (vltrain.classifier), one explicit accelerate loop.

    accelerate launch recipes/cls.py [config.yaml] [section.field=value ...]

`train(accelerator, model, train_loader, train_cfg, optim_cfg, cls_cfg, eval_loader)` takes built objects (a
vltrain.classifier.VLClassifier; loaders of vltrain.data.labels.ClsCollator batches) and runs the loop; export and
`accelerator.end_training()` are the caller's (`on_best(step, model)` is called after every evaluation that is the
best so far: recipes/cls.py exports the model to best/ there). `cls_loss(model, batch, cls_cfg, num_examples=...)` is the
per-batch loss for research code.

Loss normalisation: the loss of an optimizer step is the sum of per-example losses (vltrain.classification) over
every micro-batch on every rank divided by the examples of that whole step, so accumulation 2 x micro-batch 1
gives the gradient of 1 x 2, and a packed row of N examples counts N.

Evaluation (every `train.eval_every` steps, before training and at the end): scores and targets of the whole eval
set gathered from every rank (each sample once, by id), then vltrain.classification.classification_metrics plus
the mean loss. `cls.metric_for_best` picks the best evaluation after step 0; `cls.early_stopping_patience` evaluations in a row
without an improvement larger than `cls.early_stopping_threshold` stop training (the state is checkpointed, so a
resumed run counts on). Faults as in SFT (vltrain.faults).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from vltrain.classification import EarlyStopping, classification_loss, classification_metrics, predictions, scalar_metrics
from vltrain.config import DataConfig
from vltrain.data.skips import SkipLedger
from vltrain.distributed import gather_lists
from vltrain.faults import Preemption, backward
from vltrain.tracking import print0
from vltrain.training import (LoopResult, end_of_step, finish_result, finish_step, log_metrics, log_step,
                              next_micro_batches, prepare_run, start_steps)


def num_examples(batch: dict) -> int:
    """Examples in a padded or packed batch (a packed row holds several)."""
    return len(batch["target"])


def cls_loss(model, batch: dict, cls_cfg, *, num_examples, class_weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the batch's per-example losses / `num_examples`, the logits (N, C) detached). `num_examples`: the
    examples of the whole optimizer step (all micro-batches, all ranks); class_weights: (C,) for class-balanced losses."""
    logits = model(**batch)
    return _losses(logits, batch["target"], cls_cfg, class_weights).sum() / num_examples, logits.detach()


def _losses(logits, targets, cls_cfg, class_weights=None) -> torch.Tensor:
    """Per-example losses (N,) of `cls.loss_type` with the section's options."""
    return classification_loss(logits, targets, loss_type=cls_cfg.loss_type, problem_type=cls_cfg.problem_type,
                               label_smoothing=cls_cfg.label_smoothing, focal_alpha=cls_cfg.focal_alpha,
                               focal_gamma=cls_cfg.focal_gamma, class_weights=class_weights)


@dataclass
class CLSResult(LoopResult):
    eval_metrics: list[tuple[int, dict]] = field(default_factory=list)  # (step, metrics); step 0 = before training
    best: tuple[int, dict] | None = None  # the best evaluation by cls.metric_for_best (this run's or a resumed one's)
    stopped_early: bool = False


@torch.no_grad()
def predict(accelerator, model, loader) -> list[dict]:
    """[{"id", "logits": [...], "target"}] for every sample of `loader`, all ranks, each id once, in id order of
    first appearance (the prepared loader repeats a few samples to even out the ranks' batches)."""
    was_training = model.training
    model.eval()
    rows = []
    for batch in loader:
        logits = model(**batch)
        targets = batch["target"].tolist() if "target" in batch else [None] * len(logits)
        rows += [{"id": i, "logits": l, "target": t} for i, l, t in zip(batch["id"], logits.float().cpu().tolist(), targets)]
    model.train(was_training)
    unique = {}
    for row in gather_lists(accelerator, rows):
        unique.setdefault(row["id"], row)
    return list(unique.values())


def evaluate(accelerator, model, loader, cls_cfg, class_weights=None, class_names=None) -> dict:
    """Metrics of the whole eval set (vltrain.classification.classification_metrics) plus "loss" (example mean)."""
    rows = predict(accelerator, model, loader)
    logits = torch.tensor([r["logits"] for r in rows])
    dtype = torch.long if cls_cfg.problem_type == "single_label" else torch.float32
    targets = torch.tensor([r["target"] for r in rows], dtype=dtype)
    losses = _losses(logits, targets, cls_cfg, class_weights.cpu() if class_weights is not None else None)
    scores, _ = predictions(logits, cls_cfg.problem_type)
    metrics = classification_metrics(scores, targets, problem_type=cls_cfg.problem_type, num_labels=cls_cfg.num_labels,
                                     class_names=class_names)
    return {"loss": losses.mean().item(), **metrics}


def _describe(metrics: dict) -> str:
    shown = [k for k in ("loss", "accuracy", "macro_f1", "auroc", "mse", "mae", "r2") if metrics.get(k) is not None]
    return " | ".join(f"{k} {metrics[k]:.4f}" for k in shown)


def train(accelerator, model, train_loader, train_cfg, optim_cfg, cls_cfg, eval_loader=None, *,
          class_weights: torch.Tensor | None = None, class_names=None, on_best=None,
          max_bad_fraction: float = DataConfig.max_bad_fraction) -> CLSResult:
    """Train the classifier (train_cfg: TrainConfig, optim_cfg: OptimConfig with head_lr, cls_cfg: CLSSection)."""
    tcfg, ga, world = train_cfg, accelerator.gradient_accumulation_steps, accelerator.num_processes
    assert ga == tcfg.gradient_accumulation_steps, "build the Accelerator with the config's accumulation steps"
    skips = SkipLedger(max_bad_fraction, max(1, len(train_loader.dataset) // world))
    run = prepare_run(accelerator, model, train_loader, tcfg, optim_cfg, eval_loader)
    model, state = run.model, run.state
    weights = class_weights.to(accelerator.device) if class_weights is not None else None
    early = EarlyStopping(cls_cfg.metric_for_best, cls_cfg.early_stopping_patience, cls_cfg.early_stopping_threshold)
    if "early_stopping" in state.extra:
        early.load_state_dict(state.extra["early_stopping"])
    result = CLSResult(step=state.step, model=model,
                       best=tuple(state.extra["best"]) if state.extra.get("best") else None)

    def run_eval(step: int) -> None:
        metrics = evaluate(accelerator, model, run.eval_loader, cls_cfg, weights, class_names)
        log_metrics(accelerator, run, {f"eval/{k}": v for k, v in scalar_metrics(metrics).items()}, step)
        improved = step > 0 and early.update(metrics[cls_cfg.metric_for_best])  # step 0: the untrained baseline
        print0(f"eval step {step}: {_describe(metrics)}" + (" (best so far)" if improved else ""))
        result.eval_metrics.append((step, metrics))
        if improved:
            result.best = (step, metrics)
            if on_best is not None:
                on_best(step, model)
        state.extra["early_stopping"] = early.state_dict()
        state.extra["best"] = list(result.best) if result.best else None

    if run.eval_loader is not None and state.step == 0:
        run_eval(0)  # before training: the baseline
    truncations: list[dict] = []
    guard, batches, bar = start_steps(accelerator, run, "cls")
    with Preemption() as preemption:
        while state.step < run.num_steps and not early.should_stop:
            t0 = time.perf_counter()
            micro_batches = next_micro_batches(batches, state, ga)
            examples = accelerator.reduce(torch.tensor(sum(num_examples(mb) for mb in micro_batches),
                                                       device=accelerator.device), "sum")
            step_loss = torch.zeros((), device=accelerator.device)
            correct = torch.zeros((), device=accelerator.device)
            sample_ids = []
            for mb in micro_batches:
                skips.add(mb.pop("skipped", []))
                truncations += mb.pop("truncated", [])
                sample_ids += mb["id"]
                with accelerator.accumulate(model):
                    loss, logits = cls_loss(model, mb, cls_cfg, num_examples=examples, class_weights=weights)
                    # accelerate divides by the accumulation steps and DDP averages over ranks: undo both so the
                    # gradient is that of the global example mean.
                    backward(accelerator, model, loss * ga * world)
                    step_loss += loss.detach()
                if cls_cfg.problem_type == "single_label":
                    correct += (logits.argmax(-1) == mb["target"]).sum()
            step_loss, grad_norm, stepped = finish_step(accelerator, run, guard, optim_cfg.max_grad_norm, step_loss,
                                                        sample_ids)
            result.losses.append(step_loss)
            seconds = time.perf_counter() - t0
            metrics = {"loss": step_loss, "grad_norm": grad_norm, "examples_per_s": examples.item() / seconds}
            if cls_cfg.problem_type == "single_label":
                metrics["train_accuracy"] = accelerator.reduce(correct, "sum").item() / max(1, examples.item())
            log_step(accelerator, run, bar, metrics, stepped)
            bar.update(1)
            result.preempted = end_of_step(accelerator, run, preemption, skips, run_eval)
            if result.preempted:
                break
    bar.close()
    if early.should_stop and result.preempted is None:
        result.stopped_early = True
        print0(f"early stopping at step {state.step}: {cls_cfg.metric_for_best} did not improve by more than "
               f"{cls_cfg.early_stopping_threshold} for {cls_cfg.early_stopping_patience} evaluation(s)")
    elif run.eval_loader is not None and result.preempted is None:
        run_eval(state.step)
    return finish_result(accelerator, run, result, skips, truncations)
