"""Supervised fine-tuning of a Qwen-VL model.

    accelerate launch recipes/sft.py                                   # the demo (recipes/configs/demo.yaml)
    accelerate launch recipes/sft.py recipes/configs/sft_full.yaml data.train_path=my.json
    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/sft.py CONFIG [overrides]

parse (vltrain.run.parse_config) -> build (vltrain.build, vltrain.data) -> loop (loops.sft.train) -> report
(export, held-out exact match when `train.eval_exact_match` > 0, summary.json).
"""

from __future__ import annotations

import json
from pathlib import Path


from loops.sft import train
from vltrain.build import build_model
from vltrain.checkpoint import export_model
from vltrain.config import SFTConfig
from vltrain.data.dataset import SFTDataset
from vltrain.data.formats import load_conversations
from vltrain.data.loader import build_loader
from vltrain.data.media import MediaOptions
from vltrain.distributed import gather_lists
from vltrain.run import finish_run, open_run, parse_config, run_recipe, start_run
from vltrain.tracking import print0
from vltrain.training import log_metrics


def setup(argv: list[str]) -> SFTConfig:
    return parse_config(SFTConfig, argv, default="demo")


def ensure_sft_export(accelerator, config_name: str | None, target: str) -> None:
    """`dpo.init_from_sft` / `grpo.init_from_sft`: when `target` (an export folder named `final`) does not exist,
    train it with this recipe and the SFT config `config_name`, writing to the folder above it."""
    target = Path(target)
    if not config_name or target.exists():
        return
    if target.name != "final":
        raise ValueError(f"init_from_sft needs model.name_or_path to be an SFT export folder ending in /final "
                         f"(the SFT run writes to its parent), got {str(target)!r}")
    if accelerator.num_processes > 1:
        raise ValueError(f"model.name_or_path={str(target)!r} does not exist: run `accelerate launch recipes/sft.py "
                         f"{config_name} train.output_dir={target.parent}` first (init_from_sft runs it only in "
                         "single-process launches)")
    print0(f"{target} does not exist: training it first with recipes/sft.py {config_name}")
    summary = main(parse_config(SFTConfig, [config_name, f"train.output_dir={target.parent}"]))
    if summary.get("export_dir") is None:
        raise ValueError(f"the SFT stage ({config_name}) stopped before exporting {target}")
    print0(f"SFT stage done: {target}")


def main(cfg: SFTConfig) -> dict:
    accelerator, records = open_run(cfg, load_conversations)  # every record checked before the model loads
    data = cfg.data
    start_run(accelerator, cfg, "sft")

    built = build_model(cfg.model, cfg.trainable, cfg.lora, packing=data.packing, device=accelerator.device)
    print0("\n".join(built.report))
    media = MediaOptions.from_config(data, image_factor=built.spec.image_factor)
    loaders = {
        split: build_loader(
            SFTDataset(convs, built.processor, media, max_seq_length=data.max_seq_length, image_folder=data.image_folder,
                       system_prompt=data.system_prompt, thinking=data.thinking,
                       source=None if split == "train" else data.eval_path),
            data, built.processor, built.model.config, micro_batch_size=cfg.train.micro_batch_size,
            shuffle=split == "train", seed=cfg.train.seed)
        for split, convs in records.items()
    }
    print0("data: " + ", ".join(f"{len(loader.dataset)} {split} samples" for split, loader in loaders.items()))

    result = train(accelerator, built.model, loaders["train"], cfg.train, cfg.optim, loaders.get("eval"),
                   max_bad_fraction=data.max_bad_fraction)
    export_dir = None
    if result.preempted is None:
        export_dir = export_model(accelerator, result.model, built.processor, cfg, Path(cfg.train.output_dir) / "final")
    summary = {"losses": result.history, "final_loss": result.history[-1] if result.history else None,
               "steps": result.step, "num_skipped": result.num_skipped, "skipped": result.skipped,
               "truncated": result.truncated,
               "num_bad_steps": result.num_bad_steps, "eval_losses": result.eval_losses,
               "preempted": result.preempted, "export_dir": str(export_dir) if export_dir else None}

    if cfg.train.eval_exact_match and "eval" in records and result.preempted is None:
        from vltrain.evaluate import exact_match_accuracy

        # every rank answers its share (sharded weights: generate keeps the ranks' forwards in step)
        conversations = records["eval"][: cfg.train.eval_exact_match]
        mine = conversations[accelerator.process_index:: accelerator.num_processes]
        _, scored = exact_match_accuracy(accelerator.unwrap_model(result.model), built.processor, mine, media,
                                         image_folder=data.image_folder, system_prompt=data.system_prompt,
                                         show_progress=accelerator.is_main_process)
        scored = gather_lists(accelerator, scored)
        summary["exact_match"] = sum(r["correct"] for r in scored) / max(1, len(scored))
        if accelerator.is_main_process:
            (Path(cfg.train.output_dir) / "exact_match.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scored))
        log_metrics(accelerator, cfg.train.output_dir, {"eval/exact_match": summary["exact_match"]}, result.step)
        print0(f"held-out exact-match accuracy: {summary['exact_match']:.1%} on {len(scored)} samples")
    return finish_run(accelerator, cfg, summary)


if __name__ == "__main__":
    run_recipe(setup, main, config_cls=SFTConfig)
