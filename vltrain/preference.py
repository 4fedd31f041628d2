"""DPO-family preference losses as pure functions on per-sequence log-probs: one value per pair, never a mean.

`preference_loss(policy, reference, loss_types, weights, beta=..., label_smoothing=..., simpo_gamma=...)`
takes the summed log-probs of the supervised tokens of each pair's chosen and rejected sequence (and their
token counts) for the policy and, where a selected loss needs one, the reference model, and returns the
weighted sum of the selected losses per pair (P,), each unweighted component (P,), and the detached
rewards. The DPO loop sums the per-pair losses over the micro-batches and ranks of an optimizer step and
divides by the number of pairs in the whole step (a global pair mean), which is why nothing here averages
over pairs. `validate_loss_options` checks the `dpo.*` config fields before anything loads.

Notation, per pair (every tensor (P,), fp32): pc, pr = policy log-probs of chosen / rejected (sums over the
supervised tokens); rc, rr = the same under the reference (0 for reference-free losses); nc, nr = token
counts; mc = pc / nc, mr = pr / nr (per-token means); h = (pc - pr) - (rc - rr); r_c = beta (pc - rc),
r_r = beta (pr - rr); eps = label_smoothing; ls = log(sigmoid(.)), computed with F.logsigmoid.

Losses (LossType), each checked against TRL 1.16 (trl/trainer/dpo_trainer.py `_compute_loss`; simpo from
trl/experimental/cpo, orpo from trl/experimental/orpo); deviations are marked DEVIATION:
- sigmoid, DPO (Rafailov et al. 2023, arXiv:2305.18290), with label smoothing = conservative DPO (cDPO,
  Mitchell 2023, "A note on DPO with noisy preferences"):  -(1 - eps) ls(beta h) - eps ls(-beta h).
  DEVIATION: TRL 1.16's DPOTrainer ignores label_smoothing for "sigmoid" (only robust / exo_pair / aot
  read it); here eps > 0 gives cDPO, as TRL's CPOTrainer "sigmoid" and older DPOTrainers do. eps = 0: same.
- robust, rDPO (Chowdhury et al. 2024, arXiv:2403.00409), eps = probability that a label is flipped:
  (-(1 - eps) ls(beta h) + eps ls(-beta h)) / (1 - 2 eps). Same as TRL. eps = 0 equals sigmoid.
- hinge, SLiC (Zhao et al. 2023, arXiv:2305.10425):  relu(1 - beta h). Same as TRL.
- ipo, IPO (Azar et al. 2023, arXiv:2310.12036, Eq. 17; beta is the paper's tau), length-normalised:
  (((pc - rc) / nc - (pr - rr) / nr) - 1 / (2 beta))^2, i.e. h computed from per-token means of policy and
  reference. Same as TRL (whose comment says the IPO authors confirmed this normalisation).
- bco_pair, BCO (Jung et al. 2024, arXiv:2404.04656):  delta = mean over the call's 2P values of
  [r_c, r_r], detached;  -ls(r_c - delta) - ls(-(r_r - delta)).
  DEVIATION: the paper (and older TRL) shift by a running mean of the rewards kept across steps; TRL 1.16
  uses no shift at all (delta = 0). A pure function has no running state, so delta is the mean over the
  pairs of this call. Consequence: a pair's value depends on the other pairs passed with it, so for
  bco_pair alone the loss changes with how a step is split into micro-batches.
- sppo_hard, SPPO with hard labels (Wu et al. 2024, arXiv:2405.00675, Eq. 4.7 with P = 1 for the winner
  and 0 for the loser):  (pc - rc - 1 / (2 beta))^2 + (pr - rr + 1 / (2 beta))^2. Same as TRL.
- nca_pair, NCA (Chen et al. 2024, arXiv:2402.05369):  -ls(r_c) - 0.5 ls(-r_c) - 0.5 ls(-r_r). Same as TRL.
- apo_zero, APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, Eq. 7):  (1 - sigmoid(r_c)) + sigmoid(r_r).
  apo_down (Eq. 8):  sigmoid(r_c) + (1 - sigmoid(r_c - r_r)). Both same as TRL.
- sft:  -pc / nc, the token-mean NLL of the chosen sequence (reference-free).
  DEVIATION: TRL averages over all chosen tokens of the batch and repeats that scalar per pair; here each
  pair has its own token mean, so in the global pair mean every pair weighs the same whatever its length.
- simpo, SimPO (Meng et al. 2024, arXiv:2405.14734), reference-free, length-normalised:
  -ls(beta (mc - mr) - gamma) with gamma = `simpo_gamma`, the target reward margin itself. This is TRL's
  CPOConfig.simpo_gamma (CPOTrainer subtracts gamma / beta from the log-ratio, then multiplies by beta);
  SimPO's own code takes gamma_beta_ratio = gamma / beta instead. DEVIATION: TRL's CPOTrainer also applies
  label smoothing to simpo; here simpo has none (label_smoothing > 0 with only simpo is refused). SimPO's
  paper uses beta around 2-10, not DPO's 0.1: beta is not rescaled here. TRL's `cpo_alpha` (an added NLL
  term) is ["simpo", "sft"] with the sft weight as alpha.
- orpo, ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 4-7), reference-free, length-normalised:
  log_odds = (mc - mr) - (log(1 - exp(mc)) - log(1 - exp(mr)));  -pc / nc - beta ls(log_odds) (beta is the
  paper's lambda). log(1 - exp(x)) is evaluated as log1p(-exp(x)) below -ln 2 and log(-expm1(x)) above
  (Maechler 2012, as TRL). DEVIATION: mc, mr are first clamped to <= -1e-6 (TRL does not clamp), where
  both branches and their gradients are finite (at mc = 0, a sequence of probability 1, log(1 - exp(mc))
  is -inf): a sequence whose per-token geometric-mean probability is above 1 - 1e-6 gets no odds-ratio
  gradient, its NLL term still has one. DEVIATION: TRL's NLL term is the batch token mean; here per pair.
Not implemented (TRL 1.16 has them): the losses exo_pair, aot, aot_unpaired, discopop and sigmoid_norm
(unknown names here), and DPOTrainer's f-divergence scores, WPO weighting and ld_alpha.

Rewards (detached, (P,)), for logging: beta (pc - rc) and beta (pr - rr) when any selected loss needs a
reference (TRL's DPOTrainer, ipo included); beta mc and beta mr when none does (TRL's CPO / ORPO trainers;
used for sft too).

A list of loss types combines with weights (default 1.0 each): loss = sum_i w_i component_i (TRL's
multi-loss `loss_type` + `loss_weights`, e.g. MPO = ["sigmoid", "bco_pair", "sft"] with [0.8, 0.2, 1.0]).
The reference log-probs are detached inside: no gradient reaches the reference whatever the caller passes.
Token counts are clamped to >= 1 (a data-layer invariant: samples without a supervised token are skipped;
checking it would cost a device sync per call).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossType", "PairLogps", "PreferenceLoss", "preference_loss", "needs_reference",
           "validate_loss_options", "SIMPO_GAMMA_DEFAULT"]

SIMPO_GAMMA_DEFAULT = 0.5
_MAX_MEAN_LOGP = -1e-6  # orpo: mean log-probs above this are clamped so log(1 - exp(m)) stays finite


class LossType(str, enum.Enum):
    """The preference losses; behaviour as properties, so loops never compare strings."""

    SIGMOID = "sigmoid"
    HINGE = "hinge"
    IPO = "ipo"
    ROBUST = "robust"
    BCO_PAIR = "bco_pair"
    SPPO_HARD = "sppo_hard"
    NCA_PAIR = "nca_pair"
    APO_ZERO = "apo_zero"
    APO_DOWN = "apo_down"
    SFT = "sft"
    SIMPO = "simpo"
    ORPO = "orpo"

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads the reference model's log-probs (False for sft, simpo, orpo)."""
        return self not in (LossType.SFT, LossType.SIMPO, LossType.ORPO)

    @property
    def uses_label_smoothing(self) -> bool:
        """Whether `label_smoothing` changes the loss (sigmoid: cDPO, robust: rDPO)."""
        return self in (LossType.SIGMOID, LossType.ROBUST)

    @property
    def length_normalised(self) -> bool:
        """Whether the loss compares chosen and rejected by per-token mean log-probs, not sums (ipo, simpo,
        orpo). sft is a token-mean NLL but compares nothing, so it is not listed."""
        return self in (LossType.IPO, LossType.SIMPO, LossType.ORPO)


