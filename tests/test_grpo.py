"""The GRPO loop on tiny models: rollouts with one vision pass per prompt, the training rows, learning from a
reward file, num_iterations, accumulation, video prompts, resume, SIGTERM, two processes, the demo."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin

from loops.grpo import per_sequence, rollout_settings, train, training_batch
from vltrain.config import GRPOConfig, load_config
from vltrain.data.media import MediaOptions
from vltrain.data.prompts import PromptDataset, collate_prompts
from vltrain.families import RopeIndex, family_spec
from vltrain.generation import GenerationSettings, generate_encoded
from vltrain.logprobs import token_logprobs
from vltrain.rewards import load_rewards
from vltrain.tiny import build_tiny

from conftest import REPO

REWARD_FILE = '''
def short_reward(completions, completion_ids, **kwargs):
    """Dense and reachable from a random model: the fewer tokens before the end, the better."""
    return [1.0 - len(ids) / 6 for ids in completion_ids]


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
    assert [r.name for r in rewards] == ["short_reward", "level_reward"]
    result = train(accelerator, model, processor, loader, cfg.train, cfg.optim, cfg.grpo, rewards,
                   eval_prompts=[ds[i] for i in range(4)], packing=False)
    before, after = result.eval_rewards[0][1]["reward"], result.eval_rewards[-1][1]["reward"]
    assert result.step == 12 and after > before + 0.3, (before, after)
    assert result.metrics[-1]["reward"] > result.metrics[0]["reward"]
    assert {"clip_frac", "entropy", "time/rollout_s", "rollout_tokens_per_s", "completion_length"} <= set(result.metrics[0])
    accelerator.end_training()
