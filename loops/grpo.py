"""Group relative policy optimisation (GRPO and its variants), one explicit accelerate loop.

    accelerate launch recipes/grpo.py [config.yaml] [section.field=value ...]

`train(accelerator, model, processor, train_loader, train_cfg, optim_cfg, grpo_cfg, rewards, reference, eval_prompts)`
takes built objects (a loader of vltrain.data.prompts batches, rewards from vltrain.rewards.load_rewards) and runs
the loop; export and `accelerator.end_training()` are the caller's. `grpo_loss(...)` is the per-micro-batch loss.

One round, top to bottom:
1. rollout: the step's prompts (train.micro_batch_size x accumulation per rank) get grpo.num_generations
   completions each from `Rollout` (HF generate, batched; the vision tower runs once per prompt:
   vltrain.generation.repeat_rows). Another engine plugs in as any callable (model, prompts) -> [Generation].
2. reward: every reward function is called as TRL calls it (vltrain.rewards.compute_rewards); the weighted
   total gives group-normalised advantages (vltrain.policy_gradient.group_advantages).
3. update: prompt + completion rows, packed like SFT packing when data.packing (the prompt's media once per
   group, vltrain.vision.shared_media), sliced into the step's micro-batches; old log-probs are computed once
   per round (only when grpo.num_iterations > 1: otherwise they are the current ones, detached), reference
   log-probs once per round when grpo.beta > 0; grpo.num_iterations optimizer steps reuse the round.
The loss of a step is normalised by the loss type's denominator summed over every micro-batch and rank of
the step (vltrain.policy_gradient.loss_normaliser), so accumulation 2 x 1 equals 1 x 2.

MoE families: the log-probs are computed without labels, so transformers adds no router auxiliary loss (it is
off in RL on purpose: its load-balancing loss is double-softmaxed, transformers #45120, and a nonzero
coefficient hurt RL accuracy on Qwen3.5 MoE, NeMo-RL #3169).

Faults as in SFT; checkpoints (train.save_every, a multiple of grpo.num_iterations) and signals are handled
between rounds. `grpo.beta` = 0 loads no reference.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vltrain.training import (LoopResult, end_of_step, finish_result, finish_step, log_metrics, log_step, next_micro_batches,
                              prepare_run, start_steps)
from vltrain.config import DataConfig
from vltrain.data.encode import IGNORE_INDEX, MEDIA_KEYS
from vltrain.data.pairs import collate_groups
from vltrain.data.skips import SkipLedger
from vltrain.distributed import gather_lists
from vltrain.faults import Preemption, backward
from vltrain.generation import Generation, GenerationSettings, generate_encoded
from vltrain.logprobs import sequence_ids, token_logprobs, token_logprobs_and_entropy
from vltrain.policy_gradient import group_advantages, loss_normaliser, policy_loss
from vltrain.rewards import compute_rewards, reward_stats, total_reward
from vltrain.tracking import print0
from vltrain.vision import shared_media


# ------------------------------------------------------------------------------- rollout
class Rollout:
    """The rollout engine: `rollout(model, prompts) -> [Generation]`, `num_generations` per prompt in prompt
    order (prompt 0's completions first). Built on vltrain.generation.generate_encoded (HF generate)."""

    def __init__(self, processor, settings: GenerationSettings, num_generations: int, batch_size: int = 8):
        self.processor, self.settings = processor, settings
        self.num_generations, self.batch_size = num_generations, batch_size

    def __call__(self, model, prompts: list[dict]) -> list[Generation]:
        return generate_encoded(model, self.processor, prompts, self.settings, num_generations=self.num_generations,
                                batch_size=self.batch_size, show_progress=False)


def rollout_settings(grpo_cfg, *, greedy: bool = False) -> GenerationSettings:
    if greedy:
        return GenerationSettings(max_new_tokens=grpo_cfg.max_completion_length)
    return GenerationSettings(max_new_tokens=grpo_cfg.max_completion_length, temperature=grpo_cfg.temperature,
                              top_p=grpo_cfg.top_p, top_k=grpo_cfg.top_k, min_p=grpo_cfg.min_p,
                              repetition_penalty=grpo_cfg.repetition_penalty)


def _cpu(example: dict) -> dict:
    return {k: v.cpu() if torch.is_tensor(v) else v for k, v in example.items()}


def training_batch(prompts: list[dict], generations: list[Generation], num_generations: int, *, rope_index,
                   pad_token_id: int, mask_truncated: bool = False) -> dict:
    """Prompt + completion rows for the update (S = len(prompts) x num_generations sequences, prompt order):
    labels are the completion tokens (its closing <|im_end|> included when it stopped), -100 on the prompt;
    packed when `rope_index` is given (vltrain.data.pairs.collate_groups: each prompt's media once), else
    padded. `completion_mask` (S,) is 0 for a truncated completion when `mask_truncated`."""
    sequences = []
    for k, prompt in enumerate(prompts):
        own = []
        for g in generations[k * num_generations:(k + 1) * num_generations]:
            completion = torch.tensor(g.token_ids or [pad_token_id], dtype=torch.long)
            own.append({"input_ids": torch.cat([prompt["input_ids"], completion]),
                        "labels": torch.cat([torch.full_like(prompt["input_ids"], IGNORE_INDEX), completion]),
                        "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion)])})
        sequences.append(own)
    media_only = [{k: v for k, v in p.items() if k in MEDIA_KEYS or k == "id"} for p in prompts]
    batch = collate_groups(media_only, sequences, rope_index=rope_index, pad_token_id=pad_token_id, known={"id"})
    keep = [0.0 if (mask_truncated and g.finish_reason == "length") or not g.token_ids else 1.0 for g in generations]
    return batch | {"completion_mask": torch.tensor(keep), "num_sequences": len(generations)}


def per_sequence(values: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token values at the completion positions (B, L) -> (S, T) padded per sequence, and its mask (S, T)."""
    seq, num = sequence_ids(batch)
    labels = batch["labels"].to(values.device)
    starts = torch.ones_like(seq, dtype=torch.bool)
    starts[:, 1:] = seq[:, 1:] != seq[:, :-1]
    keep = ((labels != IGNORE_INDEX) & ~starts.to(values.device)).reshape(-1)
    flat_seq = seq.to(values.device).reshape(-1)[keep]
    counts = torch.bincount(flat_seq, minlength=num)
    offsets = torch.cumsum(counts, 0) - counts
    position = torch.arange(flat_seq.numel(), device=values.device) - offsets[flat_seq]
    width = max(1, int(counts.max())) if num else 1
    out = values.new_zeros(num, width)
    mask = torch.zeros(num, width, device=values.device)
    out = out.index_put((flat_seq, position), values.reshape(-1)[keep])
    mask = mask.index_put((flat_seq, position), torch.ones_like(position, dtype=mask.dtype))
    return out, mask


def completion_logprobs(model, batch: dict, *, temperature: float = 1.0, with_entropy: bool = False):
    """(log-probs (S, T), mask (S, T), entropy (S, T) or None) of every completion token under `model`."""
    with shared_media(model, batch):
        if with_entropy:
            logps, entropy = token_logprobs_and_entropy(model, batch, temperature=temperature)
        else:
            logps, entropy = token_logprobs(model, batch, temperature=temperature), None
    out, mask = per_sequence(logps, batch)
    return out, mask, (per_sequence(entropy, batch)[0] if entropy is not None else None)


def grpo_loss(model, batch: dict, grpo_cfg, *, advantages, old_logps=None, ref_logps=None, normaliser=None,
              temperature: float = 1.0):
    """(loss, stats) of one micro-batch of completions: the clipped policy-gradient loss of `grpo.loss_type`
    (vltrain.policy_gradient.policy_loss) over its completion tokens, divided by `normaliser` (the step's);
    `old_logps` None = this forward's, detached (one update per rollout). Stats are sums (see policy_loss) plus
    "entropy_sum"."""
    logps, mask, entropy = completion_logprobs(model, batch, temperature=temperature, with_entropy=True)
    mask = mask * batch["completion_mask"].to(mask.device)[:, None]
    old = logps.detach() if old_logps is None else old_logps
    loss, stats = policy_loss(logps, old, advantages.to(logps.device), mask, loss_type=grpo_cfg.loss_type,
                              importance=grpo_cfg.importance_sampling_level, epsilon=grpo_cfg.epsilon,
                              epsilon_high=grpo_cfg.epsilon_high, beta=grpo_cfg.beta, ref_logps=ref_logps,
                              normaliser=normaliser)
    stats["entropy_sum"] = (entropy.detach() * mask).sum()
    return loss, stats


# ------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_rewards(accelerator, model, processor, prompts: list[dict], rewards, grpo_cfg, step: int) -> dict:
    """Mean reward (total and per reward) of greedy answers to `prompts` (this rank's share), all ranks."""
    mine = [_cpu(p) for p in prompts[accelerator.process_index:: accelerator.num_processes]]
    generations = generate_encoded(accelerator.unwrap_model(model), processor, mine, rollout_settings(grpo_cfg, greedy=True),
                                   num_generations=1, batch_size=grpo_cfg.generation_batch_size, show_progress=False)
    values = _rewards(rewards, mine, generations, 1, step) if mine else {r.name: [] for r in rewards}
    totals = total_reward(values, rewards).tolist() if mine else []
    records = gather_lists(accelerator, [{"total": t, **{n: v[i] for n, v in values.items()}} for i, t in enumerate(totals)])
    out = {"reward": sum(r["total"] for r in records) / max(1, len(records)), "num_prompts": len(records)}
    for reward in rewards:
        seen = [r[reward.name] for r in records if r[reward.name] is not None]
        out[f"rewards/{reward.name}"] = sum(seen) / len(seen) if seen else float("nan")
    return out


def _rewards(rewards, prompts, generations, num_generations, step, epoch: float = 0.0):
    """compute_rewards for a rollout: every prompt column repeated for its completions."""
    expand = lambda values: [v for v in values for _ in range(num_generations)]  # noqa: E731
    skip = set(MEDIA_KEYS) | {"input_ids", "mm_token_type_ids", "prompt", "id"}
    columns = {key: expand([p.get(key) for p in prompts]) for key in dict.fromkeys(k for p in prompts for k in p)
               if key not in skip}
    return compute_rewards(rewards, prompts=expand([p["prompt"] for p in prompts]),
                           completions=[[{"role": "assistant", "content": g.text}] for g in generations],
                           completion_ids=[g.token_ids for g in generations], columns=columns,
                           trainer_state={"step": step, "epoch": epoch}, step=step)


# ------------------------------------------------------------------------------- the loop
@dataclass
class GRPOResult(LoopResult):
    metrics: list[dict] = field(default_factory=list)  # this run's per-step metrics
    eval_rewards: list[tuple[int, dict]] = field(default_factory=list)  # (step, evaluate_rewards); step 0 = before
    reference: object = None  # the prepared Reference when grpo.beta > 0


def _slices(items: list, count: int) -> list[list]:
    size = -(-len(items) // count)
    return [items[i * size:(i + 1) * size] for i in range(count)]


def start_completions_log(path: Path, resumed_step: int) -> None:
    """completions.jsonl for a run starting at `resumed_step` (0: a fresh run, the file starts empty): a resumed
    run keeps the whole lines of steps <= resumed_step (the steps after it are done again) and drops a line cut
    by a kill. Rewritten through a temporary file and a rename, so a kill here never leaves half a log."""
    kept = []
    if resumed_step and path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and type(record.get("step")) is int and record["step"] <= resumed_step:
                kept.append(line + "\n")
    if not kept and not path.exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


def _log_completions(path: Path, step: int, prompts, generations, values, advantages, num_generations, limit: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for k, prompt in enumerate(prompts[:limit]):
            rows = range(k * num_generations, (k + 1) * num_generations)
            f.write(json.dumps({"step": step, "id": prompt["id"], "prompt": prompt["prompt"],
                                "completions": [generations[i].text for i in rows],
                                "rewards": {n: [v[i] for i in rows] for n, v in values.items()},
                                "advantages": [round(float(advantages[i]), 4) for i in rows]}) + "\n")


def train(accelerator, model, processor, train_loader, train_cfg, optim_cfg, grpo_cfg, rewards, reference=None,
          eval_prompts: list[dict] | None = None, *, packing: bool = True,
          max_bad_fraction: float = DataConfig.max_bad_fraction, rollout=None) -> GRPOResult:
    """Run GRPO (train_cfg: TrainConfig, optim_cfg: OptimConfig, grpo_cfg: GRPOSection, rewards: [Reward]).
    `reference` (vltrain.build.build_reference, before this call) is needed when grpo.beta > 0; `eval_prompts`:
    encoded held-out prompts scored greedily before and after; `rollout`: a custom engine (default `Rollout`)."""
    from vltrain.families import RopeIndex

    tcfg, ga, world = train_cfg, accelerator.gradient_accumulation_steps, accelerator.num_processes
    assert ga == tcfg.gradient_accumulation_steps, "build the Accelerator with the config's accumulation steps"
    if grpo_cfg.beta > 0 and reference is None:
        raise ValueError(f"grpo.beta={grpo_cfg.beta} needs a reference model: pass vltrain.build.build_reference(...)")
    G, iterations = grpo_cfg.num_generations, grpo_cfg.num_iterations
    skips = SkipLedger(max_bad_fraction, max(1, len(train_loader.dataset) // world))
    # one step = one micro-batch per accumulation step; a round of num_iterations steps shares one rollout
    run = prepare_run(accelerator, model, train_loader, tcfg, optim_cfg, steps_per_batch=grpo_cfg.num_iterations)
    model, state = run.model, run.state
    if grpo_cfg.beta > 0:
        reference.prepare(accelerator, model)
    rollout = rollout or Rollout(processor, rollout_settings(grpo_cfg), G, grpo_cfg.generation_batch_size)
    rope_index = RopeIndex(accelerator.unwrap_model(model).config) if packing else None
    pad = processor.tokenizer.pad_token_id
    temperature = grpo_cfg.temperature
    log_path = Path(tcfg.output_dir) / "completions.jsonl"
    if accelerator.is_main_process:
        start_completions_log(log_path, state.step)
    result = GRPOResult(step=state.step, model=model, reference=reference if grpo_cfg.beta > 0 else None)
    if eval_prompts and state.step == 0:
        result.eval_rewards.append((0, evaluate_rewards(accelerator, model, processor, eval_prompts, rewards, grpo_cfg, 0)))
        print0(f"held-out mean reward before training: {result.eval_rewards[-1][1]['reward']:.3f}")
        log_metrics(accelerator, tcfg.output_dir, {f"eval/{k}": v for k, v in result.eval_rewards[-1][1].items()},
                    result.eval_rewards[-1][0])

    guard, batches, bar = start_steps(accelerator, run, "grpo")
    with Preemption() as preemption:
        while state.step < run.num_steps:
            # 1. rollout: this rank's prompts of the whole step, one generate pass
            t0 = time.perf_counter()
            micro_batches = next_micro_batches(batches, state, ga)
            for mb in micro_batches:
                skips.add(mb.pop("skipped", []))
            prompts = [_cpu(p) for mb in micro_batches for p in mb["prompts"]]
            generations = rollout(accelerator.unwrap_model(model), prompts)
            t1 = time.perf_counter()
            # 2. rewards and advantages
            values = _rewards(rewards, prompts, generations, G, state.step + 1, state.epoch)
            totals = total_reward(values, rewards)
            every_rank = None
            if grpo_cfg.scale_rewards == "batch" and accelerator.num_processes > 1:  # the std of the global batch
                every_rank = torch.tensor([r for part in gather_lists(accelerator, [totals.tolist()]) for r in part])
            advantages = group_advantages(totals, G, scale=grpo_cfg.scale_rewards, batch_rewards=every_rank)
            t2 = time.perf_counter()
            # 3. update: the step's micro-batches of completions, the step's normaliser, num_iterations steps
            slices = _slices(list(range(len(prompts))), ga)
            updates = []
            for rows in slices:
                batch = training_batch([prompts[k] for k in rows], [generations[k * G + g] for k in rows for g in range(G)],
                                       G, rope_index=rope_index, pad_token_id=pad,
                                       mask_truncated=grpo_cfg.mask_truncated_completions)
                batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                seq_adv = torch.cat([advantages[k * G:(k + 1) * G] for k in rows]) if rows else advantages[:0]
                updates.append({"batch": batch, "advantages": seq_adv})
            with torch.no_grad():
                for u in updates:
                    if iterations > 1:
                        u["old"] = completion_logprobs(model, u["batch"], temperature=temperature)[0]
                    if grpo_cfg.beta > 0:
                        with reference() as ref_model:
                            u["ref"] = completion_logprobs(ref_model, u["batch"], temperature=temperature)[0]
            normaliser = sum(loss_normaliser(grpo_cfg.loss_type, _mask_of(u["batch"]), max_completion_length=
                                             grpo_cfg.max_completion_length) for u in updates)
            normaliser = accelerator.reduce(torch.as_tensor(normaliser, device=accelerator.device, dtype=torch.float32),
                                            "sum").clamp(min=1e-8)
            for iteration in range(iterations):
                if state.step >= run.num_steps:
                    break
                step_loss = torch.zeros((), device=accelerator.device)
                sums: dict[str, torch.Tensor] = {}
                for u in updates:
                    with accelerator.accumulate(model):
                        loss, stats = grpo_loss(model, u["batch"], grpo_cfg, advantages=u["advantages"],
                                                old_logps=u.get("old"), ref_logps=u.get("ref"), normaliser=normaliser,
                                                temperature=temperature)
                        backward(accelerator, model, loss * ga * world)  # undo accelerate's / DDP's averaging
                        step_loss += loss.detach()
                    for name, value in stats.items():
                        sums[name] = sums.get(name, 0) + value.detach().float()
                step_loss, grad_norm, stepped = finish_step(accelerator, run, guard, optim_cfg.max_grad_norm, step_loss,
                                                            [p["id"] for p in prompts])
                result.losses.append(step_loss)
                metrics = _step_metrics(accelerator, sums, values, totals, advantages, generations,
                                        timings=(t1 - t0, t2 - t1, time.perf_counter() - t2),
                                        max_completion_length=grpo_cfg.max_completion_length)
                result.metrics.append(metrics)
                log_step(accelerator, run, bar, {"loss": step_loss, "grad_norm": grad_norm, **metrics}, stepped)
                if (accelerator.is_main_process and grpo_cfg.log_completions and iteration == 0
                        and (state.step % tcfg.log_every == 0 or state.step == run.num_steps)):
                    _log_completions(log_path, state.step, prompts, generations, values, advantages, G,
                                     grpo_cfg.log_completions)
                bar.update(1)
            result.preempted = end_of_step(accelerator, run, preemption, skips)
            if result.preempted:
                break
    bar.close()

    if eval_prompts and result.preempted is None:
        result.eval_rewards.append((state.step, evaluate_rewards(accelerator, model, processor, eval_prompts, rewards,
                                                                 grpo_cfg, state.step)))
        print0(f"held-out mean reward after training: {result.eval_rewards[-1][1]['reward']:.3f}")
        log_metrics(accelerator, tcfg.output_dir, {f"eval/{k}": v for k, v in result.eval_rewards[-1][1].items()},
                    result.eval_rewards[-1][0])
    return finish_result(accelerator, run, result, skips, [])


def _mask_of(batch: dict) -> torch.Tensor:
    """(S, T) completion-token mask of a training batch (truncated completions zeroed when masked)."""
    labels = batch["labels"]
    _, mask = per_sequence(torch.zeros(labels.shape, device=labels.device), batch)
    return mask * batch["completion_mask"].to(mask.device)[:, None]


def _step_metrics(accelerator, sums, values, totals, advantages, generations, *, timings,
                  max_completion_length) -> dict[str, float]:
    """Pair the loss stats (summed over micro-batches and ranks) with the rollout's reward / length stats over
    every rank's completions (gathered: each rank generated for its own prompts); the `time/*` timings are this
    rank's, `rollout_tokens_per_s` the job's (every rank's completion tokens over the slowest rank's rollout)."""
    names = sorted(sums)
    reduced = accelerator.reduce(torch.stack([sums[n] for n in names]), "sum").tolist() if names else []
    totals_ = dict(zip(names, reduced))
    tokens = max(totals_.get("num_tokens", 1.0), 1.0)
    rows = gather_lists(accelerator, [
        {"total": t, "advantage": a, "length": len(g.token_ids), "cut": g.finish_reason == "length",
         **{n: v[i] for n, v in values.items()}}
        for i, (t, a, g) in enumerate(zip(totals.tolist(), advantages.tolist(), generations))])
    totals, advantages = torch.tensor([r["total"] for r in rows]), torch.tensor([r["advantage"] for r in rows])
    lengths = [r["length"] for r in rows]
    values = {n: [r[n] for r in rows] for n in values}
    rollout_s, reward_s, update_s = timings
    slowest_rollout_s = float(accelerator.gather(torch.tensor([rollout_s], device=accelerator.device)).max())
    out = {
        "reward": float(totals.mean()), "reward_std": float(totals.std()) if len(totals) > 1 else 0.0,
        "advantage_std": float(advantages.std()) if len(advantages) > 1 else 0.0,
        "completion_length": sum(lengths) / max(1, len(lengths)), "completion_length_max": max(lengths, default=0),
        "truncated_frac": sum(r["cut"] for r in rows) / max(1, len(rows)),
        "clip_frac": totals_.get("clip_sum", 0.0) / tokens, "kl": totals_.get("kl_sum", 0.0) / tokens,
        "entropy": totals_.get("entropy_sum", 0.0) / tokens,
        "time/rollout_s": rollout_s, "time/reward_s": reward_s, "time/update_s": update_s,
        "rollout_tokens_per_s": sum(lengths) / max(slowest_rollout_s, 1e-9),
    }
    for name, value in reward_stats(values).items():
        out[name] = value
    return out
