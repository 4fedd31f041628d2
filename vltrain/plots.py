"""Run plots: the metrics a run logged, drawn into one PNG.

    python -m vltrain.plots OUTPUT_DIR [--out FILE.png]

Every loop writes `<train.output_dir>/metrics.jsonl` (vltrain.training.log_metrics): one JSON object a line,
`{"step": N, "loss": ..., "eval/accuracy": ...}`. `plot_run(output_dir)` reads it and writes
`<output_dir>/plots.png`: one panel per group of series that the run logged (loss with eval loss, learning rate,
grad norm, throughput, memory; DPO margins, accuracies and rewards; GRPO rewards, per reward function, with
their spread, completion lengths, KL, entropy, clipped fractions and time; classification eval metrics), a grid
of three columns, x axis the optimizer step. The panel titles are stored in the PNG's text chunk "Panels" (a
JSON list), so tools and tests can read what was drawn. A series the groups below do not know gets a panel of
its own, titled with its key.

Matplotlib draws through its Agg canvas directly (no pyplot), so plotting never changes the backend of the
process that calls it (a notebook, a training run).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from vltrain.cli import program

METRICS_FILE = "metrics.jsonl"  # under train.output_dir
PLOTS_FILE = "plots.png"
NUM_COLUMNS = 3
_NOT_PLOTTED = {"epoch", "eval/num_examples", "eval/num_prompts"}  # counters, not curves


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file, in file order. A line that does not parse (a run killed mid-write
    cuts its last line) is skipped, as is one without an integer "step"."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
    return records


def metric_series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{key: (steps, values)} sorted by step; a step logged twice for one key keeps its last value."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key == "step" or key in _NOT_PLOTTED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                by_key.setdefault(key, {})[record["step"]] = float(value)
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_key.items()}


def _grpo_reward_names(keys) -> set[str]:
    return {m.group(1) for k in keys if (m := re.fullmatch(r"rewards/([^/]+)/mean", k))}


# (title, matcher(key, every key)): a key goes to the first panel that matches it, panels keep this order.
_PANELS = [
    ("loss", lambda k, ks: k in ("loss", "eval_loss", "eval/loss")),
    ("DPO loss components", lambda k, ks: re.fullmatch(r"(eval/)?loss/[^/]+", k) is not None),
    ("learning rate", lambda k, ks: k == "lr"),
    ("grad norm", lambda k, ks: k == "grad_norm"),
    ("tokens/s", lambda k, ks: k in ("tokens_per_s", "rollout_tokens_per_s")),
    ("pairs/s", lambda k, ks: k == "pairs_per_s"),
    ("examples/s", lambda k, ks: k == "examples_per_s"),
    ("peak memory (GiB)", lambda k, ks: k == "memory_gib"),
    # GRPO: rewards/<name>/mean per reward function; held-out rewards as eval/reward, eval/rewards/<name>
    ("GRPO rewards", lambda k, ks: k in ("reward", "eval/reward") or re.fullmatch(r"rewards/[^/]+/mean", k) is not None
     or (k.startswith("eval/rewards/") and k.removeprefix("eval/rewards/") in _grpo_reward_names(ks))),
    ("GRPO reward / advantage std", lambda k, ks: k in ("reward_std", "advantage_std")
     or re.fullmatch(r"rewards/[^/]+/std", k) is not None),
    ("completion length (tokens)", lambda k, ks: k in ("completion_length", "completion_length_max")),
    ("KL to reference", lambda k, ks: k == "kl"),
    ("entropy", lambda k, ks: k == "entropy"),
    ("clipped / truncated / no-reward fraction", lambda k, ks: k in ("clip_frac", "truncated_frac")
     or re.fullmatch(r"rewards/[^/]+/none_frac", k) is not None),
    ("time per step (s)", lambda k, ks: k.startswith("time/")),
    # DPO: rewards/{margin,accuracy,chosen,rejected}, logps/{chosen,rejected}, train and eval/
    ("DPO reward margin", lambda k, ks: k in ("rewards/margin", "eval/rewards/margin")),
    ("DPO preference accuracy", lambda k, ks: k in ("rewards/accuracy", "eval/rewards/accuracy")),
    ("DPO chosen / rejected rewards", lambda k, ks: k.removeprefix("eval/") in ("rewards/chosen", "rewards/rejected")),
    ("DPO log-probs", lambda k, ks: k.removeprefix("eval/") in ("logps/chosen", "logps/rejected")),
    # classification: train accuracy beside eval accuracy; the other eval scores; regression errors
    ("accuracy", lambda k, ks: k in ("train_accuracy", "eval/accuracy")),
    ("eval errors", lambda k, ks: k in ("eval/mse", "eval/mae")),
    ("eval metrics", lambda k, ks: k.startswith("eval/") and k.count("/") == 1),
]


def group_panels(keys) -> list[tuple[str, list[str]]]:
    """[(panel title, [series keys])] for the keys a run logged: the known groups in `_PANELS` order, then one
    panel per unknown key. One DPO loss type only: its loss/<type> series repeats `loss`, so it is left out."""
    keys = sorted(keys)
    if len([k for k in keys if re.fullmatch(r"loss/[^/]+", k)]) == 1:
        keys = [k for k in keys if not re.fullmatch(r"(eval/)?loss/[^/]+", k)]
    panels: dict[str, list[str]] = {}
    for key in keys:
        title = next((t for t, matches in _PANELS if matches(key, keys)), key)
        panels.setdefault(title, []).append(key)
    order = [t for t, _ in _PANELS]
    return sorted(panels.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))


_LABELS = {"loss": "train", "eval_loss": "eval", "eval/loss": "eval", "reward": "total", "eval/reward": "eval total",
           "reward_std": "total", "advantage_std": "advantage", "completion_length": "mean",
           "completion_length_max": "max", "clip_frac": "clipped tokens", "truncated_frac": "truncated completions",
           "train_accuracy": "train", "eval/accuracy": "eval", "tokens_per_s": "training",
           "rollout_tokens_per_s": "rollout"}
_COUNTERPARTS = {"eval_loss": "loss", "eval/loss": "loss", "eval/reward": "reward", "eval/accuracy": "train_accuracy"}


def series_label(key: str) -> str:
    """The legend label of a series: `eval/rewards/margin` -> `eval margin`, `rewards/fmt/mean` -> `fmt`,
    `rewards/fmt/none_frac` -> `fmt: None reward`."""
    if key in _LABELS:
        return _LABELS[key]
    eval_ = key.startswith("eval/")
    name = key.removeprefix("eval/")
    name = re.sub(r"^(rewards|logps|loss|time)/", "", name)
    name = re.sub(r"/(mean|std)$", "", name)
    name = re.sub(r"/none_frac$", ": None reward", name)
    return ("eval " if eval_ else "") + name.removesuffix("_s")


def _train_counterpart(key: str, keys: list[str]) -> str:
    """The training series an eval series continues (drawn in its colour): eval/rewards/margin -> rewards/margin,
    GRPO's eval/rewards/<name> -> rewards/<name>/mean."""
    if key in _COUNTERPARTS:
        return _COUNTERPARTS[key]
    name = key.removeprefix("eval/")
    return f"{name}/mean" if f"{name}/mean" in keys else name


