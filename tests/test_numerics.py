"""Numerical faults in every loop (issue #16 item 3): the shared non-finite step guard (vltrain.faults) shown on
DPO, GRPO and classification through the tiny recipes, and the values each loss can turn non-finite.

A NaN is injected (a) in the loss with finite gradients (the loop's loss function is wrapped), (b) in the
gradients (the VLTRAIN_TEST_NAN_BACKWARD hook: the K-th backward of the process multiplied by NaN), (c) in the
precomputed DPO reference log-probs and (d) in a GRPO reward. Each bad step must change no weight, no optimizer
state and not the schedule, be counted (summary num_bad_steps) and logged with its step and sample ids, and the
run must finish and keep training; `train.max_bad_steps` bad steps in a row stop it with NonFiniteError. SFT is
shown in tests/test_faults.py. Every recipe run uses one micro-batch per step (accumulation 1), so backward
call K is step K's.

Edge cases that must never train silently on a non-finite value: equal group rewards (std 0), DPO log-prob
margins at the float32 limits and logits that overflow, the classification losses at saturated logits and
extreme label smoothing / class weights, GRPO importance ratios and KL terms that overflow (guarded: the step is
skipped, shown on a real optimizer step).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from accelerate import Accelerator

import vltrain.faults as faults
import vltrain.training as training
from vltrain.classification import class_balanced_weights, classification_loss
from vltrain.faults import NAN_HOOK_ENV, NonFiniteError, NonFiniteGuard, backward, optimizer_step
from vltrain.policy_gradient import group_advantages, policy_loss
from vltrain.preference import LossType, PairLogps, preference_loss
from vltrain.rewards import RewardError

from test_cls import cls_records
from test_cls import cls_config
from test_dpo import dpo_config, pair_records
from test_grpo import REWARD_FILE, grpo_config, prompt_records

STEPS = 5  # 4 samples, micro-batch 2: two steps an epoch, so the run crosses epochs too
BAD = 3    # the poisoned step (1-based)


# ------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _quiet(one_thread, monkeypatch):
    monkeypatch.setattr(faults, "_STATE", faults._BackwardState())  # the hook counts this test's backwards only
    monkeypatch.delenv(NAN_HOOK_ENV, raising=False)


def _tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """Every trainable weight and every optimizer state tensor (Adam moments and step counts)."""
    out = {f"w.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    inner = getattr(optimizer, "optimizer", optimizer)
    for i, state in enumerate(inner.state.values()):
        for key, value in state.items():
            out[f"s{i}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


class StepSpy:
    """Wraps the optimizer step the loops take (vltrain.training.optimizer_step) and records, per step, whether it
    was applied, how many weight / optimizer tensors changed and how far the scheduler moved."""

    def __init__(self, monkeypatch):
        self.steps: list[dict] = []
        real = training.optimizer_step

        def spy(accelerator, model, optimizer, scheduler, **kwargs):
            before, last_epoch, stepped = _tensors(model, optimizer), scheduler.last_epoch, None
            try:
                grad_norm, stepped = real(accelerator, model, optimizer, scheduler, **kwargs)
            finally:  # also when the guard raises NonFiniteError (stepped stays None)
                after = _tensors(model, optimizer)
                changed = [k for k in before.keys() | after.keys()
                           if k not in before or k not in after or not torch.equal(before[k], after[k])]
                self.steps.append({"step": kwargs["step"], "ids": list(kwargs["sample_ids"]), "stepped": stepped,
                                   "loss": float(kwargs["loss"]), "num_changed": len(changed),
                                   "num_tensors": len(after), "scheduler": scheduler.last_epoch - last_epoch})
            return grad_norm, stepped

        monkeypatch.setattr(training, "optimizer_step", spy)

    def check_skipped(self, bad_steps: set[int]) -> None:
        """The bad steps changed nothing and left the schedule; every other step updated every weight."""
        assert [s["step"] for s in self.steps] == list(range(1, len(self.steps) + 1))
        for s in self.steps:
            if s["step"] in bad_steps:
                assert not s["stepped"] and s["num_changed"] == 0 and s["scheduler"] == 0, s
            else:
                assert s["stepped"] and s["scheduler"] == 1 and math.isfinite(s["loss"]), s
                assert s["num_changed"] > 0, s


def _poison_call(monkeypatch, module, name: str, bad_call: int, where) -> list[int]:
    """Wrap `module.name` so that its `bad_call`-th call (1-based) returns a NaN loss; `where(out)` adds the NaN
    to the output's loss (finite gradients: d(loss + nan) = d loss). Returns the call counter."""
    real, calls = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        return where(out) if calls[0] == bad_call else out

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _write(folder, name, records):
    path = folder / name
    path.write_text(json.dumps(records))
    return path


