"""The GRPO loop on tiny models: rollouts with one vision pass per prompt, the training rows, learning from a
reward file, num_iterations, accumulation, video prompts, resume, SIGTERM, two processes, the demo."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin

from loops.grpo import grpo_loss, per_sequence, rollout_settings, train, training_batch
from vltrain.config import GRPOConfig, load_config
from vltrain.data.media import MediaOptions
from vltrain.data.prompts import PromptDataset, collate_prompts
from vltrain.families import RopeIndex, family_spec
from vltrain.generation import GenerationSettings, generate_encoded
from vltrain.rewards import load_rewards
from vltrain.tiny import build_tiny

from sigterm import sigterm_at
from conftest import REPO

REWARD_FILE = '''
def even_reward(completions, completion_ids, **kwargs):
    """Dense and reachable from a random model: the fraction of completion tokens with an even id."""
    return [sum(i % 2 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids]


def level_reward(completions, level, **kwargs):
    """A record column reaches the reward by name; None where the record has no level."""
    return [None if lv is None else 0.0 for lv in level]
'''


def prompt_records() -> list[dict]:
    return [
        {"id": "text", "conversations": [{"from": "human", "value": "Say a colour."}, {"from": "gpt", "value": "red"}]},
        {"id": "img", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                         {"from": "gpt", "value": "red"}], "level": 1},
        {"id": "noplaceholder", "image": "b.png", "conversations": [{"from": "human", "value": "Which colour?"},
                                                                    {"from": "gpt", "value": "red"}], "level": 2},
        {"id": "vid", "video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat colour?"},
                                                            {"from": "gpt", "value": "red"}], "level": 3},
    ]


@pytest.fixture
def prompt_data(media_dir):
    path = media_dir / "prompts.json"
    path.write_text(json.dumps(prompt_records()))
    (media_dir / "my_rewards.py").write_text(REWARD_FILE)
    return path


def grpo_config(tmp_path, train_path, model_type="qwen2_5_vl", **overrides) -> GRPOConfig:
    base = {
        "model.name_or_path": f"tiny:{model_type}", "model.dtype": "float32", "model.attn_implementation": "sdpa",
        "data.train_path": str(train_path), "data.image_folder": str(train_path.parent), "data.num_workers": 0,
        "data.max_seq_length": 1024, "data.nframes": 4, "data.image_max_pixels": 64 * 64 * 2,
        "data.video_max_pixels": 64 * 64, "data.packing": "true", "optim.lr": 3e-3, "optim.warmup_steps": 0,
        "optim.scheduler": "constant", "train.output_dir": str(tmp_path / "out"), "train.report_to": "none",
        "train.max_steps": 4, "train.micro_batch_size": 2, "train.log_every": 1,
        "grpo.num_generations": 4, "grpo.max_completion_length": 6,
        "grpo.rewards": f"[{train_path.parent / 'my_rewards.py'}]",
    }
    base.update(overrides)
    return load_config(GRPOConfig, None, [f"{k}={v}" for k, v in base.items()])


def _dataset(model_type, processor, path):
    media = MediaOptions(image_factor=family_spec(model_type).image_factor, image_max_pixels=64 * 64 * 2,
                         video_max_pixels=64 * 64, nframes=4)
    return PromptDataset(path, processor, media, max_prompt_length=1024, image_folder=str(path.parent))


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen3_vl"])
def test_rollout_runs_the_vision_tower_once_per_prompt(model_type, prompt_data):
    model, processor = build_tiny(model_type)
    ds = _dataset(model_type, processor, prompt_data)
    prompts = [ds[i] for i in range(4)]
    unique = sum(int(p["image_grid_thw"].prod(-1).sum()) for p in prompts if "image_grid_thw" in p)
    unique += sum(int(p["video_grid_thw"].prod(-1).sum()) for p in prompts if "video_grid_thw" in p)
    patches = []
    hook = model.model.visual.register_forward_hook(
        lambda m, args, kwargs, out: patches.append(int(kwargs["grid_thw"].prod(-1).sum())), with_kwargs=True)
    greedy = GenerationSettings(max_new_tokens=5)
    grouped = generate_encoded(model, processor, prompts, greedy, num_generations=3, batch_size=4, show_progress=False)
    hook.remove()
    assert sum(patches) == unique, (patches, unique)  # not 3x: the tower runs once per prompt
    singles = generate_encoded(model, processor, prompts, greedy, num_generations=1, batch_size=1, show_progress=False)
    assert len(grouped) == 12
    for k, single in enumerate(singles):  # greedy: every row of a group is the prompt's own greedy completion
        assert [g.token_ids for g in grouped[3 * k:3 * k + 3]] == [single.token_ids] * 3


def test_training_rows_label_only_the_completion_and_per_sequence_reads_them_back(prompt_data):
    model, processor = build_tiny("qwen2_5_vl")
    ds = _dataset("qwen2_5_vl", processor, prompt_data)
    prompts = [ds[i] for i in range(4)]
    generations = generate_encoded(model, processor, prompts, rollout_settings(grpo_config(
        prompt_data.parent, prompt_data).grpo), num_generations=2, show_progress=False)
    for packing in (True, False):
        batch = training_batch(prompts, generations, 2, rope_index=RopeIndex(model) if packing else None,
                               pad_token_id=processor.tokenizer.pad_token_id)
        assert batch["num_sequences"] == 8 and batch["completion_mask"].tolist() == [1.0] * 8
        values = torch.arange(batch["labels"].numel(), dtype=torch.float32).reshape(batch["labels"].shape)
        out, mask = per_sequence(values, batch)
        assert mask.sum(1).tolist() == [len(g.token_ids) for g in generations]
        labels = batch["labels"]
        # the per-sequence values are the labelled positions, in order
        assert out[mask.bool()].tolist() == values[labels != -100].tolist()
    assert batch["image_source"].tolist() == [0, 0, 1, 1]  # each image prompt's pixels once, two rows each


def test_mask_truncated_completions_masks_cut_completions_out_of_the_loss(prompt_data):
    """A completion cut at max_completion_length gets completion_mask 0 and no gradient; a finished one keeps it."""
    import dataclasses

    model, processor = build_tiny("qwen2_5_vl")
    ds = _dataset("qwen2_5_vl", processor, prompt_data)
    prompts = [ds[i] for i in range(2)]
    generations = generate_encoded(model, processor, prompts, rollout_settings(grpo_config(
        prompt_data.parent, prompt_data).grpo), num_generations=2, show_progress=False)
    reasons = ["length", "stop", "stop", "length"]
    generations = [dataclasses.replace(g, finish_reason=r) for g, r in zip(generations, reasons)]
    pad = processor.tokenizer.pad_token_id
    kept = training_batch(prompts, generations, 2, rope_index=None, pad_token_id=pad, mask_truncated=False)
    masked = training_batch(prompts, generations, 2, rope_index=None, pad_token_id=pad, mask_truncated=True)
    assert kept["completion_mask"].tolist() == [1.0] * 4
    assert masked["completion_mask"].tolist() == [0.0, 1.0, 1.0, 0.0]

    grpo_cfg = grpo_config(prompt_data.parent, prompt_data).grpo

    def grads(batch, advantages):
        model.zero_grad()
        grpo_loss(model, batch, grpo_cfg, advantages=advantages, normaliser=10.0)[0].backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()

    only_finished = torch.tensor([0.0, 1.0, -1.0, 0.0])
    big_on_truncated = torch.tensor([5.0, 1.0, -1.0, -7.0])  # changes nothing once the cut rows are masked
    torch.testing.assert_close(grads(masked, big_on_truncated), grads(masked, only_finished))
    assert not torch.allclose(grads(kept, big_on_truncated), grads(kept, only_finished))


def test_research_code_learns_from_a_reward_file(tmp_path, prompt_data):
    """`from loops.grpo import train` with hand-built objects: the reward from a user's file rises."""
    model, processor = build_tiny("qwen2_vl")
    cfg = grpo_config(tmp_path, prompt_data, "qwen2_vl", **{"train.max_steps": 12, "optim.lr": 2e-2,
                                                           "grpo.num_generations": 8, "data.packing": "false"})
    ds = _dataset("qwen2_vl", processor, prompt_data)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, collate_fn=collate_prompts)
    accelerator = Accelerator(gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1,
                                                                                      sync_with_dataloader=False))
    rewards = load_rewards(cfg.grpo.rewards)
    assert [r.name for r in rewards] == ["even_reward", "level_reward"]
    result = train(accelerator, model, processor, loader, cfg.train, cfg.optim, cfg.grpo, rewards,
                   eval_prompts=[ds[i] for i in range(4)], packing=False)
    before, after = result.eval_rewards[0][1]["reward"], result.eval_rewards[-1][1]["reward"]
    assert result.step == 12 and after > before + 0.2, (before, after)
    assert result.metrics[-1]["reward"] > result.metrics[0]["reward"]
    assert {"clip_frac", "entropy", "time/rollout_s", "rollout_tokens_per_s", "completion_length"} <= set(result.metrics[0])
    accelerator.end_training()


