"""The benchmark script itself, on CPU with a tiny preset: both paths run and compute the same loss."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_bench_sft_paths_agree_on_a_tiny_preset(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "benchmarks/bench_sft.py", "--preset", "tiny_qwen2_5_vl",
           "--runs", "vltrain:full:gc0,hf:full:gc1,vltrain:full:gc1@512", "--steps", "1", "--warmup", "0", "--num_samples", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())
    vltrain, hf = (next(r for r in runs if r["path"] == p) for p in ("vltrain", "hf"))
    assert vltrain["ok"] and hf["ok"]
    assert vltrain["padded_tokens"] == vltrain["real_tokens"] < hf["padded_tokens"]  # packing: no padding
    assert vltrain["losses"][0] == pytest.approx(hf["losses"][0], rel=1e-4)
    small = runs[2]  # checkpointing, a smaller per-run token budget: more micro-batches, same loss
    assert small["ok"] and small["token_budget"] == 512 and small["micro_batches"] > vltrain["micro_batches"]
    assert small["losses"][0] == pytest.approx(vltrain["losses"][0], rel=1e-4)