def _nan_reward_file(folder, bad_call: int):
    (folder / "nan_rewards.py").write_text(
        "CALLS = [0]\n\n"
        "def odd_reward(completions, completion_ids, **kwargs):\n"
        "    CALLS[0] += 1\n"
        "    values = [sum(i % 2 for i in ids) / max(1, len(ids)) for ids in completion_ids]\n"
        f"    return [float('nan')] + values[1:] if CALLS[0] == {bad_call} else values\n")
    return folder / "nan_rewards.py"


def _run(loop: str, tmp_path, media_dir, **overrides) -> dict:
    """The loop's tiny recipe on its 4-sample fixture data, STEPS steps, micro-batch 2, accumulation 1."""
    common = {"train.max_steps": STEPS, "train.micro_batch_size": 2, "train.save_every": 0}
    common.update(overrides)
    if loop == "dpo":
        from recipes.dpo import main
        return main(dpo_config(tmp_path, _write(media_dir, "pairs.json", pair_records()), **common))
    if loop == "cls":
        from recipes.cls import main
        return main(cls_config(tmp_path, _write(media_dir, "cls.json", cls_records()), **common))
    assert loop == "grpo", loop
    from recipes.grpo import main
    (media_dir / "my_rewards.py").write_text(REWARD_FILE)
    common.setdefault("grpo.rewards", f"[{media_dir / 'my_rewards.py'}]")
    return main(grpo_config(tmp_path, _write(media_dir, "prompts.json", prompt_records()),
                            **{"grpo.num_generations": 2, "grpo.max_completion_length": 4, **common}))


def _nan_loss(loop: str, monkeypatch) -> None:
    """Step BAD's loss becomes NaN (its gradients stay finite) inside the loop's own loss function."""
    import loops.cls
    import loops.dpo
    import loops.grpo

    if loop == "dpo":
        _poison_call(monkeypatch, loops.dpo, "preference_loss", BAD,
                     lambda out: dataclasses.replace(out, loss=out.loss + float("nan")))
    elif loop == "cls":
        _poison_call(monkeypatch, loops.cls, "classification_loss", BAD, lambda out: out + float("nan"))
    else:
        _poison_call(monkeypatch, loops.grpo, "policy_loss", BAD, lambda out: (out[0] + float("nan"), out[1]))


def _skip_warnings(output: str, step: int) -> list[str]:
    """The guard's warnings for `step` in a recipe's output (the recipe logs to stdout)."""
    return [line for line in output.splitlines() if f"vltrain.faults: step {step} skipped" in line]


# ------------------------------------------------------------------------------- the guard, every loop
@pytest.mark.parametrize("where", ["loss", "gradient"])
@pytest.mark.parametrize("loop", ["dpo", "grpo", "cls"])
def test_a_nan_step_is_skipped_counted_logged_and_the_run_finishes(loop, where, tmp_path, media_dir, monkeypatch,
                                                                  capsys):
    spy = StepSpy(monkeypatch)
    if where == "loss":
        _nan_loss(loop, monkeypatch)
    else:
        monkeypatch.setenv(NAN_HOOK_ENV, str(BAD))
    summary = _run(loop, tmp_path, media_dir)
    assert summary["steps"] == STEPS and summary["num_bad_steps"] == 1
    spy.check_skipped({BAD})
    bad = spy.steps[BAD - 1]
    assert not math.isfinite(bad["loss"]) if where == "loss" else True  # a NaN gradient: the norm decides
    output = capsys.readouterr().out
    [warning] = _skip_warnings(output, BAD)
    assert all(i in warning for i in bad["ids"]) and bad["ids"], warning  # the step's sample ids are named
    step_lines = [line for line in output.splitlines() if "| loss" in line]
    assert [("skipped (non-finite)" in line) for line in step_lines] == [s == BAD for s in range(1, STEPS + 1)]
    assert (tmp_path / "out" / "final").is_dir()  # exported: the run finished
    finite = [loss for step, loss in enumerate(summary["losses"], 1) if step != BAD]
    assert all(math.isfinite(loss) for loss in finite)


@pytest.mark.parametrize("loop", ["dpo", "grpo", "cls"])
def test_max_bad_steps_in_a_row_stop_the_run_with_a_clear_error(loop, tmp_path, media_dir, monkeypatch):
    spy = StepSpy(monkeypatch)
    monkeypatch.setenv(NAN_HOOK_ENV, "2,3")
    expected = r"2 non-finite steps in a row \(steps 2-3\).*train\.max_bad_steps=2"
    with pytest.raises(NonFiniteError, match=expected) as info:
        _run(loop, tmp_path, media_dir, **{"train.max_bad_steps": 2})
    assert "\n" not in str(info.value)
    assert [s["stepped"] for s in spy.steps] == [True, False, None]  # step 3 raised
    assert all(s["num_changed"] == 0 and s["scheduler"] == 0 for s in spy.steps[1:])