def test_num_iterations_reuse_the_rollout_and_ratios_move_after_the_first_update(tmp_path, prompt_data, monkeypatch):
    import loops.grpo as loop

    calls, ratios = [], []
    real_rollout, real_policy_loss = loop.Rollout.__call__, loop.policy_loss

    def counting_rollout(self, model, prompts):
        calls.append(len(prompts))
        return real_rollout(self, model, prompts)

    def recording_policy_loss(*args, **kwargs):
        loss, stats = real_policy_loss(*args, **kwargs)
        ratios.append(float(stats["ratio_sum"] / stats["num_tokens"].clamp(min=1)))
        return loss, stats

    monkeypatch.setattr(loop.Rollout, "__call__", counting_rollout)
    monkeypatch.setattr(loop, "policy_loss", recording_policy_loss)
    from recipes.grpo import main

    summary = main(grpo_config(tmp_path, prompt_data, **{"train.max_steps": 4, "grpo.num_iterations": 2,
                                                         "optim.lr": 1e-2}))
    assert summary["steps"] == 4 and calls == [2, 2]  # one rollout per two optimizer steps
    assert ratios[0] == pytest.approx(1.0, abs=1e-6) and ratios[2] == pytest.approx(1.0, abs=1e-6)
    assert abs(ratios[1] - 1.0) > 1e-6 and abs(ratios[3] - 1.0) > 1e-6  # the second update sees a moved policy