@dataclass
class PairLogps:
    """Summed log-probs of the supervised tokens of each pair's chosen / rejected sequence and their token counts.

    All four are (P,), on one device; the log-probs fp32 (other float dtypes are cast to fp32 inside), the
    counts long or float and >= 1.
    """

    chosen: torch.Tensor           # (P,)
    rejected: torch.Tensor         # (P,)
    chosen_tokens: torch.Tensor    # (P,)
    rejected_tokens: torch.Tensor  # (P,)

    def __post_init__(self):
        shapes = {name: tuple(getattr(self, name).shape)
                  for name in ("chosen", "rejected", "chosen_tokens", "rejected_tokens")}
        if len(set(shapes.values())) != 1 or len(shapes["chosen"]) != 1:
            raise ValueError(f"PairLogps: chosen, rejected, chosen_tokens and rejected_tokens must all be (P,), "
                             f"got {shapes}")


@dataclass
class PreferenceLoss:
    """What `preference_loss` returns; every tensor (P,)."""

    loss: torch.Tensor                    # (P,) weighted sum of the components per pair, with gradients
    components: dict[str, torch.Tensor]   # loss-type name -> (P,) unweighted per-pair component, with gradients
    chosen_rewards: torch.Tensor          # (P,) detached
    rejected_rewards: torch.Tensor        # (P,) detached


