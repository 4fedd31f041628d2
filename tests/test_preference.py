"""The DPO-family preference losses (vltrain.preference) against hand computation with plain `math`.

Every expected value below is written out per pair with python floats from the formulas in the module
docstring (and the papers), never by calling torch code; the batch has three pairs, one of which (pair 1)
the policy prefers the wrong way relative to the reference (h < 0) and one (pair 2) where chosen and
rejected have different lengths. CPU, well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch

from vltrain.preference import (LossType, PairLogps, PreferenceLoss, needs_reference, preference_loss,
                                validate_loss_options)

# Policy / reference log-probs (sums over supervised tokens) and token counts of three pairs.
PC = [-5.0, -8.0, -3.5]
PR = [-7.0, -6.0, -9.25]
RC = [-6.0, -7.5, -4.0]
RR = [-6.5, -7.0, -8.0]
NC = [5, 4, 3]
NR = [6, 3, 9]
BETA = 0.3
P = len(PC)


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log1mexp(x: float) -> float:
    return math.log(1 - math.exp(x))


def h(i: int) -> float:
    return (PC[i] - PR[i]) - (RC[i] - RR[i])


def hand_loss(loss_type: str, i: int, *, beta: float = BETA, eps: float = 0.0, gamma: float = 0.5) -> float:
    """Pair i's loss, from the formulas written out in python floats."""
    r_c, r_r = beta * (PC[i] - RC[i]), beta * (PR[i] - RR[i])
    mc, mr = PC[i] / NC[i], PR[i] / NR[i]
    if loss_type == "sigmoid":
        return -(1 - eps) * logsigmoid(beta * h(i)) - eps * logsigmoid(-beta * h(i))
    if loss_type == "robust":
        return (-(1 - eps) * logsigmoid(beta * h(i)) + eps * logsigmoid(-beta * h(i))) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h(i))
    if loss_type == "ipo":
        h_per_token = (PC[i] / NC[i] - PR[i] / NR[i]) - (RC[i] / NC[i] - RR[i] / NR[i])
        return (h_per_token - 1 / (2 * beta)) ** 2
    if loss_type == "bco_pair":
        rewards = [beta * (PC[j] - RC[j]) for j in range(P)] + [beta * (PR[j] - RR[j]) for j in range(P)]
        delta = sum(rewards) / len(rewards)
        return -logsigmoid(r_c - delta) - logsigmoid(-(r_r - delta))
    if loss_type == "sppo_hard":
        return (PC[i] - RC[i] - 1 / (2 * beta)) ** 2 + (PR[i] - RR[i] + 1 / (2 * beta)) ** 2
    if loss_type == "nca_pair":
        return -logsigmoid(r_c) - 0.5 * logsigmoid(-r_c) - 0.5 * logsigmoid(-r_r)
    if loss_type == "apo_zero":
        return (1 - sigmoid(r_c)) + sigmoid(r_r)
    if loss_type == "apo_down":
        return sigmoid(r_c) + (1 - sigmoid(r_c - r_r))
    if loss_type == "sft":
        return -PC[i] / NC[i]
    if loss_type == "simpo":
        return -logsigmoid(beta * (mc - mr) - gamma)
    if loss_type == "orpo":
        log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
        return -PC[i] / NC[i] - beta * logsigmoid(log_odds)
    raise AssertionError(loss_type)


def logps(chosen, rejected, chosen_tokens=NC, rejected_tokens=NR, requires_grad=False) -> PairLogps:
    return PairLogps(torch.tensor(chosen, dtype=torch.float32, requires_grad=requires_grad),
                     torch.tensor(rejected, dtype=torch.float32, requires_grad=requires_grad),
                     torch.tensor(chosen_tokens), torch.tensor(rejected_tokens))


def policy(requires_grad=True) -> PairLogps:
    return logps(PC, PR, requires_grad=requires_grad)


def reference(requires_grad=False) -> PairLogps:
    return logps(RC, RR, requires_grad=requires_grad)


def assert_close(actual: torch.Tensor, expected: list[float], rel=1e-5, abs=1e-6):
    assert actual.shape == (len(expected),)
    assert actual.detach().tolist() == pytest.approx(expected, rel=rel, abs=abs)


