"""The DPO benchmark script on CPU with the tiny preset: TRL's DPOTrainer and vltrain both train the same
pairs, start at the DPO loss of policy == reference, and vltrain sends each image through the tower once."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


def test_run_specs_are_checked():
    from bench_dpo import parse_spec

    assert parse_spec("trl:full") == ("trl", "full", True)
    assert parse_spec("vltrain:lora:gc0") == ("vltrain", "lora", False)
    for bad in ("hf:full", "trl:qlora", "trl:full:gc2", "vltrain"):
        with pytest.raises(ValueError, match="bad run spec"):
            parse_spec(bad)


def test_bench_dpo_trl_and_vltrain_on_a_tiny_preset(tmp_path):
    out = tmp_path / "dpo.json"
    cmd = [sys.executable, "benchmarks/bench_dpo.py", "--preset", "tiny_qwen2_5_vl", "--runs", "trl:full,vltrain:full",
           "--pairs", "4", "--steps", "1", "--warmup", "1", "--trl_micro_batch", "2", "--num_workers", "0",
           "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())
    trl, vltrain = (next(r for r in runs if r["tool"] == tool) for tool in ("trl", "vltrain"))
    for r in (trl, vltrain):
        assert r["ok"], r.get("detail", r.get("error"))
        for key in ("pairs_per_s", "wall_pairs_per_s", "tokens_per_s", "step_s", "mfu", "peak_gib", "first_loss",
                    "vision_calls_per_pair", "vision_media_calls_per_pair", "vision_images_per_pair",
                    "vision_patches_per_pair", "real_tokens", "tool_tokens", "losses"):
            assert key in r, (r["run"], key)
        assert r["pairs_per_s"] > 0 and len(r["losses"]) == 2  # warm-up + one timed step
        # sigmoid DPO with policy == reference: -log sigmoid(0) at the first step
        assert math.isfinite(r["first_loss"]) and abs(r["first_loss"] - math.log(2)) < 1e-3, (r["run"], r["losses"])
        assert r["losses"][1] < r["first_loss"]  # one optimizer step moved the policy the DPO way
        # every tool ran exactly the pairs' non-pad tokens (the tool-neutral count)
        assert r["tool_tokens"] == r["real_tokens"], r["run"]
    assert trl["real_tokens"] == vltrain["real_tokens"]
    # TRL: each image twice (chosen and rejected rows) for the policy and twice for the reference;
    # vltrain: each image's pixels once per model
    assert trl["vision_images_per_pair"] == 4 and trl["vision_patches_per_pair"] == 4 * trl["patches_per_pair"]
    assert vltrain["vision_patches_per_pair"] <= trl["vision_patches_per_pair"] / 2
    assert vltrain["vision_media_calls_per_pair"] < trl["vision_media_calls_per_pair"]  # 4 pairs in one micro-batch
    assert trl["tool_padded_tokens"] > trl["tool_tokens"]  # its padded rows; vltrain packs them into one row