def test_a_nan_in_the_precomputed_reference_log_probs_skips_that_pairs_steps(tmp_path, media_dir, monkeypatch, capsys):
    """The table (computed by the reference before step 0) holds NaN for one pair: each step holding that pair
    is skipped and names it, the others train."""
    import loops.dpo

    real, poisoned = loops.dpo.reference_table, "img"

    def table_with_a_nan(*args, **kwargs):
        table = real(*args, **kwargs)
        table[poisoned] = [float("nan"), table[poisoned][1]]
        return table

    monkeypatch.setattr(loops.dpo, "reference_table", table_with_a_nan)
    spy = StepSpy(monkeypatch)
    summary = _run("dpo", tmp_path, media_dir, **{"dpo.precompute_ref_log_probs": "true", "train.micro_batch_size": 1,
                                                  "train.max_steps": 6})
    bad = {s["step"] for s in spy.steps if poisoned in s["ids"]}
    # 4 pairs, one a step: epoch 1 is steps 1-4, so the pair is met once or twice (epoch 2 is reshuffled)
    assert 1 <= len(bad) <= 2 and summary["steps"] == 6 and summary["num_bad_steps"] == len(bad)
    spy.check_skipped(bad)
    output = capsys.readouterr().out
    for step in bad:
        [warning] = _skip_warnings(output, step)
        assert f"samples: {poisoned}" in warning


def test_reference_table_names_pairs_whose_log_probs_are_not_finite(tmp_path, media_dir, capsys):
    """A reference that overflows on a pair is said before step 0, naming the pair (its steps will be skipped)."""
    from loops.dpo import _warn_non_finite

    _warn_non_finite({"a": [-1.0, -2.0], "b": [float("nan"), -1.0], "c": [-1.0, float("-inf")]}, "train")
    out = capsys.readouterr().out
    assert "2 of 3 train pairs" in out and "b, c" in out and "a," not in out


def test_a_nan_reward_stops_grpo_naming_the_reward_and_the_step(tmp_path, media_dir):
    """vltrain.rewards refuses a NaN reward: the run stops with one line naming the reward, its file and the step
    (None is the way to say "not applicable"); no optimizer step has seen it."""
    path = _nan_reward_file(media_dir, bad_call=2)
    with pytest.raises(RewardError) as info:
        _run("grpo", tmp_path, media_dir, **{"grpo.rewards": f"[{path}]"})
    message = str(info.value)
    assert "\n" not in message and "odd_reward" in message and "at step 2" in message and "nan" in message
    assert "return None" in message


def test_equal_group_rewards_give_zero_advantages_and_a_finite_step(tmp_path, media_dir, monkeypatch):
    """A constant reward: every group has std 0, so A = 0 / (0 + eps) = 0 everywhere; the loss is 0 and finite
    and no step is counted bad."""
    (media_dir / "constant.py").write_text("def same_reward(completions, **kwargs):\n"
                                           "    return [1.0] * len(completions)\n")
    spy = StepSpy(monkeypatch)
    summary = _run("grpo", tmp_path, media_dir, **{"grpo.rewards": f"[{media_dir / 'constant.py'}]",
                                                   "train.max_steps": 2})
    assert summary["num_bad_steps"] == 0 and all(s["stepped"] for s in spy.steps)
    assert summary["losses"] == [0.0, 0.0]
    for scale in ("group", "batch", "none"):
        advantages = group_advantages(torch.full((8,), 3.0), 4, scale=scale)
        assert torch.equal(advantages, torch.zeros(8))
    # a group whose rewards are all None (NaN here) has no signal: advantage 0, never NaN
    mixed = torch.tensor([float("nan")] * 4 + [0.0, 1.0, 0.0, 1.0])
    advantages = group_advantages(mixed, 4)
    assert torch.isfinite(advantages).all() and torch.equal(advantages[:4], torch.zeros(4))


# ------------------------------------------------------------------------------- what each loss can make non-finite
def _logps(chosen, rejected, requires_grad=False):
    chosen = torch.tensor(chosen, dtype=torch.float32, requires_grad=requires_grad)
    rejected = torch.tensor(rejected, dtype=torch.float32, requires_grad=requires_grad)
    return PairLogps(chosen=chosen, rejected=rejected, chosen_tokens=torch.tensor([3, 50, 1]),
                     rejected_tokens=torch.tensor([3, 1, 50]))