@dataclass(frozen=True)
class _Pairs:
    """The per-pair quantities every loss is written in (module docstring notation); tensors (P,) fp32."""

    pc: torch.Tensor  # policy, chosen (sum), with gradients
    pr: torch.Tensor  # policy, rejected (sum)
    rc: torch.Tensor  # reference, chosen (sum), detached; zeros when there is no reference
    rr: torch.Tensor  # reference, rejected (sum)
    nc: torch.Tensor  # chosen token count, >= 1
    nr: torch.Tensor  # rejected token count, >= 1
    beta: float
    eps: float        # label_smoothing
    gamma: float      # simpo_gamma

    @property
    def h(self) -> torch.Tensor:
        """(P,) policy log-ratio minus reference log-ratio, from sums."""
        return (self.pc - self.pr) - (self.rc - self.rr)

    @property
    def r_c(self) -> torch.Tensor:
        """(P,) implicit reward of the chosen sequence, beta (pc - rc)."""
        return self.beta * (self.pc - self.rc)

    @property
    def r_r(self) -> torch.Tensor:
        """(P,) implicit reward of the rejected sequence, beta (pr - rr)."""
        return self.beta * (self.pr - self.rr)

    @property
    def mc(self) -> torch.Tensor:
        """(P,) per-token mean policy log-prob of the chosen sequence."""
        return self.pc / self.nc

    @property
    def mr(self) -> torch.Tensor:
        """(P,) per-token mean policy log-prob of the rejected sequence."""
        return self.pr / self.nr


def _sigmoid(x: _Pairs) -> torch.Tensor:
    z = x.beta * x.h
    return -(1 - x.eps) * F.logsigmoid(z) - x.eps * F.logsigmoid(-z)


def _robust(x: _Pairs) -> torch.Tensor:
    z = x.beta * x.h
    return (-(1 - x.eps) * F.logsigmoid(z) + x.eps * F.logsigmoid(-z)) / (1 - 2 * x.eps)


def _hinge(x: _Pairs) -> torch.Tensor:
    return torch.relu(1 - x.beta * x.h)


def _ipo(x: _Pairs) -> torch.Tensor:
    h_per_token = (x.pc - x.rc) / x.nc - (x.pr - x.rr) / x.nr
    return (h_per_token - 1 / (2 * x.beta)) ** 2