def test_the_batch_has_a_pair_preferring_the_rejected_one():
    assert h(1) < 0 < h(0) and h(2) > 0
    assert NC[2] != NR[2]


@pytest.mark.parametrize("beta", [BETA, 1.0])  # at beta 1.0 hinge's relu clips pair 2 (beta h = 1.75 > 1)
@pytest.mark.parametrize("loss_type", list(LossType))
def test_every_loss_matches_hand_computation(loss_type, beta):
    out = preference_loss(policy(), reference(), [loss_type], beta=beta)
    assert isinstance(out, PreferenceLoss)
    expected = [hand_loss(loss_type.value, i, beta=beta) for i in range(P)]
    if loss_type is LossType.HINGE:
        assert (min(expected) == 0) == (beta == 1.0)
    assert_close(out.loss, expected)
    assert list(out.components) == [loss_type.value]
    assert_close(out.components[loss_type.value], expected)
    assert out.loss.dtype == torch.float32


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_label_smoothing_matches_hand_computation_and_changes_the_loss(loss_type):
    smoothed = preference_loss(policy(), reference(), [loss_type], beta=BETA, label_smoothing=0.2).loss
    plain = preference_loss(policy(), reference(), [loss_type], beta=BETA).loss
    assert_close(smoothed, [hand_loss(loss_type, i, eps=0.2) for i in range(P)])
    assert not torch.allclose(smoothed, plain)


def test_robust_with_no_smoothing_equals_sigmoid():
    robust = preference_loss(policy(), reference(), ["robust"], beta=BETA).loss
    sigmoid_loss = preference_loss(policy(), reference(), ["sigmoid"], beta=BETA).loss
    torch.testing.assert_close(robust, sigmoid_loss)


def test_reference_free_losses_take_no_reference():
    out = preference_loss(policy(), None, ["simpo", "sft", "orpo"], beta=BETA)
    expected = [hand_loss("simpo", i) + hand_loss("sft", i) + hand_loss("orpo", i) for i in range(P)]
    assert_close(out.loss, expected)


def test_reference_free_losses_ignore_a_given_reference():
    with_reference = preference_loss(policy(), reference(), ["simpo", "orpo", "sft"], beta=BETA)
    without = preference_loss(policy(), None, ["simpo", "orpo", "sft"], beta=BETA)
    torch.testing.assert_close(with_reference.loss, without.loss)
    torch.testing.assert_close(with_reference.chosen_rewards, without.chosen_rewards)


def test_a_single_name_is_a_one_element_list():
    torch.testing.assert_close(preference_loss(policy(), reference(), "hinge", beta=BETA).loss,
                               preference_loss(policy(), reference(), [LossType.HINGE], beta=BETA).loss)


@pytest.mark.parametrize("loss_type", list(LossType))
def test_an_empty_micro_batch_gives_an_empty_loss(loss_type):
    """A micro-batch whose pairs were all skipped: (0,) values, a zero sum, and a backward that works."""
    pol = logps([], [], [], [], requires_grad=True)
    out = preference_loss(pol, logps([], [], [], []), [loss_type], beta=BETA)
    assert out.loss.shape == (0,) and out.chosen_rewards.shape == (0,)
    out.loss.sum().backward()
    assert pol.chosen.grad.shape == (0,)


@pytest.mark.parametrize("loss_type", [t for t in LossType if t.needs_reference])
def test_a_reference_needing_loss_without_reference_is_an_error(loss_type):
    with pytest.raises(ValueError, match=loss_type.value):
        preference_loss(policy(), None, ["sft", loss_type])


def test_values_are_per_pair_not_a_mean():
    """Pair 1 alone gives pair 1's value in the batch: nothing averages across pairs (bco_pair aside, whose
    shift is the batch's mean reward, as documented)."""
    for loss_type in LossType:
        if loss_type is LossType.BCO_PAIR:
            continue
        full = preference_loss(policy(), reference(), [loss_type], beta=BETA).loss
        alone = preference_loss(logps(PC[1:2], PR[1:2], NC[1:2], NR[1:2]), logps(RC[1:2], RR[1:2], NC[1:2], NR[1:2]),
                                [loss_type], beta=BETA).loss
        assert alone.shape == (1,)
        assert alone.item() == pytest.approx(full[1].item(), rel=1e-6), loss_type