@pytest.mark.parametrize("loss_type", [t.value for t in LossType])
def test_every_preference_loss_is_finite_with_finite_gradients_at_extreme_margins(loss_type):
    """Margins of +-1e4 nats (sigmoid saturated both ways) and a sequence of probability ~1 (logp -1e-9): every
    loss and its gradient stay finite (log-sigmoid, not log(sigmoid); orpo clamps its log-odds)."""
    policy = _logps([-1e-9, -5e3, -1e4], [-1e4, -1e-9, -5e3], requires_grad=True)
    reference = _logps([-1e4, -1e-9, -1e4], [-1e-9, -1e4, -1e-9])
    ls = 0.1 if LossType(loss_type).uses_label_smoothing else 0.0
    out = preference_loss(policy, reference, loss_type, beta=0.1, label_smoothing=ls)
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all(), out.loss
    grads = [g for g in (policy.chosen.grad, policy.rejected.grad) if g is not None]  # sft reads chosen only
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_overflowing_logits_give_a_non_finite_dpo_loss_that_the_guard_skips():
    """The log-prob op (vltrain.logprobs) is exact for huge finite fp32 logits (1e30: log-softmax subtracts the
    max), so DPO stays finite there; bf16 logits that overflow (past 3.4e38: inf) give NaN log-probs, never a
    finite-looking loss, and the loop's guard skips that step (a real optimizer step: nothing changes)."""
    from vltrain.logprobs import chunked_target_logprobs

    targets = torch.tensor([1, 2, 0, 3])
    big = torch.nn.Parameter(torch.tensor([[1e15], [-1e15], [1.0], [2e15]]))  # (V=4, H=1): logits ~1e30
    hidden = torch.full((4, 1), 1e15)
    logp = chunked_target_logprobs(hidden, big, None, targets)
    assert torch.isfinite(logp).all() and logp.min() < -1e29
    policy = PairLogps(chosen=logp[:2].sum()[None], rejected=logp[2:].sum()[None], chosen_tokens=torch.tensor([2]),
                       rejected_tokens=torch.tensor([2]))
    zero = PairLogps(chosen=torch.zeros(1), rejected=torch.zeros(1), chosen_tokens=torch.tensor([2]),
                     rejected_tokens=torch.tensor([2]))
    finite = preference_loss(policy, zero, "sigmoid").loss
    finite.sum().backward()
    assert torch.isfinite(finite).all() and torch.isfinite(big.grad).all()

    weight = torch.nn.Parameter(torch.tensor([[3e38], [1.0], [-3e38], [2.0]], dtype=torch.bfloat16))
    overflow = chunked_target_logprobs(torch.full((4, 1), 10.0, dtype=torch.bfloat16), weight, None, targets)
    assert not torch.isfinite(overflow).all()
    policy = PairLogps(chosen=overflow[:2].sum()[None], rejected=overflow[2:].sum()[None],
                       chosen_tokens=torch.tensor([2]), rejected_tokens=torch.tensor([2]))
    loss = preference_loss(policy, zero, "sigmoid").loss
    assert not torch.isfinite(loss).all()
    _assert_guarded(torch.nn.ParameterList([weight]), loss.sum())


def _assert_guarded(model, loss) -> None:
    """One real guarded optimizer step on `model` with `loss`: skipped, nothing changed, the schedule kept."""
    accelerator = Accelerator(cpu=True)
    optimizer = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    backward(accelerator, model, loss)
    _, stepped = optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=1.0, loss=loss.detach(),
                                guard=NonFiniteGuard(3), step=1, sample_ids=["x"])
    assert not stepped and scheduler.last_epoch == 0 and not optimizer.optimizer.state
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("importance", ["token", "sequence"])
def test_grpo_policy_loss_is_finite_for_large_ratios_and_the_overflow_case_is_guarded(importance):
    """Clipping keeps the surrogate finite when the ratio is large but finite (exp(80)) for either sign of A;
    a ratio that overflows (log-ratio 100 > 88.7) with A = 0 gives inf * 0 = NaN, which the guard skips."""
    old = torch.zeros(3, 4)
    mask = torch.ones(3, 4)
    for log_ratio in (80.0, -80.0):
        logps = torch.full((3, 4), log_ratio, requires_grad=True)
        loss, _ = policy_loss(logps, old, torch.tensor([1.0, -1.0, 0.0]), mask, loss_type="dapo",
                              importance=importance)
        loss.backward()  # A < 0 keeps the unclipped branch ratio * A = -exp(80): large, finite
        assert torch.isfinite(loss) and torch.isfinite(logps.grad).all(), (log_ratio, loss, logps.grad)
    weight = torch.nn.Parameter(torch.full((3, 4), 100.0))
    loss, _ = policy_loss(weight, old, torch.zeros(3), mask, loss_type="dapo", importance=importance)
    assert not torch.isfinite(loss)
    _assert_guarded(torch.nn.ParameterList([weight]), loss)


