"""Direct preference optimisation and its pairwise relatives, one explicit accelerate loop.

    accelerate launch recipes/dpo.py [config.yaml] [section.field=value ...]

`train(accelerator, model, train_loader, train_cfg, optim_cfg, dpo_cfg, reference, eval_loader)` takes built
objects (loaders of vltrain.data.pairs.PairCollator batches; `reference` from vltrain.build.build_reference, or
None for reference-free losses) and runs the loop; export and `accelerator.end_training()` are the caller's.
`dpo_loss(model, batch, dpo_cfg, reference, num_pairs=...)` is the per-batch loss for research code.

One vision pass per pair: a batch holds every pair's prompt media once and its chosen and rejected sequences
(packed into one row, or padded rows); the vision tower runs once on the unique media and both sequences
read the same features (vltrain.vision.shared_media). With a frozen tower (nothing in it trains) the
reference's forward computes those features and the policy's forward reuses them: one tower call per pair
per step for policy and reference together. The peers run the tower on every image twice for the policy and
twice more for the reference.

Loss normalisation: the loss of an optimizer step is the sum of per-pair losses (vltrain.preference) over
every micro-batch on every rank divided by the number of pairs in that whole step (the global pair mean), so
accumulation 2 x micro-batch 1 gives the gradient of 1 x 2. Metrics are pair means over the step.

`dpo.precompute_ref_log_probs`: before step 0 the reference scores every train (and eval) pair once; the
table is cached on disk (`ref_cache`, keyed by the caller: recipes/dpo.py hashes the data file, model, media
and template options) and read back by later runs, and the reference is not used (nor kept) afterwards.

Faults as in SFT (vltrain.faults): a non-finite step is skipped and logged with its pair ids;
`train.max_bad_steps` in a row stop the run; SIGTERM / SIGINT write a checkpoint and return `preempted`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vltrain.training import (LoopResult, end_of_step, finish_result, finish_step, log_metrics, log_step,
                              next_micro_batches, prepare_run, start_steps)
from vltrain.config import DataConfig
from vltrain.data.skips import SkipLedger
from vltrain.distributed import gather_lists
from vltrain.faults import Preemption, backward
from vltrain.logprobs import sequence_logprobs
from vltrain.preference import PairLogps, needs_reference, preference_loss
from vltrain.tracking import print0
from vltrain.vision import shared_media, vision_frozen


def pair_logps(model, batch: dict, *, features: dict | None = None) -> PairLogps:
    """Summed log-probs (and token counts) of every pair's chosen and rejected reply in `batch` (P pairs,
    sequences [chosen_0, rejected_0, ...]); the vision tower runs once per unique medium (`features`: see
    vltrain.vision.shared_media)."""
    with shared_media(model, batch, features):
        logp, num_tokens = sequence_logprobs(model, batch)
    return PairLogps(chosen=logp[0::2], rejected=logp[1::2], chosen_tokens=num_tokens[0::2],
                     rejected_tokens=num_tokens[1::2])


def dpo_loss(model, batch: dict, dpo_cfg, reference=None, *, num_pairs, ref_logps: PairLogps | None = None):
    """(loss, per-pair stats) of one micro-batch: the sum of its per-pair losses divided by `num_pairs` (the
    pairs of the whole optimizer step, all ranks).

    reference: a prepared vltrain.build.Reference (None when the losses need none or `ref_logps` is given);
    ref_logps: precomputed reference log-probs of these pairs. Stats, each (P,) and detached: "loss",
    "loss/<type>" per selected loss, "rewards/chosen", "rewards/rejected", "rewards/margin",
    "rewards/accuracy" (1.0 where the chosen reward is higher), "logps/chosen", "logps/rejected".
    """
    features = None
    if ref_logps is None and needs_reference(dpo_cfg.loss_type):
        if reference is None:
            raise ValueError(f"dpo.loss_type {dpo_cfg.loss_type} needs a reference model (vltrain.build.build_reference) "
                             "or precomputed reference log-probs")
        # A frozen tower gives the reference and the policy the same image features: compute them once.
        features = {} if vision_frozen(model) else None
        with reference() as ref_model:
            ref_logps = pair_logps(ref_model, batch, features=features)
    policy = pair_logps(model, batch, features=features)
    out = preference_loss(policy, ref_logps, dpo_cfg.loss_type, dpo_cfg.loss_weights, beta=dpo_cfg.beta,
                          label_smoothing=dpo_cfg.label_smoothing, simpo_gamma=dpo_cfg.simpo_gamma)
    stats = {"loss": out.loss.detach(), **{f"loss/{k}": v.detach() for k, v in out.components.items()},
             "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
             "rewards/margin": out.chosen_rewards - out.rejected_rewards,
             "rewards/accuracy": (out.chosen_rewards > out.rejected_rewards).float(),
             "logps/chosen": policy.chosen.detach(), "logps/rejected": policy.rejected.detach()}
    return out.loss.sum() / num_pairs, stats


# ------------------------------------------------------------------------------- reference log-prob table
def _table_logps(table: dict, batch: dict, device) -> PairLogps:
    """The precomputed reference log-probs of `batch`'s pairs (token counts are not needed: the policy's)."""
    missing = [i for i in batch["id"] if i not in table]
    if missing:
        raise ValueError(f"pair id {missing[0]!r} has no precomputed reference log-probs (the cache is stale: "
                         "delete it or set dpo.ref_cache_dir elsewhere)")
    values = torch.tensor([table[i] for i in batch["id"]], dtype=torch.float32, device=device)
    ones = torch.ones(len(values), device=device)
    return PairLogps(chosen=values[:, 0], rejected=values[:, 1], chosen_tokens=ones, rejected_tokens=ones)


def read_reference_cache(cache: str | Path) -> dict[str, list[float]] | None:
    """The table in `cache`, or None when there is none or it is not a whole one (cut off mid-write by a
    copy or an older writer, or not a table at all): then it is rebuilt, with a warning naming the file."""
    path = Path(cache)
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        table = saved["logps"]
        whole = (isinstance(table, dict) and saved.get("num_pairs") == len(table)
                 and all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v)
                         for v in table.values()))
        problem = None if whole else "its pair count or values do not add up"
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = f"{type(e).__name__}: {str(e)[:80]}"
    if problem is None:
        return table
    print0(f"reference log-probs: {path} is incomplete or corrupt ({problem}); computing them again")
    return None


def _warn_non_finite(table: dict[str, list[float]], split: str) -> None:
    """Say (before step 0) which pairs have a non-finite reference log-prob: every step holding one is skipped
    by the non-finite guard, so they never train (and a long run of them reaches train.max_bad_steps)."""
    bad = [pair_id for pair_id, values in table.items() if not all(math.isfinite(v) for v in values)]
    if bad:
        print0(f"warning: {len(bad)} of {len(table)} {split} pairs have non-finite reference log-probs (the reference "
               f"overflows on them; their steps will be skipped): {', '.join(map(str, bad[:20]))}"
               + (" ..." if len(bad) > 20 else ""))


@torch.no_grad()
def reference_table(accelerator, reference, loader, cache: str | Path | None = None, *,
                    split: str = "train") -> dict[str, list[float]]:
    """{pair id: [chosen, rejected] reference log-probs} for every pair of `loader` (all ranks), read from
    `cache` when it holds a whole table (`read_reference_cache`), else computed (each rank its share) and
    written there atomically (temporary file + rename)."""
    table = read_reference_cache(cache) if cache is not None else None
    if table is not None:
        print0(f"reference log-probs: {len(table)} pairs reused from {cache}")
        _warn_non_finite(table, split)
        return table
    rows = []
    with torch.random.fork_rng(devices=[]), reference() as ref_model:  # the data order of training is untouched
        for batch in tqdm(loader, desc="reference log-probs", disable=not accelerator.is_main_process,
                          dynamic_ncols=True):
            logps = pair_logps(ref_model, batch)
            rows += [(i, [c, r]) for i, c, r in zip(batch["id"], logps.chosen.tolist(), logps.rejected.tolist())]
    table = {}
    for pair_id, values in gather_lists(accelerator, rows):
        if table.setdefault(pair_id, values) != values:
            raise ValueError(f"two different pairs share the id {pair_id!r}; precompute_ref_log_probs keys pairs "
                             "by id: make the ids unique")
    if cache is not None and accelerator.is_main_process:
        cache = Path(cache)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"num_pairs": len(table), "logps": table}))
        os.replace(tmp, cache)
        print0(f"reference log-probs: {len(table)} pairs computed, cached in {cache}")
    accelerator.wait_for_everyone()
    _warn_non_finite(table, split)
    return table


# ------------------------------------------------------------------------------- eval and the loop
@dataclass
class DPOResult(LoopResult):
    metrics: list[dict] = field(default_factory=list)  # this run's per-step pair means (rewards, accuracy, ...)
    eval_metrics: list[tuple[int, dict]] = field(default_factory=list)  # (step, metrics); step 0 = before training
    reference: object = None  # the prepared Reference (None when the losses need none or it was precomputed)


def _pair_means(accelerator, sums: dict[str, torch.Tensor], num_pairs: torch.Tensor) -> dict[str, float]:
    """Every stat summed over all ranks and divided by the pairs: one collective for all of them."""
    names = sorted(sums)
    totals = accelerator.reduce(torch.stack([sums[n] for n in names] + [num_pairs.float()]), "sum").tolist()
    return {n: v / max(totals[-1], 1.0) for n, v in zip(names, totals[:-1])}


@torch.no_grad()
def evaluate(accelerator, model, loader, dpo_cfg, reference=None, table: dict | None = None) -> dict[str, float]:
    """Pair means of the loss, rewards, margin, accuracy and log-probs over the whole eval loader, all ranks."""
    model.eval()
    sums, count = defaultdict(lambda: torch.zeros((), device=accelerator.device)), torch.zeros((), device=accelerator.device)
    for batch in loader:
        ref = _table_logps(table, batch, accelerator.device) if table is not None else None
        _, stats = dpo_loss(model, batch, dpo_cfg, reference, num_pairs=1, ref_logps=ref)
        for name, values in stats.items():
            sums[name] += values.sum()
        count += batch["num_pairs"]
    model.train()
    return _pair_means(accelerator, sums, count)


def _eval_and_log(accelerator, model, loader, dpo_cfg, reference, table, step: int, output_dir) -> tuple[int, dict]:
    metrics = evaluate(accelerator, model, loader, dpo_cfg, reference, table)
    log_metrics(accelerator, output_dir, {f"eval/{k}": v for k, v in metrics.items()}, step)
    print0(f"eval step {step}: loss {metrics['loss']:.4f} | preference accuracy {metrics['rewards/accuracy']:.1%} | "
           f"margin {metrics['rewards/margin']:.4f}")
    return step, metrics


def train(accelerator, model, train_loader, train_cfg, optim_cfg, dpo_cfg, reference=None, eval_loader=None, *,
          max_bad_fraction: float = DataConfig.max_bad_fraction, ref_cache: dict | None = None) -> DPOResult:
    """Run DPO (train_cfg: TrainConfig, optim_cfg: OptimConfig, dpo_cfg: DPOSection). `reference` is a
    vltrain.build.Reference built before this call (prepared here, after the policy); `ref_cache`:
    {"train": path, "eval": path} for `dpo.precompute_ref_log_probs`."""
    tcfg, ga, world = train_cfg, accelerator.gradient_accumulation_steps, accelerator.num_processes
    assert ga == tcfg.gradient_accumulation_steps, "build the Accelerator with the config's accumulation steps"
    uses_reference = needs_reference(dpo_cfg.loss_type)
    if uses_reference and reference is None:
        raise ValueError(f"dpo.loss_type {dpo_cfg.loss_type} needs a reference model: pass "
                         "vltrain.build.build_reference(model, model_cfg)")
    skips = SkipLedger(max_bad_fraction, max(1, len(train_loader.dataset) // world))
    run = prepare_run(accelerator, model, train_loader, tcfg, optim_cfg, eval_loader)
    model, state = run.model, run.state
    reference = reference.prepare(accelerator, model) if uses_reference else None

    tables: dict[str, dict] = {}
    if uses_reference and dpo_cfg.precompute_ref_log_probs:
        for split, loader in (("train", run.train_loader), ("eval", run.eval_loader)):
            if loader is not None:
                tables[split] = reference_table(accelerator, reference, loader, (ref_cache or {}).get(split),
                                                split=split)
        reference = None  # never used again: a frozen copy is freed once the caller drops it too

    result = DPOResult(step=state.step, model=model, reference=reference)

    def run_eval(step: int) -> None:
        result.eval_metrics.append(_eval_and_log(accelerator, model, run.eval_loader, dpo_cfg, reference,
                                                 tables.get("eval"), step, tcfg.output_dir))

    if run.eval_loader is not None and state.step == 0:
        run_eval(0)  # before training: the baseline the final eval is compared with
    truncations: list[dict] = []
    guard, batches, bar = start_steps(accelerator, run, "dpo")
    with Preemption() as preemption:
        while state.step < run.num_steps:
            t0 = time.perf_counter()
            micro_batches = next_micro_batches(batches, state, ga)
            my_pairs = torch.tensor(sum(mb["num_pairs"] for mb in micro_batches), device=accelerator.device)
            num_pairs = accelerator.reduce(my_pairs.clone(), "sum")
            step_loss = torch.zeros((), device=accelerator.device)
            sums = defaultdict(lambda: torch.zeros((), device=accelerator.device))
            real_tokens, pair_ids = 0, []
            for mb in micro_batches:
                skips.add(mb.pop("skipped", []))
                truncations += mb.pop("truncated", [])
                pair_ids += mb["id"]
                real_tokens += int(mb["attention_mask"].sum()) if "attention_mask" in mb else mb["input_ids"].numel()
                ref_logps = _table_logps(tables["train"], mb, accelerator.device) if "train" in tables else None
                with accelerator.accumulate(model):
                    loss, stats = dpo_loss(model, mb, dpo_cfg, reference, num_pairs=num_pairs, ref_logps=ref_logps)
                    # accelerate divides by the accumulation steps and DDP averages over ranks: undo both so
                    # the gradient is that of the global pair mean.
                    backward(accelerator, model, loss * ga * world)
                    step_loss += loss.detach()
                for name, values in stats.items():
                    sums[name] += values.sum()
            step_loss, grad_norm, stepped = finish_step(accelerator, run, guard, optim_cfg.max_grad_norm, step_loss,
                                                        pair_ids)
            result.losses.append(step_loss)
            means = _pair_means(accelerator, sums, my_pairs)  # it sums the counts over the ranks itself
            result.metrics.append(means)
            seconds = time.perf_counter() - t0
            tokens_per_s = accelerator.reduce(torch.tensor(real_tokens, device=accelerator.device), "sum").item() / seconds
            log_step(accelerator, run, bar, {"loss": step_loss, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                                             "pairs_per_s": num_pairs.item() / seconds,
                                             **{k: v for k, v in means.items() if k != "loss"}}, stepped)
            bar.update(1)
            result.preempted = end_of_step(accelerator, run, preemption, skips, run_eval)
            if result.preempted:
                break
    bar.close()

    if run.eval_loader is not None and result.preempted is None:
        run_eval(state.step)
    return finish_result(accelerator, run, result, skips, truncations)
