"""The `vltrain` command (vltrain.cli): every command's --help, recipes through accelerate launch, and the last line
on screen after a user mistake being the recipe's one-line error (single and two-process launches)."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from conftest import REPO

CLI = [sys.executable, "-m", "vltrain.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(args, tmp_path, timeout=600):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=ENV)


def test_the_console_script_is_installed():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "vltrain"]
    assert script.value == "vltrain.cli:main"


def test_usage_lists_every_command(tmp_path):
    proc = _run(["--help"], tmp_path)
    assert proc.returncode == 0
    for command in ("sft", "dpo", "grpo", "cls", "serve", "generate", "inspect", "plot", "merge", "predict"):
        assert f"  {command} " in proc.stdout, command
    unknown = _run(["train"], tmp_path)
    assert unknown.returncode == 2 and "unknown command 'train'" in unknown.stderr


@pytest.mark.parametrize("command, expected", [
    ("sft", "train.max_steps (int, default -1)"), ("dpo", "dpo.beta (float, default 0.1)"),
    ("grpo", "grpo.num_generations (int, default 8)"), ("cls", "cls.problem_type ("),
    ("serve", "--host"), ("generate", "--data"), ("inspect", "--examples"), ("plot", "OUTPUT_DIR"),
    ("merge", "--base"), ("predict", "--model"),
])
def test_every_command_has_help(tmp_path, command, expected):
    proc = _run([command, "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expected in proc.stdout, proc.stdout[-3000:]
    assert f"vltrain {command}" in proc.stdout  # the usage line names the command the user typed
    assert not any(tmp_path.iterdir())  # --help wrote nothing


def test_split_and_complete_launch_arguments(monkeypatch, tmp_path):
    from vltrain import cli

    launch, recipe = cli.split_launch_args(["demo", "--num_processes", "2", "train.max_steps=3", "--mixed_precision=no"])
    assert launch == ["--num_processes", "2", "--mixed_precision=no"] and recipe == ["demo", "train.max_steps=3"]
    monkeypatch.setattr("accelerate.commands.config.default_config_file", str(tmp_path / "none.yaml"))
    assert cli.launch_arguments([]) == ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                                        "--dynamo_backend", "no"]
    assert "--multi_gpu" in cli.launch_arguments(["--num_processes", "2"])
    config = tmp_path / "acc.yaml"
    config.write_text("num_processes: 1\n")
    assert cli.launch_arguments(["--config_file", str(config)]) == ["--config_file", str(config)]  # the file decides
    with pytest.raises(ValueError, match="no such file"):
        cli.launch_arguments(["--config_file", str(tmp_path / "missing.yaml")])
    with pytest.raises(ValueError, match="positive integer"):
        cli.launch_arguments(["--num_processes", "two"])


def test_sft_trains_through_accelerate_launch_and_says_where_everything_is(tmp_path):
    out = tmp_path / "run"
    proc = _run(["sft", "demo", f"train.output_dir={out}", "train.max_steps=6", "train.log_every=2",
                 "train.eval_exact_match=8", "data.num_workers=0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "values were not passed" not in text and "Traceback" not in text
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    tail = proc.stdout.strip().splitlines()
    done = next(i for i, line in enumerate(tail) if line.startswith("done: 6 steps"))
    closing = "\n".join(tail[done:])
    for expected in (f"vltrain serve --model {out / 'final'}", f"tensorboard --logdir {out}", str(out / "plots.png"),
                     str(out / "metrics.jsonl"), str(out / "exact_match.jsonl"), "AutoModelForImageTextToText"):
        assert expected in closing, closing
    assert (out / "plots.png").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4, 6]
    assert any("eval/exact_match" in m for m in metrics)  # held-out accuracy reaches the trackers too
    assert "peak lr 3.00e-03" in proc.stdout and "train.max_steps=6 sets the length" in proc.stdout


@pytest.mark.parametrize("processes", [1, 2])
def test_a_mistake_ends_on_the_one_line_error(tmp_path, processes):
    args = ["sft", "--num_processes", str(processes), "--main_process_port", str(29650 + processes),
            f"data.train_path={tmp_path / 'missing.json'}", f"train.output_dir={tmp_path / 'out'}", "train.report_to=none"]
    proc = _run(args, tmp_path)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1] == f"data error: data file '{tmp_path / 'missing.json'}' does not exist", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr
    assert "ChildFailedError" not in proc.stderr and "values were not passed" not in proc.stderr


def test_a_bad_override_ends_on_the_config_error(tmp_path):
    proc = _run(["dpo", "dpo.beta=-1", f"train.output_dir={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 1
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("config error:") and "beta" in last and "Traceback" not in proc.stderr


def test_tools_turn_mistakes_into_one_line(tmp_path):
    proc = _run(["plot", str(tmp_path)], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and "metrics.jsonl" in proc.stderr
