"""GRPO-family advantages and policy losses as pure functions on tensors.

`group_advantages(rewards, group_size, scale=...)` turns the rewards of a rollout batch into per-completion
advantages; `policy_loss(logps, old_logps, advantages, completion_mask, ...)` is one micro-batch's loss, divided
by a normaliser the GRPO loop computes for the whole optimizer step with `loss_normaliser` (summed over every
micro-batch and rank), so that gradient accumulation 2x1 == 1x2 exactly. Nothing here touches a model, an
Accelerator or a config: the loop (loops/grpo.py) generates once per optimizer step, slices the rollout into
micro-batches, computes the old log-probs once (`num_iterations` updates reuse them; with num_iterations == 1
they are `logps.detach()`), zeroes the completion_mask rows of truncated completions
(`mask_truncated_completions`) and calls these functions.

Formulas, checked against TRL 1.16 (trl/trainer/grpo_trainer.py `_generate_and_score_completions` and
`_compute_loss`, trl/trainer/grpo_config.py); deviations are marked DEVIATION.

Advantages, rewards r (N,) with each prompt's group_size completions contiguous:
  A = r - mean(group);  scale "group": A / (std(group) + eps);  "batch": A / (std(all N) + eps);  "none": A.
  std is the unbiased (Bessel-corrected, n - 1) standard deviation, as TRL's `nanstd`; eps = 1e-4 as TRL.
  A group of equal rewards has A = 0 (0 / (0 + eps)), never NaN. NaN rewards (a completion no reward function
  scored) are left out of the means and stds and get advantage 0, as TRL. A group (or batch) of one value has
  std 0 here (TRL: 0 as well, by its explicit branch).

Policy loss, per token t of sequence i (logps, old_logps, ref_logps (B, T); A_i (B,); m = completion_mask):
  log-ratio d = logps - old_logps.
  importance "token":    ratio_it = exp(d_it).
  importance "sequence" (GSPO, Zheng et al. 2025, arXiv:2507.18071): ratio_i = exp(sum_t m d / max(sum_t m, 1)),
      the same value on every token of sequence i (gradients flow to every token through the mean).
  clipped surrogate (grpo, bnpo, dr_grpo, dapo): s = min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A),
      per-token loss = -s. eps_high defaults to eps (DAPO, arXiv:2503.14476, recommends eps_high = 0.28).
  cispo (MiniMax-M1, arXiv:2506.13585): per-token loss = -sg(min(ratio, 1 + eps_high)) A logps, sg = detach:
      the gradient flows through logps only, with the capped importance weight as a constant.
      DEVIATION: TRL 1.16 caps the weight at `epsilon_high` itself (ScaleRL's eps_max, recommended 5.0), not at
      1 + epsilon_high; here the cap is 1 + epsilon_high, the same bound as every other loss type (MiniMax-M1's
      own form). TRL's epsilon_high=5.0 is epsilon_high=4.0 here. No lower cap (TRL: none either).
  KL (beta > 0): + beta * k3, k3 = exp(ref - logps) - (ref - logps) - 1 per token (Schulman's k3, as TRL).
      Not implemented: TRL's `use_bias_correction_kl` (k3 times the importance ratio).
Aggregation, with N = `normaliser` (the step's global value from `loss_normaliser`, or this micro-batch's):
  grpo:    sum_i [sum_t m l / max(sum_t m, 1)] / N,  N = number of sequences (a sequence's token mean, then a
           mean over sequences; a sequence masked as truncated counts in N with loss 0, as TRL's .mean()).
  dapo, cispo: sum_it m l / N, N = completion tokens in the whole step (TRL's num_items_in_batch).
  dr_grpo: sum_it m l / N, N = sequences * max_completion_length (Dr. GRPO, arXiv:2503.20783).
  bnpo:    sum_it m l / (completion tokens of THIS micro-batch) / N, N = number of micro-batches in the step.
           bnpo is by definition a per-micro-batch token mean (TRL: local token mean / gradient accumulation
           steps, then averaged over ranks by DDP), so `loss_normaliser` returns 1 per micro-batch and the loop's
           sum over micro-batches and ranks gives N = micro-batches * ranks: the step's loss is the mean of the
           micro-batch means, exactly TRL's bnpo. DEVIATION from the interface note ("dapo / bnpo: number of
           completion tokens"): a token count as N would make bnpo identical to dapo.
  Every N is clamped to >= 1 (a step whose completions were all masked gives loss 0, not NaN).
TRL's sapo, luspo, vespo, `delta` (two-sided clipping), off-policy masking, entropy masks and the vLLM
importance-sampling correction are not implemented.
"""