@pytest.mark.parametrize("loss_type", [t for t in LossType if t.needs_reference])
def test_reference_gets_no_gradient(loss_type):
    ref = reference(requires_grad=True)
    pol = policy()
    preference_loss(pol, ref, [loss_type], beta=BETA).loss.sum().backward()
    assert ref.chosen.grad is None and ref.rejected.grad is None
    assert pol.chosen.grad is not None


@pytest.mark.parametrize("loss_type", list(LossType))
def test_loss_has_gradients_wrt_policy_and_rewards_are_detached(loss_type):
    pol = policy()
    out = preference_loss(pol, reference(), [loss_type], beta=BETA)
    assert out.loss.requires_grad and out.components[loss_type.value].requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.loss.sum().backward()
    assert torch.isfinite(pol.chosen.grad).all()
    assert (pol.chosen.grad != 0).any()
    if loss_type is not LossType.SFT:  # sft reads only the chosen sequence
        assert (pol.rejected.grad != 0).any()


def test_rewards_hand_computed():
    with_reference = preference_loss(policy(), reference(), ["sft", "sigmoid"], beta=BETA)
    assert_close(with_reference.chosen_rewards, [BETA * (PC[i] - RC[i]) for i in range(P)])
    assert_close(with_reference.rejected_rewards, [BETA * (PR[i] - RR[i]) for i in range(P)])
    reference_free = preference_loss(policy(), None, ["simpo"], beta=BETA)
    assert_close(reference_free.chosen_rewards, [BETA * PC[i] / NC[i] for i in range(P)])
    assert_close(reference_free.rejected_rewards, [BETA * PR[i] / NR[i] for i in range(P)])


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_sigmoid_gradient_matches_hand_derivative(eps):
    """d/dpc of -(1-eps) ls(beta h) - eps ls(-beta h) is -beta ((1-eps) sigmoid(-beta h) - eps sigmoid(beta h)),
    and d/dpr is its negative."""
    pol = policy()
    preference_loss(pol, reference(), ["sigmoid"], beta=BETA, label_smoothing=eps).loss.sum().backward()
    expected = [-BETA * ((1 - eps) * sigmoid(-BETA * h(i)) - eps * sigmoid(BETA * h(i))) for i in range(P)]
    assert_close(pol.chosen.grad, expected)
    assert_close(pol.rejected.grad, [-g for g in expected])


def test_bco_pair_shift_is_detached():
    """With the batch-mean shift held constant, d/dpc of -ls(r_c - delta) is -beta sigmoid(-(r_c - delta))."""
    pol = policy()
    preference_loss(pol, reference(), ["bco_pair"], beta=BETA).loss.sum().backward()
    rewards = [BETA * (PC[j] - RC[j]) for j in range(P)] + [BETA * (PR[j] - RR[j]) for j in range(P)]
    delta = sum(rewards) / len(rewards)
    assert_close(pol.chosen.grad, [-BETA * sigmoid(-(rewards[i] - delta)) for i in range(P)])
    assert_close(pol.rejected.grad, [BETA * sigmoid(rewards[P + i] - delta) for i in range(P)])


def test_one_sgd_step_lowers_sigmoid_loss_and_raises_the_margin():
    pol = policy()
    before = preference_loss(pol, reference(), ["sigmoid"], beta=BETA).loss
    before.sum().backward()
    lr = 1.0
    with torch.no_grad():
        stepped = logps((pol.chosen - lr * pol.chosen.grad).tolist(), (pol.rejected - lr * pol.rejected.grad).tolist())
    after = preference_loss(stepped, reference(), ["sigmoid"], beta=BETA).loss
    assert (after < before.detach()).all()
    assert ((stepped.chosen - stepped.rejected) > (pol.chosen - pol.rejected).detach()).all()