def test_grpo_kl_that_overflows_is_guarded_and_a_large_finite_one_is_not_silently_clamped():
    """k3 = exp(ref - logp) - (ref - logp) - 1 overflows when the policy puts a token ~89 nats below the
    reference: inf, then the guard skips the step; at 80 nats it is large and finite (no silent clamp)."""
    mask = torch.ones(1, 2)
    finite, _ = policy_loss(torch.full((1, 2), -80.0), torch.full((1, 2), -80.0), torch.zeros(1), mask,
                            beta=0.1, ref_logps=torch.zeros(1, 2))
    assert torch.isfinite(finite) and finite > 1e30
    weight = torch.nn.Parameter(torch.full((1, 2), -100.0))
    loss, _ = policy_loss(weight, weight.detach(), torch.zeros(1), mask, beta=0.1, ref_logps=torch.zeros(1, 2))
    assert not torch.isfinite(loss)
    _assert_guarded(torch.nn.ParameterList([weight]), loss)


@pytest.mark.parametrize("loss_type,options", [
    ("cross_entropy", {}), ("cross_entropy", {"label_smoothing": 0.999}),
    ("focal_loss", {"focal_gamma": 0.0}), ("focal_loss", {"focal_gamma": 0.5}), ("focal_loss", {"focal_gamma": 5.0}),
    ("focal_loss", {"focal_alpha": [0.0, 1.0, 1e6]}),
    ("class_balanced_cross_entropy", {"label_smoothing": 0.5, "class_weights": "extreme"}),
    ("class_balanced_focal_loss", {"focal_gamma": 0.3, "class_weights": "extreme"}),
])
def test_classification_losses_are_finite_at_saturated_logits_and_extreme_options(loss_type, options):
    """Logits of +-1e4 and +-1e30 (softmax saturated: p_t = 1 exactly and p_t = 0), smoothing near 1, focal gamma
    below 1 (whose (1 - p_t)^g has an infinite derivative at p_t = 1: floored), a zero and a huge alpha, class-balanced
    weights for a 1-sample class beside a 10^7-sample one with beta near 1."""
    options = dict(options)
    if options.get("class_weights") == "extreme":
        options["class_weights"] = class_balanced_weights([1, 10_000_000, 3], beta=0.999999)
        assert torch.isfinite(options["class_weights"]).all() and options["class_weights"].sum() == pytest.approx(3)
    logits = torch.tensor([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [0.0, 0.0, 0.0], [-1e30, 1e30, 0.0]],
                          requires_grad=True)
    targets = torch.tensor([0, 1, 2, 1])  # right and sure, wrong and sure, unsure, logits of 1e30
    losses = classification_loss(logits, targets, loss_type=loss_type, problem_type="single_label", **options)
    losses.sum().backward()
    assert torch.isfinite(losses).all(), losses
    assert torch.isfinite(logits.grad).all(), logits.grad


def test_multi_label_and_regression_losses_at_the_limits():
    """bce at logits +-1e4 is finite (log-sigmoid form); a regression error of 1e20 squares to inf: not finite,
    so the guard skips that step rather than training on it."""
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    bce = classification_loss(logits, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), loss_type="bce",
                              problem_type="multi_label")
    bce.sum().backward()
    assert torch.isfinite(bce).all() and torch.isfinite(logits.grad).all()
    head = torch.nn.Linear(1, 1)
    mse = classification_loss(head(torch.ones(1, 1)), torch.tensor([1e20]), loss_type="mse",
                              problem_type="regression")
    assert not torch.isfinite(mse).all()
    _assert_guarded(head, mse.sum())


@pytest.mark.parametrize("options", [["cls.focal_gamma=nan"], ["cls.focal_alpha=[-1.0,1.0,1.0]"],
                                     ["cls.focal_alpha=[.nan,1.0,1.0]"]])
def test_config_refuses_non_finite_or_negative_focal_options(options, tmp_path, media_dir):
    with pytest.raises(ValueError, match="cls.focal_"):
        cls_config(tmp_path, _write(media_dir, "cls.json", cls_records()), **{"cls.loss_type": "focal_loss"},
                   **dict(o.split("=", 1) for o in options))