from __future__ import annotations

import enum
import math

import torch

__all__ = ["LossType", "ImportanceLevel", "RewardScale", "group_advantages", "loss_normaliser", "policy_loss"]


class RewardScale(str, enum.Enum):
    """How `group_advantages` divides the centred rewards (`grpo.scale_rewards`)."""

    GROUP = "group"
    BATCH = "batch"
    NONE = "none"


class LossType(str, enum.Enum):
    """The policy losses (`grpo.loss_type`); behaviour as properties, so loops never compare strings."""

    GRPO = "grpo"
    BNPO = "bnpo"
    DR_GRPO = "dr_grpo"
    DAPO = "dapo"
    CISPO = "cispo"

    @property
    def clipped_surrogate(self) -> bool:
        """Whether the loss is PPO's clipped surrogate min(ratio A, clip(ratio) A) (all but cispo)."""
        return self is not LossType.CISPO

    @property
    def sequence_mean_first(self) -> bool:
        """Whether each sequence's tokens are averaged before summing over sequences (grpo only)."""
        return self is LossType.GRPO

    @property
    def normaliser_unit(self) -> str:
        """What `loss_normaliser` counts: "sequences", "tokens", "padded_tokens" (sequences * max length) or
        "micro_batches" (bnpo, whose loss is a per-micro-batch token mean)."""
        return {LossType.GRPO: "sequences", LossType.BNPO: "micro_batches", LossType.DR_GRPO: "padded_tokens",
                LossType.DAPO: "tokens", LossType.CISPO: "tokens"}[self]


class ImportanceLevel(str, enum.Enum):
    """Where the importance ratio lives (`grpo.importance_sampling_level`): per token, or one per sequence (GSPO)."""

    TOKEN = "token"
    SEQUENCE = "sequence"

    def log_ratio(self, log_ratio: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) log importance weights from the per-token log-ratio (B, T): itself (TOKEN) or each sequence's
        masked token mean broadcast to its tokens (SEQUENCE)."""
        if self is ImportanceLevel.TOKEN:
            return log_ratio
        mask = completion_mask.to(log_ratio.dtype)
        mean = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        return mean.expand_as(log_ratio)


def _parse(enum_cls, value, field: str):
    try:
        return enum_cls(value)
    except ValueError:
        known = ", ".join(member.value for member in enum_cls)
        raise ValueError(f"{field}: unknown value {value!r}; known: {known}") from None


def _nanstd(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Unbiased std ignoring NaNs (keepdim); 0 where fewer than two values are present."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    present = ~torch.isnan(x)
    count = present.sum(dim=dim, keepdim=True) if dim is not None else present.sum().reshape(1, 1)
    squares = torch.where(present, (x - mean) ** 2, torch.zeros_like(x))
    squares = squares.sum(dim=dim, keepdim=True) if dim is not None else squares.sum().reshape(1, 1)
    return torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(squares))


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str | RewardScale = "group",
                     eps: float = 1e-4, batch_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) advantages from rewards (N,), N = prompts * group_size with each prompt's completions contiguous.

    A = r - mean(group), divided by std(group) + eps ("group"), std(batch) + eps ("batch") or nothing ("none");
    the batch is `batch_rewards` (M,) when given -- the loop passes every rank's rewards of the step, so the
    scale is that of the global batch -- else `rewards`. std unbiased, NaN rewards ignored and given advantage 0
    (module docstring). Returns fp32.
    ValueError when N is not a multiple of group_size, group_size < 1 or scale is unknown.
    """
    scale = _parse(RewardScale, scale, "grpo.scale_rewards")
    if group_size < 1:
        raise ValueError(f"grpo.num_generations (group_size) must be >= 1, got {group_size}")
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be (N,), got shape {tuple(rewards.shape)}")
    num = rewards.shape[0]
    if num % group_size != 0:
        raise ValueError(f"group_advantages: {num} rewards are not whole groups of grpo.num_generations="
                         f"{group_size}")
    grouped = rewards.float().view(-1, group_size)                              # (prompts, group_size)
    advantages = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale is RewardScale.GROUP:
        advantages = advantages / (_nanstd(grouped, dim=1) + eps)
    elif scale is RewardScale.BATCH:
        pool = grouped if batch_rewards is None else batch_rewards.float().to(grouped.device)
        advantages = advantages / (_nanstd(pool, dim=None) + eps)
    return torch.nan_to_num(advantages.reshape(num), nan=0.0)


