"""GRPO-family advantages and policy losses (vltrain.policy_gradient) against hand computation with plain `math`.

Every expected value is written out per token with python floats from the formulas in the module docstring
(TRL 1.16's GRPOTrainer math), never by calling the code under test. The batch has three sequences of
different lengths (masking), positive and negative advantages, and tokens on both sides of the clip range.
CPU, well under a second.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from vltrain.policy_gradient import (ImportanceLevel, LossType, group_advantages, loss_normaliser,
                                     policy_loss)

LOGPS = [[-1.0, -0.5, -2.0, -0.3],
         [-0.7, -1.2, -0.4, -0.9],
         [-0.2, -1.5, -0.8, -1.1]]
OLD = [[-1.1, -0.5, -1.5, -0.3],   # ratios 1.105, 1, 0.607 (A > 0: the low side is not clipped)
       [-0.9, -0.9, -0.4, -2.0],   # ratios 1.221 (A < 0: not clipped), 0.741 (A < 0: clipped low), 1, 3.0
       [-0.5, -1.4, -0.6, -1.0]]   # ratios 1.350 (A > 0: clipped high), 0.905
REF = [[-0.8, -0.6, -1.0, -3.0],
       [-0.7, -1.0, -0.9, -0.2],
       [-0.4, -1.5, -0.1, -0.5]]
MASK = [[1, 1, 1, 0],
        [1, 1, 1, 1],
        [1, 1, 0, 0]]
ADV = [1.0, -0.5, 0.8]
B, T = 3, 4
MAX_LEN = 6
EPS = 0.2


def t(rows, requires_grad=False):
    return torch.tensor(rows, dtype=torch.float32, requires_grad=requires_grad)


def tokens(i):
    return [j for j in range(T) if MASK[i][j]]


def ratio(i, j, level="token"):
    if level == "token":
        return math.exp(LOGPS[i][j] - OLD[i][j])
    ds = [LOGPS[i][k] - OLD[i][k] for k in tokens(i)]
    return math.exp(sum(ds) / len(ds))


def k3(i, j):
    x = REF[i][j] - LOGPS[i][j]
    return math.exp(x) - x - 1


def hand_token_loss(i, j, loss_type, *, level="token", eps=EPS, eps_high=None, beta=0.0):
    eps_high = eps if eps_high is None else eps_high
    r, a = ratio(i, j, level), ADV[i]
    if loss_type == "cispo":
        value = -min(r, 1 + eps_high) * a * LOGPS[i][j]
    else:
        value = -min(r * a, min(max(r, 1 - eps), 1 + eps_high) * a)
    return value + beta * k3(i, j)


def hand_loss(loss_type, **kw):
    per_seq = [[hand_token_loss(i, j, loss_type, **kw) for j in tokens(i)] for i in range(B)]
    num_tokens = sum(len(s) for s in per_seq)
    if loss_type == "grpo":
        return sum(sum(s) / len(s) for s in per_seq) / B
    if loss_type in ("dapo", "cispo", "bnpo"):
        return sum(map(sum, per_seq)) / num_tokens
    if loss_type == "dr_grpo":
        return sum(map(sum, per_seq)) / (B * MAX_LEN)
    raise AssertionError(loss_type)


def run(loss_type, *, logps=None, old=None, **kw):
    logps = t(LOGPS, requires_grad=True) if logps is None else logps
    old = t(OLD) if old is None else old
    loss, stats = policy_loss(logps, old, t(ADV), torch.tensor(MASK), loss_type=loss_type,
                              max_completion_length=MAX_LEN, **kw)
    return loss, stats, logps


# ---------------------------------------------------------------- advantages

REWARDS = [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 0.0, 3.0, 1.0]


def test_group_advantages_scale_group_by_hand():
    out = group_advantages(t(REWARDS), 3, scale="group")
    expected = []
    for g in range(3):
        group = REWARDS[3 * g:3 * g + 3]
        mean, std = statistics.mean(group), statistics.stdev(group)  # unbiased, as TRL
        expected += [(r - mean) / (std + 1e-4) for r in group]
    assert out.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert out[3:6].tolist() == [0.0, 0.0, 0.0]   # equal rewards: 0, not NaN
    assert out.dtype == torch.float32


def test_group_advantages_scale_batch_and_none_by_hand():
    std_all = statistics.stdev(REWARDS)
    means = [statistics.mean(REWARDS[3 * g:3 * g + 3]) for g in range(3)]
    centred = [r - means[k // 3] for k, r in enumerate(REWARDS)]
    assert group_advantages(t(REWARDS), 3, scale="batch").tolist() == pytest.approx(
        [c / (std_all + 1e-4) for c in centred], rel=1e-5, abs=1e-6)
    none = group_advantages(t(REWARDS), 3, scale="none")
    assert none.tolist() == pytest.approx(centred, rel=1e-6, abs=1e-6)
    assert not torch.isnan(none).any()


def test_group_advantages_batch_scale_uses_the_global_batch_when_given():
    """Under several ranks the loop passes every rank's rewards: the std is the global batch's, not this rank's."""
    mine, others = REWARDS[:6], [5.0, -3.0, 0.5]
    std_global = statistics.stdev(mine + others)
    means = [statistics.mean(mine[3 * g:3 * g + 3]) for g in range(2)]
    expected = [(r - means[k // 3]) / (std_global + 1e-4) for k, r in enumerate(mine)]
    got = group_advantages(t(mine), 3, scale="batch", batch_rewards=t(mine + others))
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert got.tolist() != pytest.approx(group_advantages(t(mine), 3, scale="batch").tolist(), rel=1e-3)


def test_group_advantages_nan_reward_gets_zero_and_leaves_the_baseline():
    out = group_advantages(t([1.0, float("nan"), 3.0, 2.0, 6.0, 4.0]), 3, scale="group")
    assert out[1].item() == 0.0
    assert out[:3].tolist() == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 0.0, 1 / (math.sqrt(2) + 1e-4)], rel=1e-5)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(t([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="grpo.scale_rewards"):
        group_advantages(t([1.0, 2.0]), 2, scale="median")


# ---------------------------------------------------------------- the losses

def test_the_batch_has_clipped_and_unclipped_tokens():
    assert ratio(2, 0) > 1 + EPS and ADV[2] > 0        # clipped high
    assert ratio(1, 1) < 1 - EPS and ADV[1] < 0        # clipped low
    assert ratio(1, 3) > 1 + EPS and ADV[1] < 0        # not clipped (the min keeps the unclipped branch)
    assert ratio(0, 2) < 1 - EPS and ADV[0] > 0        # not clipped


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", list(LossType))
def test_every_loss_type_matches_hand_computation(loss_type, level):
    loss, stats, _ = run(loss_type, importance=level)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(hand_loss(loss_type.value, level=level), rel=1e-5)
    assert stats["num_tokens"].item() == 9
    assert stats["ratio_sum"].item() == pytest.approx(
        sum(ratio(i, j, level) for i in range(B) for j in tokens(i)), rel=1e-5)
    assert all(not v.requires_grad for v in stats.values())


def test_loss_types_differ_on_this_batch():
    # bnpo equals dapo on one micro-batch by definition (they differ under accumulation, tested below)
    values = {lt: run(lt)[0].item() for lt in LossType if lt is not LossType.BNPO}
    assert len({round(v, 6) for v in values.values()}) == len(values)


def test_ratio_one_gives_minus_advantage_means():
    logps = t(LOGPS, requires_grad=True)
    lengths = [len(tokens(i)) for i in range(B)]
    expected = {
        "grpo": -sum(ADV) / B,
        "dapo": -sum(a * n for a, n in zip(ADV, lengths)) / sum(lengths),
        "bnpo": -sum(a * n for a, n in zip(ADV, lengths)) / sum(lengths),
        "dr_grpo": -sum(a * n for a, n in zip(ADV, lengths)) / (B * MAX_LEN),
    }
    for loss_type, value in expected.items():
        loss, stats, _ = run(loss_type, logps=logps, old=logps.detach())
        assert loss.item() == pytest.approx(value, rel=1e-6), loss_type
        assert stats["clip_sum"].item() == 0
        assert stats["ratio_sum"].item() == pytest.approx(9.0)


def test_clipping_stops_the_gradient_and_is_counted():
    loss, stats, logps = run("dapo")
    loss.backward()
    grad = logps.grad
    assert grad[2, 0].item() == 0.0                     # ratio > 1 + eps, A > 0
    assert grad[1, 1].item() == 0.0                     # ratio < 1 - eps, A < 0
    # an unclipped token: d(-r A / N) / d logp = -r A / N
    assert grad[1, 3].item() == pytest.approx(-ratio(1, 3) * ADV[1] / 9, rel=1e-5)
    assert grad[0, 2].item() == pytest.approx(-ratio(0, 2) * ADV[0] / 9, rel=1e-5)
    assert grad[0, 3].item() == 0.0                     # padding
    assert stats["clip_high_sum"].item() == 1 and stats["clip_low_sum"].item() == 1
    assert stats["clip_sum"].item() == 2


def test_epsilon_high_is_asymmetric():
    logps = t([[0.24, -0.3]], requires_grad=True)       # ratios exp(0.24) = 1.271, exp(-0.3) = 0.741
    old = t([[0.0, 0.0]])
    mask = torch.ones(1, 2)
    for adv, eps_high, clipped in [(1.0, None, 1), (1.0, 0.28, 0), (-1.0, 0.28, 1), (-1.0, None, 1)]:
        loss, stats = policy_loss(logps, old, t([adv]), mask, epsilon=0.2, epsilon_high=eps_high)
        if adv > 0:
            assert stats["clip_high_sum"].item() == clipped
            r = math.exp(0.24)
            first = min(r, 1 + (0.2 if eps_high is None else eps_high)) * adv
            second = math.exp(-0.3) * adv                  # A > 0, low side: unclipped
        else:
            assert stats["clip_low_sum"].item() == clipped and stats["clip_high_sum"].item() == 0
            first = math.exp(0.24) * adv                   # A < 0, high side: unclipped
            second = 0.8 * adv                             # clipped at 1 - eps whatever eps_high
        assert loss.item() == pytest.approx(-(first + second) / 2, rel=1e-5)


def test_sequence_ratio_is_exp_mean_log_ratio_on_every_token():
    d = t(LOGPS) - t(OLD)
    weights = torch.exp(ImportanceLevel.SEQUENCE.log_ratio(d, torch.tensor(MASK)))
    for i in range(B):
        expected = math.exp(statistics.mean(LOGPS[i][j] - OLD[i][j] for j in tokens(i)))
        for j in tokens(i):
            assert weights[i, j].item() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(ImportanceLevel.TOKEN.log_ratio(d, torch.tensor(MASK)), d)
    # GSPO gradient: every token of a sequence gets the same one, -A r_seq / N (dapo, unclipped here): the
    # sequence's n_i broadcast copies of the loss cancel the 1 / n_i of the mean log-ratio
    loss, stats, logps = run("dapo", importance="sequence", epsilon=10.0)
    loss.backward()
    for i in range(B):
        for j in tokens(i):
            assert logps.grad[i, j].item() == pytest.approx(-ADV[i] * ratio(i, 0, "sequence") / 9, rel=1e-5)
    assert stats["clip_sum"].item() == 0


def test_sequence_level_clipping_counts_every_token_of_the_sequence():
    _, stats, _ = run("dapo", importance="sequence", epsilon=0.01)
    # sequence ratios: seq0 exp(-0.4/3) < 0.99 with A > 0 (unclipped), seq1 exp(0.8/4) > 1.01 with A < 0
    # (unclipped), seq2 exp(0.2/2) > 1.01 with A > 0: clipped high, both its tokens
    assert stats["clip_high_sum"].item() == 2 and stats["clip_low_sum"].item() == 0


def test_cispo_gradient_through_logps_only_with_the_weight_capped():
    old = t(OLD, requires_grad=True)
    loss, stats, logps = run("cispo", old=old, epsilon_high=0.3)
    loss.backward()
    assert old.grad is None
    for i in range(B):
        for j in range(T):
            w = min(ratio(i, j), 1.3) if MASK[i][j] else 0.0
            assert logps.grad[i, j].item() == pytest.approx(-w * ADV[i] / 9, rel=1e-5, abs=1e-7)
    # capped: seq1 token 3 (3.0) and seq2 token 0 (1.35): the A sign does not matter
    assert stats["clip_high_sum"].item() == 2 and stats["clip_low_sum"].item() == 0
    assert loss.item() == pytest.approx(hand_loss("cispo", eps_high=0.3), rel=1e-5)


def test_kl_k3_by_hand_and_beta_needs_a_reference():
    beta = 0.05
    loss, stats, _ = run("dapo", beta=beta, ref_logps=t(REF))
    kl_sum = sum(k3(i, j) for i in range(B) for j in tokens(i))
    assert stats["kl_sum"].item() == pytest.approx(kl_sum, rel=1e-5)
    assert loss.item() == pytest.approx(hand_loss("dapo", beta=beta), rel=1e-5)
    assert loss.item() == pytest.approx(hand_loss("dapo") + beta * kl_sum / 9, rel=1e-5)
    # beta 0 with a reference: the KL is logged, not in the loss
    loss0, stats0, _ = run("dapo", ref_logps=t(REF))
    assert stats0["kl_sum"].item() == pytest.approx(kl_sum, rel=1e-5)
    assert loss0.item() == pytest.approx(hand_loss("dapo"), rel=1e-5)
    assert run("dapo")[1]["kl_sum"].item() == 0.0
    with pytest.raises(ValueError, match="ref_logps"):
        run("dapo", beta=0.1)


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo", "grpo", "cispo", "bnpo"])
def test_global_normaliser_makes_micro_batches_match_the_whole_batch(loss_type):
    gen = torch.Generator().manual_seed(0)
    logps_all = -torch.rand(4, 5, generator=gen) * 2
    old_all = logps_all + 0.3 * torch.randn(4, 5, generator=gen)
    adv_all = torch.tensor([1.0, -0.7, 0.4, -1.2])
    mask_all = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    kw = dict(loss_type=loss_type, epsilon_high=0.28, beta=0.04)
    ref_all = logps_all - 0.1

    whole = logps_all.clone().requires_grad_(True)
    whole_loss, whole_stats = policy_loss(whole, old_all, adv_all, mask_all, ref_logps=ref_all,
                                          max_completion_length=8, **kw)
    whole_loss.backward()

    split = logps_all.clone().requires_grad_(True)
    parts = [slice(0, 2), slice(2, 4)]
    normaliser = sum(loss_normaliser(loss_type, mask_all[p], max_completion_length=8) for p in parts)
    total, stats_sum = 0.0, {}
    for p in parts:
        loss, stats = policy_loss(split[p], old_all[p], adv_all[p], mask_all[p], ref_logps=ref_all[p],
                                  normaliser=normaliser, **kw)
        total = total + loss
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + v
    total.backward()
    for k, v in whole_stats.items():
        assert stats_sum[k].item() == pytest.approx(v.item(), rel=1e-6)
    if loss_type == "bnpo":   # by definition the mean of the micro-batch token means (module docstring)
        part_means = [policy_loss(logps_all[p], old_all[p], adv_all[p], mask_all[p], ref_logps=ref_all[p], **kw)[0]
                      for p in parts]
        assert normaliser.item() == 2
        assert total.item() == pytest.approx(sum(m.item() for m in part_means) / 2, rel=1e-6)
        assert total.item() != pytest.approx(whole_loss.item(), rel=1e-3)
        return
    assert total.item() == pytest.approx(whole_loss.item(), rel=1e-6)
    torch.testing.assert_close(split.grad, whole.grad, rtol=1e-6, atol=1e-8)


def test_loss_normaliser_values():
    mask = torch.tensor(MASK)
    assert loss_normaliser("dapo", mask, max_completion_length=MAX_LEN).item() == 9
    assert loss_normaliser("cispo", mask, max_completion_length=MAX_LEN).item() == 9
    assert loss_normaliser("dr_grpo", mask, max_completion_length=MAX_LEN).item() == B * MAX_LEN
    assert loss_normaliser("grpo", mask, max_completion_length=MAX_LEN).item() == B
    assert loss_normaliser("bnpo", mask, max_completion_length=MAX_LEN).item() == 1
    with pytest.raises(ValueError, match="max_completion_length"):
        loss_normaliser("dr_grpo", mask, max_completion_length=0)
    with pytest.raises(ValueError, match="grpo.loss_type"):
        loss_normaliser("ppo", mask, max_completion_length=MAX_LEN)


def test_all_masked_micro_batch_gives_zero_not_nan():
    logps = t(LOGPS, requires_grad=True)
    for loss_type in LossType:
        loss, stats = policy_loss(logps, t(OLD), t(ADV), torch.zeros(B, T), loss_type=loss_type)
        assert loss.item() == 0.0 and stats["num_tokens"].item() == 0


def test_bad_options_raise_naming_the_field():
    args = (t(LOGPS), t(OLD), t(ADV), torch.tensor(MASK))
    with pytest.raises(ValueError, match="grpo.importance_sampling_level"):
        policy_loss(*args, importance="sentence")
    with pytest.raises(ValueError, match="grpo.epsilon"):
        policy_loss(*args, epsilon=-0.1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(t(LOGPS), t(OLD), t(ADV[:2]), torch.tensor(MASK))


@pytest.mark.parametrize("loss_type", list(LossType))
def test_one_sgd_step_with_positive_advantage_raises_the_sequence_logps(loss_type):
    logps = t(LOGPS, requires_grad=True)
    adv = t([1.0, -1.0, 0.0])
    loss, _ = policy_loss(logps, logps.detach(), adv, torch.tensor(MASK), loss_type=loss_type)
    loss.backward()
    with torch.no_grad():
        stepped = logps - 0.1 * logps.grad
    mask = torch.tensor(MASK, dtype=torch.bool)
    assert (stepped[0][mask[0]] > logps[0][mask[0]]).all()     # A > 0: up
    assert (stepped[1][mask[1]] < logps[1][mask[1]]).all()     # A < 0: down
    assert torch.equal(stepped[2], logps[2].detach())          # A = 0: unchanged
