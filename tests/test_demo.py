"""The embedded default: `vltrain sft` (= `accelerate launch recipes/sft.py`) with no arguments must really learn."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_demo_reaches_90_percent_held_out_accuracy(tmp_path):
    # the README's command (`vltrain sft`: the recipe through accelerate launch); overrides need their base named
    cmd = [sys.executable, "-m", "vltrain.cli", "sft", "demo", f"train.output_dir={tmp_path / 'demo'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["exact_match"] >= 0.90, summary
    assert summary["num_skipped"] == 0 and summary["num_bad_steps"] == 0
    assert f"model: {tmp_path / 'demo' / 'final'}" in proc.stdout  # the run ends by saying where its outputs are
    assert "held-out exact-match accuracy" in proc.stdout
    # balanced questions: a model that ignored the pixels could not get here
    records = [json.loads(line) for line in (tmp_path / "demo" / "exact_match.jsonl").read_text().splitlines()]
    shapes = [r for r in records if r["answer"] in ("circle", "square", "triangle")]
    assert len(shapes) > 60 and sum(r["correct"] for r in shapes) / len(shapes) > 0.8
    assert (tmp_path / "demo" / "final" / "model.safetensors").is_file()
    # the README's demo number, reproduced by batch inference on the same held-out records with the export
    preds = tmp_path / "preds.jsonl"
    proc = subprocess.run([sys.executable, "-m", "vltrain.infer", "--model", str(tmp_path / "demo" / "final"),
                           "--data", str(tmp_path / "demo" / "data" / "eval.json"), "--out", str(preds),
                           "--limit", str(len(records)), "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads(preds.with_suffix(".metrics.json").read_text())
    assert metrics["num_with_reference"] == len(records) and metrics["exact_match"] == summary["exact_match"], metrics