def test_an_epoch_with_num_iterations_sees_every_prompt_once(tmp_path, prompt_data, monkeypatch):
    """train.num_epochs=1 with grpo.num_iterations=2: every prompt is rolled out once, each rollout feeds two
    steps (the step count was that of one iteration, so an epoch stopped halfway through the data)."""
    import loops.grpo as loop
    from recipes.grpo import main

    seen = []
    real_rollout = loop.Rollout.__call__

    def counting_rollout(self, model, prompts):
        seen.extend(p["id"] for p in prompts)
        return real_rollout(self, model, prompts)

    monkeypatch.setattr(loop.Rollout, "__call__", counting_rollout)
    summary = main(grpo_config(tmp_path, prompt_data, **{"train.max_steps": -1, "train.num_epochs": 1,
                                                         "grpo.num_iterations": 2}))
    num_prompts = len(json.loads(prompt_data.read_text()))
    assert sorted(seen) == sorted(dict.fromkeys(seen)) and len(seen) == num_prompts
    assert summary["steps"] == 2 * math.ceil(num_prompts / 2)  # micro_batch_size 2, one rollout per 2 steps


def test_gradient_accumulation_and_a_video_prompt_train(tmp_path, prompt_data):
    from recipes.grpo import main

    summary = main(grpo_config(tmp_path, prompt_data, "qwen3_vl", **{
        "train.max_steps": 3, "train.micro_batch_size": 1, "train.gradient_accumulation_steps": 2,
        "grpo.beta": 0.1}))  # beta > 0: a reference and the KL term
    assert summary["steps"] == 3 and summary["num_skipped"] == 0
    metrics = summary["last_step_metrics"]
    assert math.isfinite(metrics["kl"]) and metrics["kl"] >= 0 and "rewards/even_reward/mean" in metrics
    lines = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert lines and {"prompt", "completions", "rewards", "advantages"} <= set(lines[0])
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_a_missing_reward_file_fails_before_anything_loads(tmp_path, prompt_data):
    from recipes.grpo import main

    with pytest.raises(ValueError, match="nope.py"):
        main(grpo_config(tmp_path, prompt_data, **{"grpo.rewards": f"[{tmp_path / 'nope.py'}:f]"}))
    assert not (tmp_path / "out").exists()