def test_weighted_combination_equals_the_weighted_sum_of_single_losses():
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.5]
    combined = preference_loss(policy(), reference(), types, weights, beta=BETA)
    singles = {t: preference_loss(policy(), reference(), [t], beta=BETA).loss for t in types}
    torch.testing.assert_close(combined.loss, sum(w * singles[t] for t, w in zip(types, weights)))
    assert list(combined.components) == types
    for t in types:  # components are unweighted
        torch.testing.assert_close(combined.components[t], singles[t])
    assert_close(combined.loss, [sum(w * hand_loss(t, i) for t, w in zip(types, weights)) for i in range(P)])


def test_default_weights_are_one():
    default = preference_loss(policy(), None, ["simpo", "sft"], beta=BETA).loss
    ones = preference_loss(policy(), None, ["simpo", "sft"], [1.0, 1.0], beta=BETA).loss
    torch.testing.assert_close(default, ones)
    assert_close(default, [hand_loss("simpo", i) + hand_loss("sft", i) for i in range(P)])


def test_ipo_is_length_normalised():
    """Doubling every token count and every log-prob (policy and reference) keeps the per-token means, so
    ipo is unchanged; sigmoid, on sums, is not (so the check can fail)."""
    double = [2 * n for n in NC], [2 * n for n in NR]
    doubled_policy = logps([2 * x for x in PC], [2 * x for x in PR], *double)
    doubled_reference = logps([2 * x for x in RC], [2 * x for x in RR], *double)
    for loss_type, unchanged in (("ipo", True), ("sigmoid", False)):
        base = preference_loss(policy(), reference(), [loss_type], beta=BETA).loss
        doubled = preference_loss(doubled_policy, doubled_reference, [loss_type], beta=BETA).loss
        assert torch.allclose(base, doubled) == unchanged, loss_type


def test_simpo_gamma_changes_simpo():
    base = preference_loss(policy(), None, ["simpo"], beta=BETA).loss
    wider = preference_loss(policy(), None, ["simpo"], beta=BETA, simpo_gamma=1.5).loss
    assert_close(wider, [hand_loss("simpo", i, gamma=1.5) for i in range(P)])
    assert (wider > base).all()  # a larger target margin is harder to meet


def test_loss_type_properties_and_needs_reference():
    assert {t.value for t in LossType if not t.needs_reference} == {"sft", "simpo", "orpo"}
    assert {t.value for t in LossType if t.uses_label_smoothing} == {"sigmoid", "robust"}
    assert {t.value for t in LossType if t.length_normalised} == {"ipo", "simpo", "orpo"}
    assert LossType("sigmoid") is LossType.SIGMOID and LossType.SIGMOID == "sigmoid"
    assert needs_reference(["simpo", "sigmoid"]) and needs_reference([LossType.HINGE])
    assert not needs_reference(["simpo", "sft", LossType.ORPO])
    with pytest.raises(ValueError, match="dpo.loss_type"):
        needs_reference(["dpo"])


def test_low_precision_inputs_are_computed_in_fp32():
    pol = PairLogps(torch.tensor(PC, dtype=torch.bfloat16), torch.tensor(PR, dtype=torch.bfloat16),
                    torch.tensor(NC), torch.tensor(NR))
    out = preference_loss(pol, reference(), ["sigmoid"], beta=BETA)
    assert out.loss.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32


def test_pair_logps_shapes_are_checked():
    with pytest.raises(ValueError, match="PairLogps"):
        PairLogps(torch.zeros(3), torch.zeros(2), torch.ones(3), torch.ones(3))


@pytest.mark.parametrize("chosen, rejected", [
    ([0.0, -1e-9, -1e4], [-1e4, 0.0, -1e-9]),  # exactly 0 (probability 1), a hair below 0, very negative
    ([-1e-30, -3.0, -5e5], [-2.0, -1e-7, -5e5]),
])
def test_orpo_is_finite_near_zero_and_very_negative(chosen, rejected):
    pol = logps(chosen, rejected, requires_grad=True)
    for loss_type in ("orpo", "simpo"):
        pol.chosen.grad = pol.rejected.grad = None
        loss = preference_loss(pol, None, [loss_type], beta=BETA).loss
        assert torch.isfinite(loss).all(), loss_type
        loss.sum().backward()
        assert torch.isfinite(pol.chosen.grad).all() and torch.isfinite(pol.rejected.grad).all(), loss_type


