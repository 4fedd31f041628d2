"""Classification losses, class-balanced weights, metrics and early stopping (vltrain.classification).

Every expected loss is written out per example with python floats (math.log / math.exp) from the formulas in
the module docstring; every expected metric comes from a confusion matrix or a count of ordered
positive/negative pairs worked out by hand in the test, never from scikit-learn or the code under test.
CPU, about a second.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vltrain.classification import (LOSS_TYPES, LOSSES_FOR, PROBLEM_TYPES, EarlyStopping, LossType,
                                    class_balanced_weights, classification_loss, classification_metrics,
                                    metric_mode, predictions, scalar_metrics)

# Three examples, three classes; example 2 is misclassified (target 1, largest logit class 2).
Z = [[2.0, 1.0, 0.1], [0.5, 2.5, -1.0], [-0.3, 0.2, 1.7]]
Y = [0, 1, 1]
LOGITS = torch.tensor(Z)
TARGETS = torch.tensor(Y)


def log_probs(z: list[float]) -> list[float]:
    log_norm = math.log(sum(math.exp(v) for v in z))
    return [v - log_norm for v in z]


def hand_ce(i: int, eps: float = 0.0) -> float:
    lp = log_probs(Z[i])
    return (1 - eps) * -lp[Y[i]] + eps / 3 * sum(-v for v in lp)


def hand_focal(i: int, gamma: float, alpha: float = 1.0) -> float:
    lp_t = log_probs(Z[i])[Y[i]]
    return -alpha * (1 - math.exp(lp_t)) ** gamma * lp_t


def loss(loss_type: str, problem_type: str = "single_label", logits=LOGITS, targets=TARGETS, **kw):
    return classification_loss(logits, targets, loss_type=loss_type, problem_type=problem_type, **kw)


def test_interface_constants():
    assert LOSS_TYPES == ("cross_entropy", "focal_loss", "class_balanced_cross_entropy",
                          "class_balanced_focal_loss", "bce", "mse")
    assert PROBLEM_TYPES == ("single_label", "multi_label", "regression")
    assert LOSSES_FOR == {"single_label": LOSS_TYPES[:4], "multi_label": ("bce",), "regression": ("mse",)}
    assert [t.value for t in LossType if t.needs_class_weights] == list(LOSS_TYPES[2:4])


def test_cross_entropy_by_hand():
    # example 0: log-sum-exp of (2, 1, 0.1) = log(e^2 + e^1 + e^0.1); CE = lse - 2
    lse0 = math.log(math.exp(2.0) + math.exp(1.0) + math.exp(0.1))
    out = loss("cross_entropy")
    assert out.shape == (3,) and out.dtype == torch.float32
    assert out[0].item() == pytest.approx(lse0 - 2.0, rel=1e-6)
    assert out.tolist() == pytest.approx([hand_ce(i) for i in range(3)], rel=1e-6)


def test_cross_entropy_label_smoothing_by_hand():
    out = loss("cross_entropy", label_smoothing=0.1)
    assert out.tolist() == pytest.approx([hand_ce(i, eps=0.1) for i in range(3)], rel=1e-6)
    # same definition as torch's label_smoothing
    torch_ce = torch.nn.functional.cross_entropy(LOGITS, TARGETS, reduction="none", label_smoothing=0.1)
    assert torch.allclose(out, torch_ce)


def test_focal_loss_alpha_gamma_by_hand():
    alpha = [0.25, 0.5, 1.0]
    out = loss("focal_loss", focal_alpha=alpha, focal_gamma=2.0)
    assert out.tolist() == pytest.approx([hand_focal(i, 2.0, alpha[Y[i]]) for i in range(3)], rel=1e-5)
    no_alpha = loss("focal_loss", focal_gamma=1.5)
    assert no_alpha.tolist() == pytest.approx([hand_focal(i, 1.5) for i in range(3)], rel=1e-5)
    # the focal factor down-weights the well-classified example 1 more than the misclassified example 2
    ce = loss("cross_entropy")
    assert (no_alpha[1] / ce[1]) < (no_alpha[2] / ce[2])


def test_focal_gamma_zero_is_cross_entropy():
    assert torch.allclose(loss("focal_loss", focal_gamma=0.0), loss("cross_entropy"), rtol=1e-6)


def test_focal_gamma_below_one_has_finite_gradient_at_certainty():
    logits = torch.tensor([[40.0, 0.0, 0.0]], requires_grad=True)
    loss("focal_loss", logits=logits, targets=torch.tensor([0]), focal_gamma=0.5).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_class_balanced_losses_by_hand():
    w = [0.5, 1.25, 1.25]
    ce = loss("class_balanced_cross_entropy", class_weights=torch.tensor(w), label_smoothing=0.1)
    assert ce.tolist() == pytest.approx([w[Y[i]] * hand_ce(i, eps=0.1) for i in range(3)], rel=1e-6)
    focal = loss("class_balanced_focal_loss", class_weights=w, focal_gamma=2.0)
    assert focal.tolist() == pytest.approx([w[Y[i]] * hand_focal(i, 2.0) for i in range(3)], rel=1e-5)


def test_bce_by_hand():
    z = [[1.0, -2.0, 0.5], [-0.5, 0.0, 3.0]]
    y = [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]

    def sig(v):
        return 1 / (1 + math.exp(-v))

    expected = [sum(-(yc * math.log(sig(zc)) + (1 - yc) * math.log(1 - sig(zc))) for zc, yc in zip(zi, yi)) / 3
                for zi, yi in zip(z, y)]
    out = loss("bce", "multi_label", torch.tensor(z), torch.tensor(y))
    assert out.shape == (2,) and out.tolist() == pytest.approx(expected, rel=1e-6)


def test_mse_by_hand():
    out = loss("mse", "regression", torch.tensor([[1.5], [-2.0], [0.0]]), torch.tensor([1.0, 1.0, 0.0]))
    assert out.tolist() == pytest.approx([0.25, 9.0, 0.0])


def test_low_precision_logits_give_fp32_losses():
    out = loss("cross_entropy", logits=LOGITS.to(torch.bfloat16))
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([hand_ce(i) for i in range(3)], rel=2e-2)


@pytest.mark.parametrize("loss_type, problem_type", [
    ("bce", "single_label"), ("mse", "single_label"), ("cross_entropy", "multi_label"),
    ("focal_loss", "regression"), ("cross_entropy", "regression"), ("hinge", "single_label"),
    ("cross_entropy", "ordinal"),
])
def test_wrong_loss_for_problem_type_raises(loss_type, problem_type):
    with pytest.raises(ValueError, match="loss_type|problem_type"):
        loss(loss_type, problem_type)


@pytest.mark.parametrize("loss_type, kw, match", [
    ("class_balanced_cross_entropy", {}, "needs class_weights"),
    ("class_balanced_focal_loss", {"class_weights": [1.0, 1.0]}, "2 values for 3 classes"),
    ("focal_loss", {"focal_alpha": [0.5, 0.5]}, "focal_alpha has 2 values for 3 classes"),
    ("cross_entropy", {"focal_alpha": [1.0, 1.0, 1.0]}, "only used by focal_loss"),
    ("cross_entropy", {"focal_gamma": 1.0}, "focal_gamma"),
    ("cross_entropy", {"class_weights": [1.0, 1.0, 1.0]}, "only used by the class-balanced"),
    ("focal_loss", {"label_smoothing": 0.1}, "label_smoothing"),
    ("class_balanced_focal_loss", {"class_weights": [1.0] * 3, "focal_alpha": [1.0] * 3}, "focal_alpha"),
])
def test_unusable_options_raise(loss_type, kw, match):
    with pytest.raises(ValueError, match=match):
        loss(loss_type, **kw)


def test_target_shape_and_dtype_checked():
    with pytest.raises(ValueError, match="targets must have shape"):
        loss("cross_entropy", targets=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer class ids"):
        loss("cross_entropy", targets=torch.tensor([0.0, 1.0, 1.0]))


def test_class_balanced_weights_by_hand():
    beta = 0.9
    raw = [(1 - beta) / (1 - beta ** n) for n in (10, 5, 1)]  # 0.1/0.6513, 0.1/0.40951, 0.1/0.1
    expected = [3 * r / sum(raw) for r in raw]
    out = class_balanced_weights([10, 5, 1], beta)
    assert out.dtype == torch.float32 and out.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.sum().item() == pytest.approx(3.0)
    assert out[2] > out[1] > out[0]  # the rarest class weighs most
    assert class_balanced_weights(np.array([7, 1, 300]), 0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_class_balanced_weights_errors():
    with pytest.raises(ValueError, match=r"class 1 \('dog'\) has 0 training samples.*every class"):
        class_balanced_weights([3, 0, 2], 0.99, class_names=["cat", "dog", "bird"])
    with pytest.raises(ValueError, match=r"class 2 has 0"):
        class_balanced_weights(torch.tensor([3, 1, 0]), 0.99)
    for beta in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"beta must be in \[0, 1\)"):
            class_balanced_weights([3, 1, 2], beta)


def one_hot_scores(predicted: list[int], num_labels: int, confidence: list[float]) -> np.ndarray:
    """Probability rows whose argmax is `predicted`, the rest spread evenly."""
    rows = np.full((len(predicted), num_labels), 0.0)
    for i, (c, p) in enumerate(zip(predicted, confidence)):
        rows[i, :] = (1 - p) / (num_labels - 1)
        rows[i, c] = p
    return rows


def pair_auc(pos: list[float], neg: list[float]) -> float:
    """Fraction of (positive, negative) pairs ordered correctly, ties half."""
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_single_label_metrics_against_hand_confusion_matrix():
    targets = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    predicted = [0, 0, 1, 1, 2, 2, 2, 0, 2, 1]  # class 3 is never predicted
    confidence = [0.9, 0.6, 0.5, 0.7, 0.4, 0.8, 0.6, 0.5, 0.45, 0.35]
    scores = one_hot_scores(predicted, 4, confidence)
    m = classification_metrics(torch.tensor(scores), torch.tensor(targets), problem_type="single_label",
                               num_labels=4, class_names=["a", "b", "c", "d"])
    cm = [[2, 1, 0, 0],   # true a: predicted a, a, b
          [0, 1, 1, 0],   # true b: b, c
          [1, 0, 2, 0],   # true c: c, c, a
          [0, 1, 1, 0]]   # true d: c, b
    assert m["confusion_matrix"] == cm
    assert m["accuracy"] == pytest.approx(5 / 10)
    precision = [2 / 3, 1 / 3, 2 / 4, 0.0]  # diagonal / column sums; d never predicted -> 0 (zero_division)
    recall = [2 / 3, 1 / 2, 2 / 3, 0 / 2]   # diagonal / row sums
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall)]
    for c, name in enumerate("abcd"):
        assert m["per_class"][name] == pytest.approx(
            {"precision": precision[c], "recall": recall[c], "f1": f1[c], "support": sum(cm[c])})
    assert m["macro_precision"] == pytest.approx(sum(precision) / 4)
    assert m["macro_recall"] == pytest.approx(sum(recall) / 4)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.4 + 4 / 7 + 0) / 4)
    per_class_auc = [pair_auc([scores[i, c] for i in range(10) if targets[i] == c],
                              [scores[i, c] for i in range(10) if targets[i] != c]) for c in range(4)]
    assert m["auroc"] == pytest.approx(sum(per_class_auc) / 4)
    assert m["num_examples"] == 10


def test_class_absent_from_targets():
    targets = [0, 1, 2, 0, 1, 2]
    scores = np.array([[0.6, 0.2, 0.1, 0.1],
                       [0.1, 0.5, 0.3, 0.1],
                       [0.2, 0.1, 0.6, 0.1],
                       [0.3, 0.4, 0.2, 0.1],
                       [0.1, 0.2, 0.3, 0.4],   # predicted 3, a class no example has
                       [0.1, 0.2, 0.5, 0.2]])
    m = classification_metrics(scores, np.array(targets), problem_type="single_label", num_labels=4)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 2, 0], [0, 0, 0, 0]]
    assert m["per_class"]["3"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # auroc over classes 0, 1, 2 only (class 3 has no positives); class 0: positives 0.6, 0.3 vs
    # negatives 0.1, 0.2, 0.1, 0.1 -> 8/8; class 1: 0.5 beats 0.2, 0.1, 0.4, 0.2 (4), 0.2 ties 0.2 twice and
    # beats 0.1 (2) -> 6/8; class 2: 0.6, 0.5 vs 0.1, 0.3, 0.2, 0.3 -> 8/8
    assert m["auroc"] == pytest.approx((1 + 6 / 8 + 1) / 3)
    # class 3 was predicted, so it counts in the macro averages; P, R per class from the matrix:
    # 0: 1/1, 1/2 -> F1 2/3; 1: 1/2, 1/2 -> 1/2; 2: 2/2, 2/2 -> 1; 3: 0/1, 0/0 -> 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1 + 0) / 4)
    # a class neither in the targets nor predicted is left out of the macro averages, still listed
    m5 = classification_metrics(np.hstack([scores, np.zeros((6, 1))]), targets, problem_type="single_label",
                                num_labels=5)
    assert m5["macro_f1"] == pytest.approx(m["macro_f1"]) and m5["per_class"]["4"]["support"] == 0
    assert len(m5["confusion_matrix"]) == 5 and all(len(row) == 5 for row in m5["confusion_matrix"])


def test_binary_auroc_counts_ordered_pairs():
    p1 = [0.9, 0.4, 0.35, 0.2, 0.6]
    targets = [1, 0, 1, 0, 1]
    # positives 0.9, 0.35, 0.6 vs negatives 0.4, 0.2: 0.9 beats both, 0.35 beats 0.2 only, 0.6 beats both -> 5/6
    scores = torch.tensor([[1 - p, p] for p in p1])
    m = classification_metrics(scores, torch.tensor(targets), problem_type="single_label", num_labels=2)
    assert m["auroc"] == pytest.approx(5 / 6)
    only_one_class = classification_metrics(scores, torch.ones(5, dtype=torch.long), problem_type="single_label",
                                            num_labels=2)
    assert only_one_class["auroc"] is None and "auroc" not in scalar_metrics(only_one_class)


def test_multi_label_metrics_by_hand():
    targets = [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]]
    probs = [[0.9, 0.2, 0.6], [0.3, 0.8, 0.4], [0.7, 0.4, 0.1], [0.2, 0.1, 0.3]]
    # predicted (>= 0.5): [1,0,1], [0,1,0], [1,0,0], [0,0,0] -> rows 0 and 1 match exactly
    m = classification_metrics(torch.tensor(probs), torch.tensor(targets, dtype=torch.float32),
                               problem_type="multi_label", num_labels=3, class_names=["x", "y", "z"])
    assert m["accuracy"] == pytest.approx(2 / 4)
    # label x: tp 2, fp 0, fn 0; y: tp 1, fp 0, fn 1; z: tp 1, fp 0, fn 1
    assert m["per_class"]["y"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["macro_precision"] == pytest.approx(1.0)
    assert m["macro_recall"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["micro_f1"] == pytest.approx(2 * 1.0 * (4 / 6) / (1.0 + 4 / 6))  # tp 4, fp 0, fn 2
    # x: 0.9, 0.7 vs 0.3, 0.2 -> 1; y: 0.8, 0.4 vs 0.2, 0.1 -> 1; z: 0.6, 0.3 vs 0.4, 0.1 -> 3/4
    assert m["auroc"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert m["num_examples"] == 4 and "confusion_matrix" not in m


def test_regression_metrics_by_hand():
    m = classification_metrics(torch.tensor([1.5, 2.0, 3.0]), torch.tensor([1.0, 2.0, 4.0]),
                               problem_type="regression", num_labels=1)
    ss_tot = (1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2
    assert m == pytest.approx({"mse": (0.25 + 0 + 1) / 3, "mae": (0.5 + 0 + 1) / 3, "r2": 1 - 1.25 / ss_tot,
                               "num_examples": 3})


def test_predictions():
    scores, predicted = predictions(LOGITS, "single_label")
    assert torch.allclose(scores, LOGITS.softmax(-1)) and predicted.tolist() == [0, 1, 2]
    probs, labels = predictions(torch.tensor([[0.0, -1.0, 2.0]]), "multi_label")
    assert probs[0].tolist() == pytest.approx([0.5, 1 / (1 + math.e), 1 / (1 + math.exp(-2))])
    assert labels.tolist() == [[1, 0, 1]]  # sigmoid(0) = 0.5 counts as positive
    values, same = predictions(torch.tensor([[1.5], [-2.0]]), "regression")
    assert values.tolist() == [1.5, -2.0] and same.tolist() == [1.5, -2.0]


def test_scalar_metrics_and_metric_mode():
    m = classification_metrics(one_hot_scores([0, 1, 1], 3, [0.8, 0.7, 0.6]), [0, 1, 2],
                               problem_type="single_label", num_labels=3)
    flat = scalar_metrics(m)
    assert set(flat) == {"accuracy", "macro_precision", "macro_recall", "macro_f1", "auroc", "num_examples"}
    assert all(type(v) is float for v in flat.values())
    assert [metric_mode(n) for n in ("loss", "eval_loss", "eval/mse", "mae", "bce_loss")] == ["min"] * 5
    assert [metric_mode(n) for n in ("accuracy", "macro_f1", "auroc", "r2", "eval/micro_f1")] == ["max"] * 5


def test_early_stopping_threshold_and_patience_max_mode():
    stop = EarlyStopping("macro_f1", patience=2, threshold=0.01)
    assert stop.update(0.50) is True and stop.best == 0.50 and not stop.should_stop
    assert stop.update(0.505) is True      # a new best, but by less than the threshold: counts as no improvement
    assert stop.best == 0.505 and not stop.should_stop
    assert stop.update(0.40) is False      # second evaluation in a row without a real improvement
    assert stop.should_stop


def test_early_stopping_resets_and_stops_exactly_after_patience_min_mode():
    stop = EarlyStopping("eval_loss", patience=3, threshold=0.0)
    results = [(stop.update(v), stop.should_stop) for v in (1.0, 0.9, 0.95, 0.9, 0.85, 0.86, 0.9, 0.85)]
    assert results == [(True, False), (True, False), (False, False), (False, False),  # 0.9 again: not better
                       (True, False), (False, False), (False, False), (False, True)]
    assert stop.best == 0.85


def test_early_stopping_patience_zero_never_stops_and_validation():
    stop = EarlyStopping("accuracy", patience=0, threshold=0.0)
    for v in (0.5, 0.4, 0.3, 0.2, 0.1):
        stop.update(v)
    assert not stop.should_stop and stop.best == 0.5
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping("accuracy", patience=-1, threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        EarlyStopping("accuracy", patience=1, threshold=-0.1)


def test_early_stopping_state_dict_round_trip():
    stop = EarlyStopping("auroc", patience=3, threshold=0.0)
    for v in (0.7, 0.8, 0.75, 0.79):
        stop.update(v)
    resumed = EarlyStopping("auroc", patience=3, threshold=0.0)
    resumed.load_state_dict(json.loads(json.dumps(stop.state_dict())))
    assert resumed.best == 0.8 and not resumed.should_stop
    assert resumed.update(0.78) is False and resumed.should_stop   # the third in a row, counted across the resume
    with pytest.raises(ValueError, match="tracked 'auroc'"):
        EarlyStopping("accuracy", patience=3, threshold=0.0).load_state_dict(stop.state_dict())
