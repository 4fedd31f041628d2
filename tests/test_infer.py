"""python -m vltrain.infer: batch inference on a data file reproduces the SFT recipe's held-out exact match."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_image
from vltrain import infer
from vltrain.data.formats import load_conversations

NUM_SCORED = 40  # train.eval_exact_match of the demo run below


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    """The SFT demo trained briefly in-process: (run folder, summary)."""
    import torch

    from recipes.sft import main as sft_main
    from vltrain.config import SFTConfig
    from vltrain.run import parse_config

    out = tmp_path_factory.mktemp("demo")
    cfg = parse_config(SFTConfig, ["demo", f"train.output_dir={out}", "train.max_steps=60",
                                   f"train.eval_exact_match={NUM_SCORED}", "train.eval_every=0", "data.num_workers=0",
                                   "train.report_to=none"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest.one_thread
    try:
        summary = sft_main(cfg)
    finally:
        torch.set_num_threads(threads)
    return out, summary


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vltrain.infer", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


# ------------------------------------------------------------------------------------------ the demo number
def test_batch_inference_reproduces_the_recipes_exact_match(demo_run, tmp_path, one_thread, capsys):
    run, summary = demo_run
    out = tmp_path / "preds.jsonl"
    metrics = infer.main(["--model", str(run / "final"), "--data", str(run / "data" / "eval.json"), "--out", str(out),
                          "--limit", str(NUM_SCORED), "--device", "cpu"])
    recipe = {r["id"]: r for r in _lines(run / "exact_match.jsonl")}
    lines = _lines(out)
    assert len(lines) == NUM_SCORED and {line["id"] for line in lines} == set(recipe)
    for line in lines:
        assert line["prediction"] == recipe[line["id"]]["reply"], line
        assert line["reference"] == recipe[line["id"]]["answer"] and line["exact_match"] == recipe[line["id"]]["correct"]
    assert metrics["exact_match"] == summary["exact_match"]
    assert metrics["num_predictions"] == metrics["num_with_reference"] == NUM_SCORED
    assert json.loads(infer.metrics_path(out).read_text()) == metrics
    printed = capsys.readouterr().out
    num_exact = sum(line["exact_match"] for line in lines)
    assert f"exact match {num_exact / NUM_SCORED:.1%} ({num_exact}/{NUM_SCORED})" in printed
    # the demo's images sit in data/images, not beside eval.json: the training run's image_folder was used
    assert "the training run's data.image_folder" in printed
    assert printed.rstrip().splitlines()[-1] == f"{NUM_SCORED} predictions written to {out}; metrics in {infer.metrics_path(out)}"


def test_batch_size_does_not_change_greedy_predictions(demo_run, tmp_path, one_thread):
    run, _ = demo_run
    predictions = []
    for batch_size in (1, 8):
        out = tmp_path / f"b{batch_size}.jsonl"
        infer.main(["--model", str(run), "--data", str(run / "data" / "eval.json"), "--out", str(out), "--limit", "10",
                    "--batch_size", str(batch_size), "--max_new_tokens", "8", "--device", "cpu"])
        predictions.append([(line["id"], line["prediction"]) for line in _lines(out)])
    assert predictions[0] == predictions[1]
    expected_ids = [c.sample_id for c in load_conversations(run / "data" / "eval.json")[:10]]
    assert [i for i, _ in predictions[0]] == expected_ids  # --limit: the first N records, in input order


def test_prompt_only_text_records_give_predictions_and_no_metrics(demo_run, tmp_path, one_thread, capsys):
    run, _ = demo_run
    data = tmp_path / "prompts.jsonl"
    records = [{"id": "hi", "conversations": [{"from": "human", "value": "Say hello."}]},
               {"id": "chat", "messages": [{"role": "user", "content": "What colour is the shape?"},
                                           {"role": "assistant", "content": "red"},
                                           {"role": "user", "content": "And the shape?"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "preds.jsonl"
    metrics = infer.main(["--model", str(run / "final"), "--data", str(data), "--out", str(out),
                          "--max_new_tokens", "4", "--device", "cpu"])
    lines = _lines(out)
    assert [line["id"] for line in lines] == ["hi", "chat"]
    assert all(set(line) == {"id", "prediction", "finish_reason"} for line in lines)
    assert metrics == {"num_predictions": 2, "num_with_reference": 0, "exact_match": None, "contains_match": None}
    assert not infer.metrics_path(out).exists()
    printed = capsys.readouterr().out
    assert "exact match" not in printed and printed.rstrip().endswith(f"2 predictions written to {out}")


def test_contains_match_on_hand_made_references(demo_run, tmp_path, one_thread):
    """The model's own greedy replies, re-referenced: in another case with padding (contains, not exact), the exact
    reply (both), and a word it did not say (neither)."""
    run, _ = demo_run
    eval_records = json.loads((run / "data" / "eval.json").read_text())[:3]
    first = tmp_path / "first.jsonl"
    infer.main(["--model", str(run / "final"), "--data", str(run / "data" / "eval.json"), "--out", str(first),
                "--limit", "3", "--device", "cpu"])
    said = [line["prediction"] for line in _lines(first)]
    assert all(said)
    references = [f"  {said[0].upper()} ", said[1], "hexagon"]
    for record, reference in zip(eval_records, references):
        record["conversations"][-1]["value"] = reference
    data = run / "data" / "hand_made.json"  # beside the images' folder, as the training data
    data.write_text(json.dumps(eval_records))
    out = tmp_path / "preds.jsonl"
    metrics = infer.main(["--model", str(run / "final"), "--data", str(data), "--out", str(out), "--device", "cpu"])
    lines = _lines(out)
    assert [line["prediction"] for line in lines] == said
    assert [(line["exact_match"], line["contains_match"]) for line in lines] == [(False, True), (True, True), (False, False)]
    assert metrics["exact_match"] == 1 / 3 and metrics["contains_match"] == 2 / 3


def test_score_line_normalises_case_and_whitespace_for_contains_only():
    line = infer.score_line("x", "It is a  Red\ncircle.", "stop", " red circle ")
    assert line["contains_match"] and not line["exact_match"]
    assert infer.score_line("x", "red", "stop", " red\n")["exact_match"]  # exact match compares stripped
    assert not infer.score_line("x", "red", "length", "green")["contains_match"]
    assert "reference" not in infer.score_line("x", "red", "stop", None)


# ------------------------------------------------------------------------------------------ media folder
def _image_records(folder: Path, names: list[str]) -> Path:
    data = folder / "data.json"
    data.write_text(json.dumps([{"id": f"s{i}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "a"}]} for i, name in enumerate(names)]))
    return data


def test_media_folder_order_given_then_training_run_then_data_file(tmp_path):
    trained, beside = tmp_path / "trained", tmp_path / "beside"
    trained.mkdir(), beside.mkdir()
    write_image(trained / "a.png"), write_image(beside / "a.png"), write_image(beside / "b.png")
    data = _image_records(beside, ["a.png"])
    convs = load_conversations(data)
    assert infer.choose_image_folder(convs, data, "/elsewhere", str(trained)) == ("/elsewhere", "--image_folder")
    assert infer.choose_image_folder(convs, data, None, str(trained)) == (str(trained), "the training run's data.image_folder")
    assert infer.choose_image_folder(convs, data, None, None) == (str(beside), "the data file's folder")
    # b.png is not in the training run's folder: every relative file must be there for it to be chosen
    data = _image_records(beside, ["a.png", "b.png"])
    assert infer.choose_image_folder(load_conversations(data), data, None, str(trained))[0] == str(beside)


def test_a_missing_media_file_names_the_sample(tmp_path):
    data = _image_records(tmp_path, ["gone.png"])
    convs = load_conversations(data)
    folder, why = infer.choose_image_folder(convs, data, None, None)
    with pytest.raises(ValueError, match=r"sample 's0': media file .*gone\.png' not found .*--image_folder"):
        infer.check_media(convs, folder, why)


# ------------------------------------------------------------------------------------------ errors, files
def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in last, last


def test_a_missing_data_file_is_a_one_line_error(tmp_path):
    proc = _run_cli("--model", str(tmp_path), "--data", str(tmp_path / "nope.json"), "--out", str(tmp_path / "p.jsonl"))
    _assert_one_line_error(proc, "nope.json", "does not exist")
    assert not (tmp_path / "p.jsonl").exists()


def test_a_bad_record_is_a_one_line_error_naming_the_sample(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"id": "ok", "conversations": [{"from": "human", "value": "hi"}]}) + "\n"
                    + json.dumps({"id": "broken", "conversations": [{"from": "gpt", "value": "no question"}]}) + "\n")
    proc = _run_cli("--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "p.jsonl"))
    _assert_one_line_error(proc, "id='broken'", "starts with an assistant turn")


def test_a_bad_generation_option_names_the_option():
    with pytest.raises(SystemExit, match=r"^error: --top_p must be in \(0, 1\]"):
        infer.main(["--model", "m", "--data", str(REPO / "nope.json"), "--out", "p.jsonl", "--top_p", "0"])


def test_a_crash_while_generating_leaves_the_old_predictions(demo_run, tmp_path, monkeypatch):
    run, _ = demo_run
    out = tmp_path / "preds.jsonl"
    out.write_text("old\n")

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-run")

    monkeypatch.setattr("vltrain.generation.generate", crash)
    with pytest.raises(RuntimeError, match="killed mid-run"):
        infer.main(["--model", str(run / "final"), "--data", str(run / "data" / "eval.json"), "--out", str(out),
                    "--limit", "2", "--device", "cpu"])
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl"]


def test_a_classifier_export_is_scored_by_vltrain_predict(tmp_path, monkeypatch, capsys):
    model = tmp_path / "cls_run" / "final"
    model.mkdir(parents=True)
    (model / "classifier.json").write_text("{}")
    calls = []
    monkeypatch.setattr("vltrain.predict.predict_file",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or {"num_predictions": 0, "metrics": None})
    result = infer.main(["--model", str(model.parent), "--data", "d.json", "--out", "p.jsonl", "--batch_size", "4",
                         "--image_folder", "imgs", "--device", "cpu"])
    assert result == {"num_predictions": 0, "metrics": None}
    assert calls == [((model, "d.json", "p.jsonl"), {"batch_size": 4, "image_folder": "imgs", "device": "cpu"})]
    assert "classifier export" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^error: .*classifier export.*--max_new_tokens, --limit"):
        infer.main(["--model", str(model), "--data", "d.json", "--out", "p.jsonl", "--max_new_tokens", "8",
                    "--limit", "3"])
    assert len(calls) == 1


def test_help_lists_every_option_with_its_meaning():
    text = infer.build_parser().format_help()
    for action in infer.build_parser()._actions:
        if action.dest != "help":
            assert action.option_strings[0] in text and action.help, action.dest


def test_python_m_entry_point_runs(demo_run, tmp_path):
    run, _ = demo_run
    data = tmp_path / "eval.json"  # a copy beside nothing: the training run's image folder still resolves it
    shutil.copy(run / "data" / "eval.json", data)
    out = tmp_path / "preds.jsonl"
    proc = _run_cli("--model", str(run / "final"), "--data", str(data), "--out", str(out), "--limit", "2",
                    "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_lines(out)) == 2 and proc.stdout.rstrip().endswith(f"metrics in {infer.metrics_path(out)}")
