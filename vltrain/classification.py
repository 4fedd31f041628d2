"""Classification losses, class-balanced weights, eval metrics and early stopping, as pure functions.

`classification_loss(logits, targets, loss_type=..., problem_type=...)` returns one fp32 loss per example
(N,), never a mean: the classification loop sums them over the micro-batches and ranks of an optimizer step
and divides by the number of examples in the whole step (a global example mean, as loops/sft.py does with
tokens). `classification_metrics` scores a whole gathered eval set with scikit-learn; `EarlyStopping`
decides when evaluations stopped improving.

Notation, per example: z = logits (C,), y = target class, p = softmax(z), p_t = p[y], C = number of classes,
eps = label_smoothing, w = class_weights (C,), a = focal_alpha (C,), g = focal_gamma.

Losses (LossType), by problem type:
- single_label (targets: class ids (N,)):
  - cross_entropy: (1 - eps) (-log p_t) + eps / C * sum_c (-log p_c). eps = 0: -log p_t. This is exactly
    torch's `F.cross_entropy(..., label_smoothing=eps)` (the smoothed target puts eps / C on every class).
  - focal_loss (Lin et al. 2017, arXiv:1708.02002, Eq. 5, on the softmax): -a[y] (1 - p_t)^g log p_t;
    a[y] = 1 when focal_alpha is None. g = 0 and no alpha is cross_entropy. No label smoothing.
  - class_balanced_cross_entropy (Cui et al. 2019, arXiv:1901.05555): w[y] * cross_entropy (label smoothing
    allowed; the weight is the target's, also on the smoothing term, unlike torch's `weight=` which weights
    each class's share of the smoothed target).
  - class_balanced_focal_loss: w[y] (1 - p_t)^g (-log p_t). DEVIATION: Cui et al. build their focal variant
    on per-class sigmoids; here it is the softmax focal loss above with a[y] replaced by w[y].
  w comes from `class_balanced_weights`: w_c = (1 - beta) / (1 - beta^n_c) for n_c training samples of class
  c (the inverse "effective number" of samples), normalised to sum to C. beta = 0 gives w = 1 everywhere;
  beta -> 1 approaches inverse class frequency.
- multi_label (targets: 0/1 floats (N, C)): bce = mean over the C labels of
  -[y_c log sigmoid(z_c) + (1 - y_c) log(1 - sigmoid(z_c))] (`F.binary_cross_entropy_with_logits`).
- regression (logits (N, 1), targets (N,)): mse = (z_0 - y)^2.
No option is accepted and silently ignored: label smoothing, focal_alpha, a non-default focal_gamma or
class_weights given to a loss that does not read them is a ValueError. Target values are not range-checked
here (that would cost a device sync per micro-batch); the data layer checks labels when it loads them.

Metrics (`classification_metrics`): macro precision / recall / F1 average over the classes (labels) that
occur in the targets or the predictions (scikit-learn's default label set for single-label; multi-label uses
the same rule), so a class absent from a small eval set does not count as F1 0; per_class lists every class. Precision of a class never predicted is 0
(zero_division=0). auroc is the one-vs-rest macro mean over the classes that have both positives and
negatives among the targets (None when none has).

Early stopping counts like HF's EarlyStoppingCallback: an evaluation resets the counter when it beats the
best so far by more than `threshold`; `best` itself moves on any strict improvement (HF's best_metric does
too), so a run of sub-threshold gains still counts towards patience. DEVIATION: patience 0 never stops (HF
stops at the first evaluation), and a NaN value never becomes the best.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

__all__ = ["LossType", "LOSS_TYPES", "PROBLEM_TYPES", "LOSSES_FOR", "class_balanced_weights",
           "classification_loss", "predictions", "classification_metrics", "scalar_metrics", "metric_mode",
           "EarlyStopping"]

_DEFAULT_FOCAL_GAMMA = 2.0


class LossType(str, enum.Enum):
    """The classification losses; behaviour as properties, so loops never compare strings."""

    CROSS_ENTROPY = "cross_entropy"
    FOCAL_LOSS = "focal_loss"
    CLASS_BALANCED_CROSS_ENTROPY = "class_balanced_cross_entropy"
    CLASS_BALANCED_FOCAL_LOSS = "class_balanced_focal_loss"
    BCE = "bce"
    MSE = "mse"

    @property
    def needs_class_weights(self) -> bool:
        """Whether the loss reads `class_weights` (the loop then computes them with `class_balanced_weights`)."""
        return self in (LossType.CLASS_BALANCED_CROSS_ENTROPY, LossType.CLASS_BALANCED_FOCAL_LOSS)

    @property
    def focal(self) -> bool:
        """Whether the loss has the focal factor (1 - p_t)^gamma."""
        return self in (LossType.FOCAL_LOSS, LossType.CLASS_BALANCED_FOCAL_LOSS)

    @property
    def uses_label_smoothing(self) -> bool:
        return self in (LossType.CROSS_ENTROPY, LossType.CLASS_BALANCED_CROSS_ENTROPY)


LOSS_TYPES = tuple(t.value for t in LossType)
PROBLEM_TYPES = ("single_label", "multi_label", "regression")
LOSSES_FOR = {"single_label": LOSS_TYPES[:4], "multi_label": ("bce",), "regression": ("mse",)}


def _check_problem_type(problem_type: str) -> None:
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type: unknown value {problem_type!r}; known: {', '.join(PROBLEM_TYPES)}")


def class_balanced_weights(counts, beta: float, class_names: Sequence[str] | None = None) -> torch.Tensor:
    """(C,) fp32 effective-number weights w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to C.

    counts (C,): training samples per class (positives per label for multi-label), a sequence, numpy array or
    tensor. ValueError for beta outside [0, 1), a negative count, or a class with 0 samples (named by index
    and, when class_names is given, by name).
    """
    if not 0 <= beta < 1:
        raise ValueError(f"class-balanced beta must be in [0, 1), got {beta}")
    counts = [int(n) for n in (counts.tolist() if hasattr(counts, "tolist") else counts)]
    if not counts:
        raise ValueError("class_balanced_weights: counts is empty")
    for c, n in enumerate(counts):
        if n <= 0:
            name = f" ({class_names[c]!r})" if class_names is not None else ""
            raise ValueError(f"class {c}{name} has {n} training samples; class-balanced losses need every class "
                             f"present in the training set")
    weights = torch.tensor([(1 - beta) / (1 - beta ** n) for n in counts], dtype=torch.float64)
    return (weights * len(counts) / weights.sum()).float()


def _check_options(loss_type: LossType, problem_type: str, num_classes: int, label_smoothing: float,
                   focal_alpha, focal_gamma: float, class_weights) -> None:
    if loss_type.value not in LOSSES_FOR[problem_type]:
        raise ValueError(f"loss_type {loss_type.value!r} does not apply to problem_type {problem_type!r}; "
                         f"use one of {', '.join(LOSSES_FOR[problem_type])}")
    if label_smoothing and not loss_type.uses_label_smoothing:
        raise ValueError(f"label_smoothing={label_smoothing} is not used by loss_type {loss_type.value!r} "
                         f"(only by cross_entropy, class_balanced_cross_entropy); set it to 0")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if focal_alpha is not None:
        if loss_type is not LossType.FOCAL_LOSS:
            raise ValueError(f"focal_alpha is only used by focal_loss, not {loss_type.value!r}; drop it")
        if len(focal_alpha) != num_classes:
            raise ValueError(f"focal_alpha has {len(focal_alpha)} values for {num_classes} classes")
    if focal_gamma != _DEFAULT_FOCAL_GAMMA and not loss_type.focal:
        raise ValueError(f"focal_gamma={focal_gamma} is only used by the focal losses, not {loss_type.value!r}")
    if loss_type.focal and not (math.isfinite(focal_gamma) and focal_gamma >= 0):
        raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
    if loss_type.needs_class_weights:
        if class_weights is None:
            raise ValueError(f"loss_type {loss_type.value!r} needs class_weights (from class_balanced_weights)")
        if len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} values for {num_classes} classes")
    elif class_weights is not None:
        raise ValueError(f"class_weights are only used by the class-balanced losses, not {loss_type.value!r}")


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, *, loss_type: str, problem_type: str,
                        label_smoothing: float = 0.0, focal_alpha: Sequence[float] | None = None,
                        focal_gamma: float = _DEFAULT_FOCAL_GAMMA, class_weights=None) -> torch.Tensor:
    """Per-example losses (N,) in fp32 (formulas in the module docstring).

    logits (N, C) (regression: (N, 1)), any float dtype (cast to fp32); targets: single_label (N,) int64 class
    ids, multi_label (N, C) 0/1 floats, regression (N,) floats. class_weights (C,) from class_balanced_weights.
    """
    _check_problem_type(problem_type)
    try:
        kind = LossType(loss_type)
    except ValueError:
        raise ValueError(f"loss_type: unknown value {loss_type!r}; known: {', '.join(LOSS_TYPES)}") from None
    if logits.dim() != 2:
        raise ValueError(f"classification_loss: logits must be (N, C), got shape {tuple(logits.shape)}")
    num_examples, num_classes = logits.shape
    _check_options(kind, problem_type, num_classes, label_smoothing, focal_alpha, focal_gamma, class_weights)
    want = {"single_label": (num_examples,), "multi_label": (num_examples, num_classes),
            "regression": (num_examples,)}[problem_type]
    if tuple(targets.shape) != want:
        raise ValueError(f"classification_loss: {problem_type} targets must have shape {want} for logits "
                         f"{tuple(logits.shape)}, got {tuple(targets.shape)}")
    logits = logits.float()
    if kind is LossType.BCE:
        return F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").mean(-1)
    if kind is LossType.MSE:
        if num_classes != 1:
            raise ValueError(f"regression needs logits (N, 1) (num_labels=1), got {tuple(logits.shape)}")
        return (logits[:, 0] - targets.float()) ** 2
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"single_label targets must be integer class ids, got dtype {targets.dtype}")
    targets = targets.long()
    if kind.uses_label_smoothing:
        loss = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    else:
        logp_t = F.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        # 1 - p_t as -expm1(log p_t) (exact near p_t = 1), floored so that a gamma < 1 keeps a finite gradient
        loss = -(-torch.expm1(logp_t)).clamp(min=1e-12) ** focal_gamma * logp_t
    if kind.needs_class_weights:
        weights = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
        loss = weights[targets] * loss
    elif focal_alpha is not None:
        loss = torch.as_tensor(focal_alpha, dtype=torch.float32, device=logits.device)[targets] * loss
    return loss


def predictions(logits: torch.Tensor, problem_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, predicted) from logits (N, C), in fp32: single_label (softmax (N, C), argmax (N,) int64);
    multi_label (sigmoid (N, C), (sigmoid >= 0.5) as int64 (N, C)); regression (logits[:, 0], the same) (N,)."""
    _check_problem_type(problem_type)
    logits = logits.float()
    if problem_type == "single_label":
        return logits.softmax(-1), logits.argmax(-1)
    if problem_type == "multi_label":
        probs = logits.sigmoid()
        return probs, (probs >= 0.5).long()
    return logits[:, 0], logits[:, 0]


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _auroc(y_true: np.ndarray, y_score: np.ndarray) -> float | None:
    """Macro one-vs-rest AUROC over the columns of the (N, K) 0/1 indicator with both positives and negatives."""
    aucs = [skm.roc_auc_score(y_true[:, k], y_score[:, k]) for k in range(y_true.shape[1])
            if 0 < y_true[:, k].sum() < len(y_true)]
    return float(np.mean(aucs)) if aucs else None


