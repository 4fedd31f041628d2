"""The GRPO benchmark script on CPU with the tiny preset: TRL's GRPOTrainer and vltrain's loops.grpo.train both run
rollouts of exactly the fixed completion length on the same prompts, train a step and report the throughput
fields."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

PROMPTS, GENERATIONS, TOKENS = 2, 4, 8


def test_runs_are_checked():
    from bench_grpo import parse_runs

    assert parse_runs("trl,vltrain") == ["trl", "vltrain"]
    for bad in ("hf", "trl,vllm", "trl:full"):
        with pytest.raises(ValueError, match="unknown run"):
            parse_runs(bad)


def test_fixed_length_settings_mask_eos_until_the_last_token():
    """A model that always prefers eos stops at once under plain settings, and runs the full length (no eos) under
    FixedLength: the mechanism the benchmark's vltrain rollouts use."""
    from bench_grpo import FixedLength
    from vltrain.generation import GenerationSettings, generate_encoded
    from vltrain.tiny import build_tiny

    model, processor = build_tiny("qwen2_5_vl")
    eos = processor.tokenizer.eos_token_id

    def favour_eos(module, args, logits):
        logits = logits.clone()
        logits[..., eos] += 100.0
        return logits

    model.lm_head.register_forward_hook(favour_eos)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
                                         tokenize=False, add_generation_prompt=True)
    prompt = dict(processor(text=[text], return_tensors="pt", return_mm_token_type_ids=True))
    plain = generate_encoded(model, processor, [prompt], GenerationSettings(max_new_tokens=5), num_generations=2,
                             show_progress=False)
    assert [(g.token_ids, g.finish_reason) for g in plain] == [([eos], "stop")] * 2
    fixed = generate_encoded(model, processor, [prompt], FixedLength(max_new_tokens=5, temperature=1.0),
                             num_generations=2, show_progress=False)
    for g in fixed:
        assert len(g.token_ids) == 5 and eos not in g.token_ids and g.finish_reason == "length"


def test_bench_grpo_trl_and_vltrain_on_a_tiny_preset(tmp_path):
    out = tmp_path / "grpo.json"
    cmd = [sys.executable, "benchmarks/bench_grpo.py", "--preset", "tiny_qwen2_5_vl", "--runs", "trl,vltrain",
           "--prompts", str(PROMPTS), "--generations", str(GENERATIONS), "--completion_tokens", str(TOKENS),
           "--steps", "1", "--warmup", "1", "--trl_micro_batch", "4", "--num_workers", "0",
           "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {r["tool"]: r for r in json.loads(out.read_text())}
    assert set(runs) == {"trl", "vltrain"}
    completions = PROMPTS * GENERATIONS
    for r in runs.values():
        assert r["ok"], r.get("detail", r.get("error"))
        for key in ("step_s", "rollout_s", "generate_s", "update_s", "rollout_tokens_per_s", "update_tokens_per_s",
                    "total_tokens_per_s", "completion_tokens_per_s", "peak_gib", "first_loss", "losses",
                    "prompt_tokens", "prompt_tokens_per_step"):
            assert key in r, (r["run"], key)
        # every completion of both steps (warm-up included) is exactly the fixed length
        assert r["num_completions"] == 2 * completions
        assert r["completion_length_min"] == r["completion_length_max"] == TOKENS
        assert len(r["losses"]) >= 2 and all(math.isfinite(x) for x in r["losses"])
        assert 0 < r["rollout_s"] <= r["step_s"] and 0 < r["generate_s"] <= r["rollout_s"]
        assert r["update_s"] == pytest.approx(r["step_s"] - r["rollout_s"])
        tokens = r["prompt_tokens"] + completions * TOKENS
        assert r["total_tokens_per_s"] == pytest.approx(tokens / r["step_s"])
        assert r["rollout_tokens_per_s"] == pytest.approx(completions * TOKENS / r["rollout_s"])
        assert r["prompt_tokens"] > completions * 16  # a 56px image is 4 merged tokens, plus ~50 words of text
    # both tools encoded the same prompts (each once over the two steps; TRL shuffles their order)
    assert sum(runs["trl"]["prompt_tokens_per_step"]) == sum(runs["vltrain"]["prompt_tokens_per_step"])
    assert len(runs["trl"]["prompt_tokens_per_step"]) == len(runs["vltrain"]["prompt_tokens_per_step"]) == 2
