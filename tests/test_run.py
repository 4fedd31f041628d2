"""Around the loop (vltrain.run + recipes/sft.py): one-line errors, --help, and re-running a finished or
export-interrupted job with train.resume=auto."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, sft_config


def _exit_message(argv, capsys=None):
    from recipes.sft import main, setup
    from vltrain.run import run_recipe

    with pytest.raises(SystemExit) as info:
        run_recipe(setup, main, argv)
    message = str(info.value.code)
    assert "\n" not in message.strip() and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("argv, expected", [
    (["train.micro_batch_size=many"], r"config error: train\.micro_batch_size must be an integer"),
    (["lora.rank=8"], r"config error: lora\.rank=8 only means something with lora\.enabled=true"),
    (["no_such_config"], r"config error: config file 'no_such_config' does not exist"),
])
def test_config_mistakes_end_in_one_line(argv, expected):
    assert __import__("re").match(expected, _exit_message(argv))


def test_data_and_model_mistakes_end_in_one_line(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    message = _exit_message([f"data.train_path={empty}", f"train.output_dir={tmp_path / 'out'}", "train.report_to=none"])
    assert message.startswith("data error:") and "empty.json" in message
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n{oops\n')
    message = _exit_message([f"data.train_path={bad}", f"train.output_dir={tmp_path / 'out'}", "train.report_to=none"])
    assert message.startswith("data error:") and "bad.jsonl:2" in message
    good = tmp_path / "good.jsonl"
    good.write_text(bad.read_text().splitlines()[0] + "\n")
    message = _exit_message([f"data.train_path={good}", f"model.name_or_path={tmp_path / 'no' / 'model'}",
                             f"train.output_dir={tmp_path / 'out'}", "train.report_to=none"])
    assert message.startswith("error: model.name_or_path=") and "no such folder" in message


@pytest.mark.parametrize("recipe, cls_name", [("sft", "SFTConfig"), ("dpo", "DPOConfig"), ("grpo", "GRPOConfig"),
                                             ("cls", "CLSConfig")])
def test_help_lists_every_config_field_and_trains_nothing(tmp_path, recipe, cls_name):
    """`recipes/X.py --help`: the commands, then every field of the recipe's config with its type, default and a
    one-line meaning (the comment next to the field in vltrain/config.py)."""
    import dataclasses

    import vltrain.config as config

    proc = subprocess.run([sys.executable, f"recipes/{recipe}.py", "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0 and f"accelerate launch recipes/{recipe}.py" in proc.stdout
    assert "section.field=value" in proc.stdout and not (REPO / "outputs" / "--help").exists()
    cls = getattr(config, cls_name)
    defaults = cls()
    lines = proc.stdout.splitlines()
    for section in dataclasses.fields(cls):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            name = f"{section.name}.{f.name}"
            row = next((i for i, line in enumerate(lines) if line.startswith(f"  {name} (")), None)
            assert row is not None, f"--help does not list {name}"
            assert f"default {getattr(getattr(defaults, section.name), f.name)!r})" in lines[row], lines[row]
            meaning = lines[row + 1] if row + 1 < len(lines) else ""
            assert meaning.startswith("      ") and len(meaning.strip()) > 8, f"{name} has no meaning line"


def test_a_failed_run_leaves_the_previous_config_yaml_alone(tmp_path):
    """A run that fails on its data path or its model path writes nothing into output_dir first."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("the previous run's config\n")
    message = _exit_message([f"data.train_path={tmp_path / 'missing.json'}", f"train.output_dir={out}",
                             "train.report_to=none"])
    assert message.startswith("data error:") and "missing.json" in message
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n')
    message = _exit_message([f"data.train_path={good}", f"model.name_or_path={tmp_path / 'no' / 'model'}",
                             f"train.output_dir={out}", "train.report_to=none"])
    assert message.startswith("error: model.name_or_path=")
    assert (out / "config.yaml").read_text() == "the previous run's config\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]


def test_a_finished_run_rerun_with_resume_auto_finishes_cleanly(tmp_path, mixed_data):
    """Resuming from the final-step checkpoint (a finished job re-run, or a job killed during its export)
    re-exports and writes the summary, with every step's loss."""
    from recipes.sft import main

    cfg = sft_config(tmp_path, "qwen2_vl", mixed_data, **{"train.max_steps": 4, "train.save_every": 2})
    first = main(cfg)
    out = tmp_path / "out"
    shutil.rmtree(out / "final")  # as if killed during the export
    (out / "summary.json").unlink()
    cfg.train.resume = "auto"
    again = main(cfg)
    assert again["steps"] == 4 and again["losses"] == first["losses"] and len(again["losses"]) == 4
    assert (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["final_loss"] == first["final_loss"]


def test_an_error_raised_in_a_loader_worker_is_reported_by_its_own_message():
    from torch.utils.data import DataLoader

    from vltrain.run import one_line

    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise ValueError("train.json: sample 1 (id='x') assistant turn 0: <think> not closed")

    with pytest.raises(ValueError) as info:
        next(iter(DataLoader(Bad(), num_workers=1)))
    assert "Original Traceback" in str(info.value)  # what torch hands the main process
    assert one_line(info.value) == "train.json: sample 1 (id='x') assistant turn 0: <think> not closed"


def test_truncations_are_counted_in_the_summary(tmp_path):
    from recipes.sft import main

    long_answer = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
    records = [
        {"id": "long", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello there"},
                                         {"from": "human", "value": "Describe the image."},
                                         {"from": "gpt", "value": long_answer}]},
        {"id": "short", "conversations": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "hello"}]},
    ]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    cfg = sft_config(tmp_path, "qwen2_vl", data, **{"train.max_steps": 2, "data.max_seq_length": 48,
                                                    "train.micro_batch_size": 2})
    summary = main(cfg)
    truncated = summary["truncated"]
    assert truncated["num_truncated"] == 2  # the long sample, once per step (both steps see it)
    first = truncated["records"][0]
    assert first["id"] == "long" and first["tokens_before"] > 48 >= first["tokens_after"]
    assert summary["num_skipped"] == 0  # its first assistant turn still trains
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["truncated"] == truncated


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao (vltrain[fp8]) is not installed")
def test_torchaos_enum_notice_from_torch_is_not_shown_once_logging_is_set_up():
    """With torchao installed, importing it (transformers does whenever it builds a model) makes torch log an
    'Enum subclass' deprecation notice users cannot act on; setup_logging drops it and nothing else."""
    import subprocess

    def run(setup: bool) -> str:
        code = ("import logging\nfrom vltrain.tracking import setup_logging\n"
                + ("setup_logging(True)\n" if setup else "")
                + "import torchao.float8\nlogging.getLogger('torch.utils._pytree').warning('another pytree notice')\n")
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout + proc.stderr

    assert "is an Enum subclass" in run(setup=False)
    shown = run(setup=True)
    assert "is an Enum subclass" not in shown and "another pytree notice" in shown


def test_a_failure_during_a_progress_bar_ends_on_the_message_not_on_the_bar():
    """A mistake found while a bar is drawn (a bad record in the loop): `fail` closes the bar first, so the error is
    the last line of stderr, on a line of its own (before, the bar was redrawn after it at exit)."""
    script = ("import sys\nfrom tqdm.auto import tqdm\nfrom vltrain.run import fail\n"
              "bar = tqdm(total=10, desc='sft')\nbar.update(3)\nfail('data error: record 7 of a.json: no image')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.rstrip("\n").split("\n")
    assert lines[-1] == "data error: record 7 of a.json: no image", proc.stderr
    assert "3/10" in lines[-2], proc.stderr