def test_resume_from_a_checkpoint_gives_the_straight_run(tmp_path, prompt_data):
    from recipes.grpo import main

    straight = main(grpo_config(tmp_path / "straight", prompt_data, **{"train.max_steps": 4}))
    main(grpo_config(tmp_path / "cut", prompt_data, **{"train.max_steps": 2, "train.save_every": 2}))
    resumed = main(grpo_config(tmp_path / "cut", prompt_data, **{"train.max_steps": 4, "train.resume": "auto"}))
    assert resumed["steps"] == 4
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5, abs=1e-7)


def test_sigterm_checkpoints_exits_0_and_resumes(tmp_path, prompt_data):
    cfg = grpo_config(tmp_path, prompt_data)
    args = [f"model.name_or_path={cfg.model.name_or_path}", "model.dtype=float32", "model.attn_implementation=sdpa",
            f"data.train_path={prompt_data}", f"data.image_folder={prompt_data.parent}", "data.num_workers=1",
            "data.nframes=4", f"data.image_max_pixels={64 * 64 * 2}", f"data.video_max_pixels={64 * 64}",
            "train.report_to=none", "train.max_steps=60", "train.micro_batch_size=2", "train.log_every=1",
            f"train.output_dir={tmp_path / 'out'}", "optim.warmup_steps=0", "grpo.num_generations=4",
            "grpo.max_completion_length=6", f"grpo.rewards=[{prompt_data.parent / 'my_rewards.py'}]"]
    returncode, output = sigterm_at(REPO / "recipes" / "grpo.py", args, "step  3/60")
    assert returncode == 0, output[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["preempted"] == "SIGTERM" and 3 <= summary["steps"] < 60 and "Traceback" not in output
    assert (tmp_path / "out" / "checkpoints" / f"step_{summary['steps']:06d}" / "COMPLETE").is_file()


def test_two_process_cpu_run(tmp_path, prompt_data):
    cfg = grpo_config(tmp_path, prompt_data)
    args = [f"model.name_or_path={cfg.model.name_or_path}", "model.dtype=float32", "model.attn_implementation=sdpa",
            f"data.train_path={prompt_data}", f"data.image_folder={prompt_data.parent}", "data.num_workers=0",
            "data.nframes=4", f"data.image_max_pixels={64 * 64 * 2}", f"data.video_max_pixels={64 * 64}",
            "data.packing=true", "train.report_to=none", "train.max_steps=2", "train.micro_batch_size=1",
            f"train.output_dir={tmp_path / 'out'}", "optim.warmup_steps=0", "grpo.num_generations=4",
            "grpo.max_completion_length=6", f"grpo.rewards=[{prompt_data.parent / 'my_rewards.py'}]",
            "grpo.scale_rewards=batch"]  # its std gathered from both ranks
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29539",
           str(REPO / "recipes" / "grpo.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and all(math.isfinite(x) for x in summary["losses"])
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


def test_lora_rollouts_train_the_adapters_and_a_too_long_prompt_is_skipped(tmp_path, prompt_data, media_dir):
    from recipes.grpo import main

    records = prompt_records() + [{"id": "long", "conversations": [
        {"from": "human", "value": "word " * 400}, {"from": "gpt", "value": "red"}]}]
    path = media_dir / "with_long.json"
    path.write_text(json.dumps(records))
    summary = main(grpo_config(tmp_path, path, **{
        "lora.enabled": "true", "lora.rank": 8, "lora.alpha": 16, "trainable.freeze_llm": "true",
        "trainable.freeze_vision_tower": "true", "grpo.max_prompt_length": 200, "train.max_steps": 3,
        "train.micro_batch_size": 5, "data.max_bad_fraction": 0.5}))
    assert summary["steps"] == 3 and summary["num_skipped"] >= 1
    assert any(r["id"] == "long" and "max_seq_length=200" in r["reason"] for r in summary["skipped"]["records"])
    assert (tmp_path / "out" / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_mislabeled_shapes_mislabel_the_train_colour_answers_only_and_consistently(tmp_path):
    """The GRPO demo's SFT data: about 60% of the train colour answers give the next name in a fixed cycle; shape
    answers and every eval answer are right; the GRPO data asks colours only."""
    import itertools

    from vltrain.synthetic import COLOURS, QUESTIONS, SHAPES, mislabeled, write_shapes_dataset

    combos = list(itertools.product(SHAPES, COLOURS, QUESTIONS))
    train, held_out = write_shapes_dataset(tmp_path / "sft", num_train=480, num_eval=48, mislabel=0.6)
    for path, lo, hi in ((train, 0.5, 0.7), (held_out, 0.0, 0.0)):
        wrong = {"colour": 0, "shape": 0}
        for r in json.loads(path.read_text()):
            shape, colour, kind = combos[int(r["id"].split("-")[1]) % len(combos)]
            truth, given = (colour if kind == "colour" else shape), r["conversations"][1]["value"]
            assert given in (truth, mislabeled(truth))
            wrong[kind] += given != truth
        assert lo <= wrong["colour"] / (len(json.loads(path.read_text())) / 2) <= hi and wrong["shape"] == 0, wrong
    assert [mislabeled(c) for c in ("red", "yellow", "triangle")] == ["green", "red", "circle"]
    train, _ = write_shapes_dataset(tmp_path / "grpo", num_train=48, num_eval=24, kinds=("colour",))
    records = json.loads(train.read_text())
    assert {r["conversations"][0]["value"] for r in records} == {"<image>\nWhat colour is the shape?"}
    assert sorted(r["conversations"][1]["value"] for r in records) == sorted(list(COLOURS) * 12)


@pytest.mark.slow
def test_demo_raises_the_held_out_reward(tmp_path):
    """`accelerate launch recipes/grpo.py`: an SFT model that learned mislabelled colour names, GRPO with the shipped
    reward file; the issue's example target (below 0.5 before, above 0.8 after)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/grpo.py", "grpo_demo",
           f"train.output_dir={tmp_path / 'grpo'}", f"model.name_or_path={tmp_path / 'sft' / 'final'}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"demo wall time (SFT stage included): {time.monotonic() - start:.0f} s")
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    before, after = summary["eval"][0]["reward"], summary["eval"][-1]["reward"]
    assert before < 0.5 and after > 0.8, (before, after)
    assert "held-out mean reward" in proc.stdout and (tmp_path / "grpo" / "completions.jsonl").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("backend, nproc", [("zero3", 2), pytest.param("fsdp2", 1, marks=pytest.mark.gpu)])
def test_sharded_grpo_rollouts_and_updates_run(tmp_path, prompt_data, backend, nproc):
    """ZeRO-3 (2 CPU processes) / FSDP2 (accelerate runs FSDP only on CUDA: one GPU process): synced generation
    of every rank's own prompts (one image prompt and one text / video prompt per rank), a sharded reference
    (beta > 0), finite losses on every rank, and the same reward / length metrics (gathered) on every rank."""
    if backend == "zero3":
        pytest.importorskip("deepspeed")
    import socket

    model, processor = build_tiny("qwen2_5_vl")
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / backend
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(REPO / "tests" / "dist_recipe.py"), "grpo", backend, str(prompt_data), str(out),
           f"model.name_or_path={tmp_path / 'tiny'}", "train.max_steps=2", "train.micro_batch_size=1", "grpo.beta=0.1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    if backend == "zero3":
        assert ranks[0]["model"] == "DeepSpeedEngine" and ranks[0]["reference"] == "DeepSpeedEngine"
    else:  # fully_shard swaps in an FSDP subclass of the model's class, for the policy and the frozen reference
        assert ranks[0]["model"].startswith("FSDP") and ranks[0]["reference"].startswith("FSDP"), ranks[0]
    assert all(r["losses"] == ranks[0]["losses"] for r in ranks) and all(math.isfinite(x) for x in ranks[0]["losses"])
    # reward / length stats are over every rank's completions (each rank generated for its own prompts), and the
    # rollout rate is the job's, so every rank logs the same values; only the timings are a rank's own
    def shared(rank):
        return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in rank["metrics"]]

    assert all(shared(r) == shared(ranks[0]) for r in ranks[1:])
    assert shared(ranks[0]) and all(m["completion_length"] > 0 for m in shared(ranks[0]))
    for step, m in enumerate(ranks[0]["metrics"]):  # the job's completion tokens over the slowest rank's rollout
        if "rollout_tokens_per_s" not in m:
            continue
        slowest = max(r["metrics"][step]["time/rollout_s"] for r in ranks)
        completions = m["rollout_tokens_per_s"] * slowest / m["completion_length"]  # every rank's, not one rank's
        assert completions == pytest.approx(round(completions), rel=1e-6) and round(completions) >= 2 * nproc, m
