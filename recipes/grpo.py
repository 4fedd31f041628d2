"""Reinforcement learning (GRPO and its variants) of a Qwen-VL model with reward functions from your own file.

    accelerate launch recipes/grpo.py                                  # the demo (recipes/configs/grpo_demo.yaml)
    accelerate launch recipes/grpo.py recipes/configs/grpo_lora.yaml data.train_path=prompts.json \\
        grpo.rewards=[my_rewards.py:accuracy,builtin:format]

parse (vltrain.run.parse_config) -> build (vltrain.build, vltrain.rewards, vltrain.data.prompts) -> loop
(loops.grpo.train) -> report (export, held-out mean reward before / after when `grpo.eval_prompts` > 0,
completions.jsonl, summary.json).
"""

from __future__ import annotations

from pathlib import Path

from loops.grpo import train
from recipes.sft import ensure_sft_export
from vltrain.build import build_model, build_reference
from vltrain.checkpoint import export_model
from vltrain.config import GRPOConfig
from vltrain.data.loader import build_loader
from vltrain.data.media import MediaOptions
from vltrain.data.prompts import PromptDataset, collate_prompts, load_prompts
from vltrain.rewards import check_reward_fields, load_rewards
from vltrain.run import finish_run, open_run, parse_config, run_recipe, start_run
from vltrain.tracking import print0


def setup(argv: list[str]) -> GRPOConfig:
    return parse_config(GRPOConfig, argv, default="grpo_demo")


def main(cfg: GRPOConfig) -> dict:
    rewards = load_rewards(cfg.grpo.rewards, cfg.grpo.reward_weights, timeout=cfg.grpo.reward_timeout)  # fails first
    accelerator, records = open_run(cfg, load_prompts)  # every record checked before the model loads
    for split, convs in records.items():  # a reward needing a field no record has: before the model loads
        check_reward_fields(rewards, {key for conv in convs for key in conv.extra},
                            f"data.{split}_path ({cfg.data.train_path if split == 'train' else cfg.data.eval_path})")
    data = cfg.data
    ensure_sft_export(accelerator, cfg.grpo.init_from_sft, cfg.model.name_or_path)
    start_run(accelerator, cfg, "grpo")
    print0("rewards: " + ", ".join(f"{r.name} (x{r.weight:g}, {r.source})" for r in rewards))

    built = build_model(cfg.model, cfg.trainable, cfg.lora, packing=data.packing, device=accelerator.device,
                        lora_reference=cfg.grpo.beta > 0)  # the KL term's LoRA reference: the policy, adapters off
    print0("\n".join(built.report))
    reference = None
    if cfg.grpo.beta > 0:  # beta 0 (the default) loads no reference
        reference = build_reference(built.model, cfg.model, packing=data.packing)
    media = MediaOptions.from_config(data, image_factor=built.spec.image_factor)
    max_prompt = cfg.grpo.max_prompt_length or data.max_seq_length
    datasets = {split: PromptDataset(convs, built.processor, media, max_prompt_length=max_prompt,
                                     image_folder=data.image_folder, system_prompt=data.system_prompt,
                                     thinking=data.thinking, source=None if split == "train" else data.eval_path)
                for split, convs in records.items()}
    loader = build_loader(datasets["train"], data, built.processor, built.model.config,
                          micro_batch_size=cfg.train.micro_batch_size, shuffle=True, seed=cfg.train.seed,
                          collate_fn=collate_prompts)
    eval_prompts = None
    if cfg.grpo.eval_prompts and "eval" in datasets:
        held_out = datasets["eval"]
        eval_prompts = [held_out[i] for i in range(min(cfg.grpo.eval_prompts, len(held_out)))]
    print0(f"data: {len(datasets['train'])} train prompts x {cfg.grpo.num_generations} completions"
           + (f", {len(eval_prompts)} held-out prompts" if eval_prompts else ""))

    result = train(accelerator, built.model, built.processor, loader, cfg.train, cfg.optim, cfg.grpo, rewards,
                   reference, eval_prompts, packing=data.packing, max_bad_fraction=data.max_bad_fraction)
    export_dir = None
    if result.preempted is None:
        export_dir = export_model(accelerator, result.model, built.processor, cfg, Path(cfg.train.output_dir) / "final")
    summary = {"losses": result.history, "final_loss": result.history[-1] if result.history else None,
               "steps": result.step, "num_skipped": result.num_skipped, "skipped": result.skipped,
               "num_bad_steps": result.num_bad_steps,
               "eval": [{"step": step, **metrics} for step, metrics in result.eval_rewards],
               "last_step_metrics": result.metrics[-1] if result.metrics else None,
               "preempted": result.preempted, "export_dir": str(export_dir) if export_dir else None,
               "completions": str(Path(cfg.train.output_dir) / "completions.jsonl")}
    if len(result.eval_rewards) == 2:
        print0(f"held-out mean reward: {result.eval_rewards[0][1]['reward']:.3f} before -> "
               f"{result.eval_rewards[1][1]['reward']:.3f} after ({result.eval_rewards[1][1]['num_prompts']} prompts)")
    return finish_run(accelerator, cfg, summary)


if __name__ == "__main__":
    run_recipe(setup, main, config_cls=GRPOConfig)
