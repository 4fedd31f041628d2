"""The run metrics file (vltrain.training.log_metrics, metrics.jsonl) and its plots (vltrain.plots)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from PIL import Image

from vltrain.plots import group_panels, main, metric_series, plot_run, read_metrics, series_label
from vltrain.training import finite_numbers, log_metrics, start_metrics_file

from conftest import sft_config, write_image


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _panels(png: Path) -> list[str]:
    image = Image.open(png)
    image.load()
    return json.loads(image.text["Panels"])


def _write(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


# ---------------------------------------------------------------------------------------- the metrics file
def test_log_metrics_appends_one_line_per_call_with_only_finite_numbers(accelerator, tmp_path):
    out = tmp_path / "run"  # not there yet: created
    log_metrics(accelerator, out, {"loss": torch.tensor(0.25), "grad_norm": np.float32(1.5), "num": 3,
                                   "nan": math.nan, "inf": -math.inf, "flag": True, "name": "x", "vec": [1, 2],
                                   "big": torch.ones(2)}, step=1)
    log_metrics(accelerator, str(out), {"eval_loss": 0.5}, step=2)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 0.25, "grad_norm": 1.5, "num": 3},
                                                     {"step": 2, "eval_loss": 0.5}]
    assert type(json.loads(lines[0])["num"]) is int


def test_finite_numbers_keeps_ints_and_finite_floats():
    assert finite_numbers({"a": 1, "b": 2.5, "c": math.inf, "d": None, "e": False, "f": torch.tensor(7)}) == {
        "a": 1, "b": 2.5, "f": 7}


def test_fresh_run_starts_empty_and_resumed_run_keeps_steps_up_to_the_resume(accelerator, tmp_path):
    path = tmp_path / "metrics.jsonl"
    history = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)] + [{"step": 4, "eval_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in history) + '{"step": 7, "lo')  # cut by a kill
    start_metrics_file(accelerator, tmp_path, resumed_step=4)
    assert _lines(path) == [r for r in history if r["step"] <= 4]
    start_metrics_file(accelerator, tmp_path, resumed_step=None)
    assert path.read_text() == ""
    start_metrics_file(accelerator, tmp_path / "new", resumed_step=None)  # no folder yet
    assert (tmp_path / "new" / "metrics.jsonl").read_text() == ""


# ---------------------------------------------------------------------------------------- the SFT loop writes it
@pytest.fixture
def text_data(tmp_path) -> Path:
    write_image(tmp_path / "a.png", (56, 56), seed=3)
    records = [{"id": f"s{i}", "conversations": [{"from": "human", "value": f"Count to {i}."},
                                                 {"from": "gpt", "value": " ".join(str(k) for k in range(i + 1))}]}
               for i in range(6)]
    records.append({"id": "img", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "noise"}]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path


def _sft(cfg):
    from recipes.sft import main as sft_main

    try:
        return sft_main(cfg)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()


def test_sft_run_writes_each_step_once_after_a_resume_and_plots_it(tmp_path, text_data, one_thread):
    cfg = sft_config(tmp_path, "qwen2_vl", text_data, **{
        "train.max_steps": 6, "train.save_every": 3, "train.save_total_limit": 3, "train.eval_every": 2,
        "data.eval_path": str(text_data)})
    out = Path(cfg.train.output_dir)
    _write(out, [{"step": 99, "loss": 5.0}])  # an older run's history in the same folder: a fresh run drops it
    _sft(cfg)
    straight = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in straight if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in straight if "eval_loss" in r] == [2, 4, 6]
    assert {"lr", "grad_norm", "tokens_per_s", "memory_gib", "epoch"} <= set(straight[0])

    shutil.rmtree(out / "checkpoints" / "step_000006")  # as if killed after step 3: the file holds steps 4..6 too
    cfg.train.resume = "auto"
    _sft(cfg)
    resumed = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in resumed if "eval_loss" in r] == [2, 4, 6]
    assert resumed[:4] == straight[:4]  # steps 1..3 and the eval at 2 are the first run's lines, kept
    for again, first in zip(resumed[4:], straight[4:]):  # steps 4..6 trained again: the same losses (CPU)
        assert again.keys() == first.keys() and again["step"] == first["step"]
        for key in ("loss", "eval_loss"):
            assert again.get(key, 0.0) == pytest.approx(first.get(key, 0.0), rel=1e-4)

    png = plot_run(out)
    assert png == out / "plots.png"
    assert _panels(png) == ["loss", "learning rate", "grad norm", "tokens/s", "peak memory (GiB)"]
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (1500, 660)  # 3 columns x 2 rows of 500 x 330 px
    assert np.asarray(image.convert("L")).std() > 10  # something was drawn


# ---------------------------------------------------------------------------------------- plots of every loop
def _steps(keys, num_steps=20, **fixed):
    return [{"step": s, **{k: math.sin(s + i) + 2 for i, k in enumerate(keys)}, **fixed} for s in range(1, num_steps + 1)]


COMMON = ["loss", "grad_norm", "lr", "memory_gib", "epoch"]


def test_dpo_metrics_plot(tmp_path):
    train = COMMON + ["tokens_per_s", "pairs_per_s", "loss/sigmoid", "rewards/chosen", "rewards/rejected",
                      "rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected"]
    evals = [{"step": s, **{f"eval/{k}": 0.1 * s for k in ("loss", "loss/sigmoid", "rewards/chosen", "rewards/rejected",
                                                         "rewards/margin", "rewards/accuracy", "logps/chosen",
                                                         "logps/rejected")}} for s in (0, 10, 20)]
    png = plot_run(_write(tmp_path, _steps(train) + evals))
    assert _panels(png) == ["loss", "learning rate", "grad norm", "tokens/s", "pairs/s", "peak memory (GiB)",
                            "DPO reward margin", "DPO preference accuracy", "DPO chosen / rejected rewards",
                            "DPO log-probs"]
    assert Image.open(png).size == (1500, 4 * 330)


def test_dpo_with_two_loss_types_gets_a_components_panel():
    panels = dict(group_panels(["loss", "loss/sigmoid", "loss/sft", "eval/loss/sft"]))
    assert panels == {"loss": ["loss"], "DPO loss components": ["eval/loss/sft", "loss/sft", "loss/sigmoid"]}


def test_grpo_metrics_plot(tmp_path):
    train = COMMON + ["reward", "reward_std", "advantage_std", "completion_length", "completion_length_max",
                      "truncated_frac", "clip_frac", "kl", "entropy", "time/rollout_s", "time/reward_s",
                      "time/update_s", "rollout_tokens_per_s"]
    train += [f"rewards/{name}/{stat}" for name in ("format", "accuracy") for stat in ("mean", "std", "none_frac")]
    evals = [{"step": s, "eval/reward": 0.5, "eval/num_prompts": 8, "eval/rewards/format": 0.4,
              "eval/rewards/accuracy": 0.6} for s in (0, 20)]
    records = _steps(train) + evals
    records[3]["rewards/accuracy/std"] = None  # nan is never written; a null would be skipped too
    png = plot_run(_write(tmp_path, records))
    assert _panels(png) == ["loss", "learning rate", "grad norm", "tokens/s", "peak memory (GiB)", "GRPO rewards",
                            "GRPO reward / advantage std", "completion length (tokens)", "KL to reference", "entropy",
                            "clipped / truncated / no-reward fraction", "time per step (s)"]
    panels = dict(group_panels(metric_series(records)))
    # a reward function named "accuracy" is a GRPO reward, not DPO's preference accuracy
    assert panels["GRPO rewards"] == ["eval/reward", "eval/rewards/accuracy", "eval/rewards/format", "reward",
                                      "rewards/accuracy/mean", "rewards/format/mean"]
    assert [series_label(k) for k in panels["GRPO rewards"]] == [
        "eval total", "eval accuracy", "eval format", "total", "accuracy", "format"]


def test_cls_metrics_plot(tmp_path):
    train = COMMON + ["examples_per_s", "train_accuracy"]
    evals = [{"step": s, "eval/loss": 1.0 / (s + 1), "eval/accuracy": 0.5, "eval/macro_f1": 0.4, "eval/auroc": 0.7,
              "eval/num_examples": 32} for s in (0, 10, 20)]
    png = plot_run(_write(tmp_path, _steps(train) + evals), out=tmp_path / "elsewhere" / "cls.png")
    assert png == tmp_path / "elsewhere" / "cls.png" and not (tmp_path / "plots.png").exists()
    assert _panels(png) == ["loss", "learning rate", "grad norm", "examples/s", "peak memory (GiB)", "accuracy",
                            "eval metrics"]
    assert dict(group_panels(metric_series(evals)))["eval metrics"] == ["eval/auroc", "eval/macro_f1"]


def test_unknown_series_get_their_own_panel_and_a_step_logged_twice_keeps_the_last_value():
    records = [{"step": 1, "loss": 2.0, "my_metric": 1.0}, {"step": 2, "loss": 1.5}, {"step": 1, "loss": 1.8}]
    series = metric_series(records)
    assert series["loss"] == ([1, 2], [1.8, 1.5])
    assert group_panels(series) == [("loss", ["loss"]), ("my_metric", ["my_metric"])]


def test_read_metrics_skips_cut_and_stepless_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1}\n[1, 2]\n{"loss": 3}\n{"step": "2"}\n{"step": 3, "loss": 0.5}\n{"ste')
    assert read_metrics(path) == [{"step": 1, "loss": 1}, {"step": 3, "loss": 0.5}]


# ---------------------------------------------------------------------------------------- python -m vltrain.plots
def test_cli_prints_the_png_and_names_a_missing_metrics_file(tmp_path, capsys):
    _write(tmp_path / "run", _steps(["loss", "lr"], num_steps=3))
    assert main([str(tmp_path / "run")]) == tmp_path / "run" / "plots.png"
    assert capsys.readouterr().out.strip() == f"plots: {tmp_path / 'run' / 'plots.png'}"
    with pytest.raises(SystemExit) as error:
        main([str(tmp_path)])
    assert str(error.value) == f"error: {tmp_path / 'metrics.jsonl'} not found: OUTPUT_DIR must be a run's " \
                               "train.output_dir (every run writes its metrics.jsonl there)"
    with pytest.raises(SystemExit, match=r"error: --out .*plots.pdf: the plots are a PNG"):
        main([str(tmp_path / "run"), "--out", str(tmp_path / "plots.pdf")])


def test_nothing_to_plot_returns_none_and_says_so(tmp_path, capsys):
    _write(tmp_path, [{"step": 1, "epoch": 0}])
    assert plot_run(tmp_path) is None and not (tmp_path / "plots.png").exists()
    assert "nothing to plot" in capsys.readouterr().out