def _per_class_and_macro(y_true, y_pred, num_labels: int, names: list[str]) -> dict:
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(num_labels)), average=None, zero_division=0)
    predicted = (np.bincount(y_pred, minlength=num_labels) if y_pred.ndim == 1 else y_pred.sum(0))
    seen = (support > 0) | (predicted > 0)  # scikit-learn's default label set for macro averages
    out = {f"macro_{key}": float(values[seen].mean()) if seen.any() else 0.0
           for key, values in (("precision", precision), ("recall", recall), ("f1", f1))}
    out["per_class"] = {names[c]: {"precision": float(precision[c]), "recall": float(recall[c]),
                                   "f1": float(f1[c]), "support": int(support[c])} for c in range(num_labels)}
    return out


def classification_metrics(scores, targets, *, problem_type: str, num_labels: int,
                           class_names: Sequence[str] | None = None) -> dict:
    """Metrics of a whole (gathered) eval set, tensors or numpy. scores: the first output of `predictions`
    ((N, C) probabilities, or (N,) values for regression); targets as for `classification_loss`.

    single_label: accuracy, macro_precision / macro_recall / macro_f1, auroc, confusion_matrix (num_labels x
    num_labels lists, rows true, columns predicted), per_class {name: precision, recall, f1, support};
    multi_label: accuracy (exact set match), the macro ones, micro_f1, auroc, per_class; regression: mse, mae,
    r2 (None for a single example). Every case also has num_examples. Averaging rules in the module docstring.
    """
    _check_problem_type(problem_type)
    scores, targets = _numpy(scores), _numpy(targets)
    num_examples = int(len(targets))
    if num_examples == 0:
        raise ValueError("classification_metrics: the eval set is empty")
    if problem_type == "regression":
        scores, targets = scores.reshape(-1).astype(np.float64), targets.reshape(-1).astype(np.float64)
        r2 = float(skm.r2_score(targets, scores)) if num_examples > 1 else None
        return {"mse": float(skm.mean_squared_error(targets, scores)),
                "mae": float(skm.mean_absolute_error(targets, scores)), "r2": r2, "num_examples": num_examples}
    names = [str(c) for c in range(num_labels)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_labels or scores.shape != (num_examples, num_labels):
        raise ValueError(f"classification_metrics: scores {scores.shape} and {len(names)} class names do not "
                         f"match {num_examples} targets and num_labels={num_labels}")
    if problem_type == "multi_label":
        y_true, y_pred = targets.astype(np.int64), (scores >= 0.5).astype(np.int64)
        out = {"accuracy": float(skm.accuracy_score(y_true, y_pred)),
               "micro_f1": float(skm.f1_score(y_true, y_pred, average="micro", zero_division=0)),
               "auroc": _auroc(y_true, scores)}
    else:
        y_true, y_pred = targets.astype(np.int64).reshape(-1), scores.argmax(-1)
        one_hot = np.eye(num_labels, dtype=np.int64)[y_true]
        if num_labels == 2:  # the positive class's probability; equals the macro of the two one-vs-rest AUROCs
            auroc = _auroc(one_hot[:, 1:], scores[:, 1:])
        else:
            auroc = _auroc(one_hot, scores)
        out = {"accuracy": float(skm.accuracy_score(y_true, y_pred)), "auroc": auroc,
               "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=list(range(num_labels))).tolist()}
    out.update(_per_class_and_macro(y_true, y_pred, num_labels, names))
    out["num_examples"] = num_examples
    return out


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The numeric entries as floats (for trackers and log lines); per_class, confusion_matrix and None dropped."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def metric_mode(name: str) -> str:
    """"min" for loss, mse and mae (also as "eval_loss", "eval/mse", "..._loss"); "max" for everything else."""
    base = name.rsplit("/", 1)[-1].removeprefix("eval_")
    return "min" if base in ("loss", "mse", "mae") or base.endswith("_loss") else "max"


class EarlyStopping:
    """Stop after `patience` evaluations in a row that do not beat the best by more than `threshold` (absolute).

    Counts as HF's EarlyStoppingCallback (module docstring); patience 0 never stops. The caller tracks which
    step was best, from `update`'s return value.
    """

    def __init__(self, metric: str, patience: int, threshold: float = 0.0):
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"early stopping patience must be an integer >= 0, got {patience!r}")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"early stopping threshold must be >= 0, got {threshold}")
        self.metric, self.patience, self.threshold = metric, patience, threshold
        self.mode = metric_mode(metric)
        self.best: float | None = None
        self.num_bad_evals = 0

    def _gain(self, value: float) -> float:
        """How much value beats the best (> 0: better)."""
        return value - self.best if self.mode == "max" else self.best - value

    def update(self, value: float) -> bool:
        """Record one evaluation's metric value; True when it is the best so far (the first always is)."""
        value = float(value)
        if math.isnan(value):
            self.num_bad_evals += 1
            return False
        if self.best is None:
            self.best = value
            return True
        gain = self._gain(value)
        self.num_bad_evals = 0 if gain > self.threshold else self.num_bad_evals + 1
        if gain > 0:
            self.best = value
        return gain > 0

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.num_bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "num_bad_evals": self.num_bad_evals}

    def load_state_dict(self, state: dict) -> None:
        """Restore best and the counter; patience and threshold stay as configured now (they may change on resume)."""
        if state["metric"] != self.metric:
            raise ValueError(f"early stopping: the checkpoint tracked {state['metric']!r}, this run tracks "
                             f"{self.metric!r}; the best values are not comparable")
        self.best, self.num_bad_evals = state["best"], int(state["num_bad_evals"])