def _bco_pair(x: _Pairs) -> torch.Tensor:
    r_c, r_r = x.r_c, x.r_r
    delta = torch.cat([r_c, r_r]).mean().detach()  # the batch's mean reward (see the module docstring)
    return -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))


def _sppo_hard(x: _Pairs) -> torch.Tensor:
    half = 1 / (2 * x.beta)
    return (x.pc - x.rc - half) ** 2 + (x.pr - x.rr + half) ** 2


def _nca_pair(x: _Pairs) -> torch.Tensor:
    r_c, r_r = x.r_c, x.r_r
    return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)


def _apo_zero(x: _Pairs) -> torch.Tensor:
    return (1 - torch.sigmoid(x.r_c)) + torch.sigmoid(x.r_r)


def _apo_down(x: _Pairs) -> torch.Tensor:
    r_c = x.r_c
    return torch.sigmoid(r_c) + (1 - torch.sigmoid(r_c - x.r_r))


def _sft(x: _Pairs) -> torch.Tensor:
    return -x.mc


def _simpo(x: _Pairs) -> torch.Tensor:
    return -F.logsigmoid(x.beta * (x.mc - x.mr) - x.gamma)


def _log1mexp(m: torch.Tensor) -> torch.Tensor:
    """(P,) log(1 - exp(m)) for m <= _MAX_MEAN_LOGP < 0: log1p(-exp(m)) below -ln 2, log(-expm1(m)) above
    (Maechler 2012). Both branches are finite (with finite gradients) over that whole range, so the one
    `torch.where` does not select passes no NaN back."""
    return torch.where(m < -math.log(2), torch.log1p(-torch.exp(m)), torch.log(-torch.expm1(m)))


def _orpo(x: _Pairs) -> torch.Tensor:
    mc = x.mc.clamp(max=_MAX_MEAN_LOGP)
    mr = x.mr.clamp(max=_MAX_MEAN_LOGP)
    log_odds = (mc - mr) - (_log1mexp(mc) - _log1mexp(mr))
    return -x.mc - x.beta * F.logsigmoid(log_odds)


_LOSSES = {
    LossType.SIGMOID: _sigmoid, LossType.HINGE: _hinge, LossType.IPO: _ipo, LossType.ROBUST: _robust,
    LossType.BCO_PAIR: _bco_pair, LossType.SPPO_HARD: _sppo_hard, LossType.NCA_PAIR: _nca_pair,
    LossType.APO_ZERO: _apo_zero, LossType.APO_DOWN: _apo_down, LossType.SFT: _sft, LossType.SIMPO: _simpo,
    LossType.ORPO: _orpo,
}
assert set(_LOSSES) == set(LossType)


def _loss_types(loss_types: Sequence[str | LossType] | str | LossType) -> list[LossType]:
    """The loss types as LossType members (a single name is a one-element list); ValueError naming
    `dpo.loss_type` for an unknown name."""
    if isinstance(loss_types, str):  # LossType members are str too
        loss_types = [loss_types]
    parsed = []
    for name in loss_types:
        try:
            parsed.append(LossType(name))
        except ValueError:
            known = ", ".join(t.value for t in LossType)
            raise ValueError(f"dpo.loss_type: unknown loss {name!r}; known: {known}") from None
    return parsed


def needs_reference(loss_types: Sequence[str | LossType] | str | LossType) -> bool:
    """Whether any of the loss types needs the reference model's log-probs."""
    return any(t.needs_reference for t in _loss_types(loss_types))