def test_orpo_log_odds_branch_near_zero_matches_hand_computation():
    """Mean log-probs on both sides of -ln 2 (the log(1 - exp) branch point), close to 0 included."""
    chosen, rejected, counts = [-0.05, -0.6, -0.9], [-0.8, -0.7, -0.01], [1, 1, 1]
    out = preference_loss(logps(chosen, rejected, counts, counts), None, ["orpo"], beta=BETA).loss
    expected = [-c - BETA * logsigmoid((c - r) - (log1mexp(c) - log1mexp(r))) for c, r in zip(chosen, rejected)]
    assert_close(out, expected)


# validate_loss_options: one test per error kind, each naming its config field.

def valid(**changes):
    options = dict(loss_types=["sigmoid"], weights=None, beta=0.1, label_smoothing=0.0, simpo_gamma=0.5)
    options.update(changes)
    return options


def test_valid_options_pass():
    validate_loss_options(**valid())
    validate_loss_options(**valid(loss_types=["sigmoid", "sft"], weights=[1.0, 0.0], label_smoothing=0.1))
    validate_loss_options(**valid(loss_types=["simpo"], simpo_gamma=1.0))
    validate_loss_options(**valid(loss_types=["robust"], label_smoothing=0.49))


def test_unknown_loss_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"dpo\.loss_type.*'dpo'.*sigmoid, hinge, ipo.*orpo"):
        validate_loss_options(**valid(loss_types=["sigmoid", "dpo"]))


def test_empty_loss_list():
    with pytest.raises(ValueError, match=r"dpo\.loss_type"):
        validate_loss_options(**valid(loss_types=[]))


def test_duplicate_loss_types():
    with pytest.raises(ValueError, match=r"dpo\.loss_type.*sigmoid.*more than once"):
        validate_loss_options(**valid(loss_types=["sigmoid", "sft", LossType.SIGMOID]))


def test_weights_length_must_match():
    with pytest.raises(ValueError, match=r"dpo\.loss_weights has 1 weights for 2"):
        validate_loss_options(**valid(loss_types=["sigmoid", "sft"], weights=[1.0]))


def test_negative_weights():
    with pytest.raises(ValueError, match=r"dpo\.loss_weights.*>= 0"):
        validate_loss_options(**valid(loss_types=["sigmoid", "sft"], weights=[1.0, -0.5]))


def test_all_zero_weights():
    with pytest.raises(ValueError, match=r"dpo\.loss_weights are all 0"):
        validate_loss_options(**valid(weights=[0.0]))


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_beta_must_be_positive(beta):
    with pytest.raises(ValueError, match=r"dpo\.beta"):
        validate_loss_options(**valid(beta=beta))


@pytest.mark.parametrize("label_smoothing", [-0.1, 0.5, 0.7])
def test_label_smoothing_range(label_smoothing):
    with pytest.raises(ValueError, match=r"dpo\.label_smoothing must be in \[0, 0\.5\)"):
        validate_loss_options(**valid(loss_types=["robust"], label_smoothing=label_smoothing))


@pytest.mark.parametrize("loss_types", [["hinge"], ["simpo"], ["ipo", "sft"]])
def test_label_smoothing_without_a_loss_that_uses_it(loss_types):
    with pytest.raises(ValueError, match=r"dpo\.label_smoothing=0\.1 is used by none"):
        validate_loss_options(**valid(loss_types=loss_types, label_smoothing=0.1))


def test_simpo_gamma_without_simpo():
    with pytest.raises(ValueError, match=r"dpo\.simpo_gamma=1\.0 only means something with simpo"):
        validate_loss_options(**valid(simpo_gamma=1.0))
    validate_loss_options(**valid(simpo_gamma=0.3, simpo_gamma_default=0.3))  # the config's own default is fine


def test_preference_loss_validates_its_options():
    with pytest.raises(ValueError, match=r"dpo\.label_smoothing"):
        preference_loss(policy(), reference(), ["hinge"], label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"dpo\.loss_weights"):
        preference_loss(policy(), reference(), ["hinge"], [1.0, 2.0])