def loss_normaliser(loss_type: str | LossType, completion_mask: torch.Tensor, *,
                    max_completion_length: int) -> torch.Tensor:
    """This micro-batch's share of the loss denominator, a 0-dim fp32 tensor on the mask's device.

    completion_mask (B, T). dapo / cispo: completion tokens; dr_grpo: B * max_completion_length; grpo: B;
    bnpo: 1 (one micro-batch; see the module docstring). The loop sums it over every micro-batch of the
    optimizer step and every rank and passes the sum to `policy_loss` as `normaliser`.
    """
    loss_type = _parse(LossType, loss_type, "grpo.loss_type")
    if completion_mask.dim() != 2:
        raise ValueError(f"loss_normaliser: completion_mask must be (B, T), got {tuple(completion_mask.shape)}")
    num_sequences = completion_mask.shape[0]
    # dr_grpo's constant is only a scale: a mask wider than max_completion_length (e.g. a template token after a
    # completion cut at the limit) is accepted, never an error mid-training.
    if loss_type is LossType.DR_GRPO and max_completion_length < 1:
        raise ValueError(f"grpo.max_completion_length must be >= 1, got {max_completion_length}")
    unit = loss_type.normaliser_unit
    if unit == "tokens":
        value = completion_mask.float().sum()
    elif unit == "padded_tokens":
        value = torch.tensor(float(num_sequences * max_completion_length))
    elif unit == "sequences":
        value = torch.tensor(float(num_sequences))
    else:
        assert unit == "micro_batches", unit
        value = torch.tensor(1.0)
    return value.to(device=completion_mask.device, dtype=torch.float32)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                completion_mask: torch.Tensor, *, loss_type: str | LossType = "dapo",
                importance: str | ImportanceLevel = "token", epsilon: float = 0.2,
                epsilon_high: float | None = None, beta: float = 0.0, ref_logps: torch.Tensor | None = None,
                normaliser: torch.Tensor | float | None = None,
                max_completion_length: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's policy loss (a scalar with gradients) and its detached stats.

    logps (B, T) fp32 with gradients: log-probs of the completion tokens under the current policy; old_logps
    (B, T): the same under the policy that generated the rollout (detached inside); advantages (B,);
    completion_mask (B, T), 1 on completion tokens, 0 on padding and on completions masked as truncated;
    ref_logps (B, T) or None (required when beta > 0; detached inside). Formulas in the module docstring.
    normaliser: the global `loss_normaliser` sum for the step; None -> this micro-batch's own (the loss is then
    the local mean); dr_grpo then needs max_completion_length (default: T, the mask's width).

    Stats, each a detached 0-dim fp32 SUM over this micro-batch's completion tokens (m = 1), so the loop can
    add them over micro-batches and ranks and divide by the global token count:
      "clip_low_sum":  tokens where the low clip was active: ratio < 1 - eps and A < 0 (the min picked the
                       clipped branch); always 0 for cispo.
      "clip_high_sum": tokens where the high clip was active: ratio > 1 + eps_high and A > 0; for cispo, tokens
                       whose weight was capped (ratio > 1 + eps_high, A != 0: the cap changes the gradient for
                       either sign; TRL's cispo_clip_ratio counts A > 0 only).
      "clip_sum":      clip_low_sum + clip_high_sum.
      "kl_sum":        sum of k3 KL to the reference (0 when there is no ref_logps; computed whenever ref_logps is
                       given, also at beta == 0).
      "ratio_sum":     sum of the importance ratio (for GSPO the sequence ratio, counted once per token).
      "num_tokens":    the number of completion tokens.
    At the sequence level a clipped sequence counts each of its tokens.
    """
    loss_type = _parse(LossType, loss_type, "grpo.loss_type")
    importance = _parse(ImportanceLevel, importance, "grpo.importance_sampling_level")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    for name, value in (("grpo.epsilon", epsilon), ("grpo.epsilon_high", epsilon_high), ("grpo.beta", beta)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if beta > 0 and ref_logps is None:
        raise ValueError(f"policy_loss: grpo.beta={beta} > 0 needs ref_logps (the reference model's log-probs)")
    if logps.dim() != 2:
        raise ValueError(f"policy_loss: logps must be (B, T), got {tuple(logps.shape)}")
    shapes = {"old_logps": old_logps.shape, "completion_mask": completion_mask.shape}
    if ref_logps is not None:
        shapes["ref_logps"] = ref_logps.shape
    for name, shape in shapes.items():
        if shape != logps.shape:
            raise ValueError(f"policy_loss: {name} is {tuple(shape)}, logps {tuple(logps.shape)}")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"policy_loss: advantages must be ({logps.shape[0]},), got {tuple(advantages.shape)}")

    logps = logps.float()
    mask = completion_mask.to(logps.dtype)
    adv = advantages.detach().to(logps.dtype).unsqueeze(1)                       # (B, 1)
    log_weights = importance.log_ratio(logps - old_logps.detach().float(), mask)  # (B, T)
    ratio = torch.exp(log_weights)
    high = 1 + epsilon_high
    if loss_type.clipped_surrogate:
        unclipped = ratio * adv
        clipped = torch.clamp(ratio, 1 - epsilon, high) * adv
        per_token = -torch.min(unclipped, clipped)
        clip_low = (ratio < 1 - epsilon) & (adv < 0)
        clip_high = (ratio > high) & (adv > 0)
    else:
        per_token = -torch.clamp(ratio, max=high).detach() * adv * logps
        clip_low = torch.zeros_like(mask, dtype=torch.bool)
        clip_high = (ratio > high) & (adv != 0)

    kl = None
    if ref_logps is not None:
        ref_minus = ref_logps.detach().float() - logps
        kl = torch.exp(ref_minus) - ref_minus - 1
        if beta > 0:
            per_token = per_token + beta * kl

    if normaliser is None:
        length = logps.shape[1] if max_completion_length is None else max_completion_length
        normaliser = loss_normaliser(loss_type, completion_mask, max_completion_length=length)
    normaliser = torch.as_tensor(normaliser, dtype=logps.dtype, device=logps.device).clamp(min=1.0)
    masked = per_token * mask
    if loss_type.sequence_mean_first:
        total = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    elif loss_type is LossType.BNPO:
        total = masked.sum() / mask.sum().clamp(min=1.0)
    else:
        total = masked.sum()
    loss = total / normaliser

    with torch.no_grad():
        clip_low_sum = (clip_low.to(mask.dtype) * mask).sum()
        clip_high_sum = (clip_high.to(mask.dtype) * mask).sum()
        stats = {
            "clip_low_sum": clip_low_sum,
            "clip_high_sum": clip_high_sum,
            "clip_sum": clip_low_sum + clip_high_sum,
            "kl_sum": (kl * mask).sum() if kl is not None else torch.zeros((), device=logps.device),
            "ratio_sum": (ratio * mask).sum(),
            "num_tokens": mask.sum(),
        }
    return loss, {name: value.detach() for name, value in stats.items()}