def validate_loss_options(loss_types: Sequence[str | LossType] | str | LossType,
                          weights: Sequence[float] | None, *, beta: float, label_smoothing: float,
                          simpo_gamma: float, simpo_gamma_default: float = SIMPO_GAMMA_DEFAULT) -> None:
    """Check the `dpo.*` loss options; ValueError with a one-line message naming the field.

    No option is accepted and silently ignored: label_smoothing != 0 needs a selected loss that uses it,
    simpo_gamma != simpo_gamma_default needs simpo.
    """
    types = _loss_types(loss_types)
    if not types:
        raise ValueError("dpo.loss_type: at least one loss type is needed")
    duplicates = sorted({t.value for t in types if types.count(t) > 1})
    if duplicates:
        raise ValueError(f"dpo.loss_type: {', '.join(duplicates)} listed more than once (give one entry a larger "
                         f"weight in dpo.loss_weights instead)")
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(types):
            raise ValueError(f"dpo.loss_weights has {len(weights)} weights for {len(types)} loss types "
                             f"(dpo.loss_type={[t.value for t in types]})")
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"dpo.loss_weights must be finite and >= 0, got {weights}")
        if not any(w > 0 for w in weights):
            raise ValueError(f"dpo.loss_weights are all 0 (nothing would train), got {weights}")
    if not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"dpo.beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing != 0 and not any(t.uses_label_smoothing for t in types):
        users = ", ".join(t.value for t in LossType if t.uses_label_smoothing)
        raise ValueError(f"dpo.label_smoothing={label_smoothing} is used by none of dpo.loss_type="
                         f"{[t.value for t in types]} (only by {users}); set it to 0")
    if not math.isfinite(simpo_gamma):
        raise ValueError(f"dpo.simpo_gamma must be finite, got {simpo_gamma}")
    if simpo_gamma != simpo_gamma_default and LossType.SIMPO not in types:
        raise ValueError(f"dpo.simpo_gamma={simpo_gamma} only means something with simpo in dpo.loss_type "
                         f"(got {[t.value for t in types]}); drop it")


def preference_loss(policy: PairLogps, reference: PairLogps | None,
                    loss_types: Sequence[str | LossType] | str | LossType,
                    weights: Sequence[float] | None = None, *, beta: float = 0.1, label_smoothing: float = 0.0,
                    simpo_gamma: float = SIMPO_GAMMA_DEFAULT) -> PreferenceLoss:
    """Per-pair preference loss (P,): sum_i weights[i] * loss_types[i], formulas in the module docstring.

    policy: (P,) log-probs with gradients; reference: (P,) log-probs of the same sequences under the
    reference model (detached inside), or None when every selected loss is reference-free (ValueError
    otherwise); its token counts are not read (the sequences are the policy's). Reference-free losses never
    read `reference`. weights default to 1.0 each. The options are
    validated as `validate_loss_options` does. Returns per-pair values: the caller takes the global pair mean.
    """
    types = _loss_types(loss_types)
    validate_loss_options(types, weights, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
    weights = [1.0] * len(types) if weights is None else [float(w) for w in weights]
    uses_reference = any(t.needs_reference for t in types)
    if uses_reference and reference is None:
        needing = [t.value for t in types if t.needs_reference]
        raise ValueError(f"preference_loss: {', '.join(needing)} needs reference log-probs, got reference=None")

    pc, pr = policy.chosen.float(), policy.rejected.float()
    if reference is not None and uses_reference:
        if reference.chosen.shape != pc.shape:
            raise ValueError(f"preference_loss: reference has {tuple(reference.chosen.shape)} pairs, "
                             f"policy {tuple(pc.shape)}")
        rc, rr = reference.chosen.detach().float(), reference.rejected.detach().float()
    else:
        rc = rr = torch.zeros_like(pc)
    nc = policy.chosen_tokens.to(pc.dtype).clamp(min=1)
    nr = policy.rejected_tokens.to(pc.dtype).clamp(min=1)
    pairs = _Pairs(pc=pc, pr=pr, rc=rc, rr=rr, nc=nc, nr=nr, beta=beta, eps=label_smoothing, gamma=simpo_gamma)

    components = {t.value: _LOSSES[t](pairs) for t in types}
    loss = sum(w * components[t.value] for t, w in zip(types, weights, strict=True))
    with torch.no_grad():
        if uses_reference:
            chosen_rewards, rejected_rewards = pairs.r_c, pairs.r_r
        else:
            chosen_rewards, rejected_rewards = beta * pairs.mc, beta * pairs.mr
    return PreferenceLoss(loss=loss, components=components,
                          chosen_rewards=chosen_rewards.detach(), rejected_rewards=rejected_rewards.detach())