def _draw(ax, title: str, keys: list[str], series: dict) -> None:
    train = [k for k in keys if not k.startswith("eval")]
    colours = {key: f"C{i % 10}" for i, key in enumerate(train)}
    for key in train:  # every logged step: a line (points too when there are few)
        steps, values = series[key]
        ax.plot(steps, values, "-", color=colours[key], linewidth=1.4, label=series_label(key),
                marker="o" if len(steps) <= 25 else None, markersize=2.5)
    for key in keys:  # a few evaluations: points joined by a dashed line, in their training series' colour
        if key in colours:
            continue
        counterpart = _train_counterpart(key, keys)
        colour = colours.setdefault(counterpart if counterpart in colours else key, f"C{len(colours) % 10}")
        steps, values = series[key]
        ax.plot(steps, values, "o--", color=colour, markersize=4, linewidth=1.2, label=series_label(key))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(keys) > 1 or title.endswith("metrics"):  # a generic panel names its one series too
        ax.legend(fontsize=7, loc="best", framealpha=0.8)
    if len(keys) == 1 and len(series[keys[0]][0]) == 1:  # one point: label its value (an axis of one point says little)
        (step,), (value,) = series[keys[0]]
        ax.annotate(f"{value:.4g}", (step, value), textcoords="offset points", xytext=(6, 6), fontsize=8)


def plot_run(output_dir, out=None) -> Path | None:
    """Draw `<output_dir>/metrics.jsonl` into `out` (default `<output_dir>/plots.png`) and return its path;
    None (said on stdout) when the file holds no numeric series. ValueError when there is no metrics.jsonl."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    output_dir = Path(output_dir)
    path = output_dir / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found: OUTPUT_DIR must be a run's train.output_dir (every run writes its "
                         f"{METRICS_FILE} there)")
    out = Path(out) if out is not None else output_dir / PLOTS_FILE
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: the plots are a PNG, give a file name ending in .png")
    records = read_metrics(path)
    series = metric_series(records)
    if not series:
        print(f"nothing to plot: {path} holds no metrics ({len(records)} records)")
        return None
    panels = group_panels(series)
    num_columns = min(NUM_COLUMNS, len(panels))
    num_rows = math.ceil(len(panels) / num_columns)
    fig = Figure(figsize=(5.0 * num_columns, 3.3 * num_rows), layout="constrained", dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(num_rows, num_columns, squeeze=False).ravel()
    for ax, (title, keys) in zip(axes, panels):
        _draw(ax, title, keys, series)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    last_step = max(r["step"] for r in records)
    fig.suptitle(f"{output_dir.resolve().name}: {last_step} steps", fontsize=12)
    titles = [title for title, _ in panels]
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Title": f"vltrain run {output_dir.resolve().name}", "Panels": json.dumps(titles)})
    return out


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(prog=program("python -m vltrain.plots"), description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", metavar="OUTPUT_DIR",
                        help="a run's folder: its train.output_dir, which holds metrics.jsonl")
    parser.add_argument("--out", default=None, help="where to write the PNG (default: OUTPUT_DIR/plots.png)")
    args = parser.parse_args(argv)
    try:
        png = plot_run(args.output_dir, args.out)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if png is not None:
        print(f"plots: {png}")
    return png


if __name__ == "__main__":
    main()
