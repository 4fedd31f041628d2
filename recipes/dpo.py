"""Preference training (DPO and its relatives) of a Qwen-VL model.

    accelerate launch recipes/dpo.py                                   # the demo (recipes/configs/dpo_demo.yaml)
    accelerate launch recipes/dpo.py recipes/configs/dpo_lora.yaml data.train_path=pairs.json model.name_or_path=...
    accelerate launch --config_file accelerate_configs/zero3.yaml recipes/dpo.py CONFIG [overrides]

parse (vltrain.run.parse_config) -> build (vltrain.build: policy and reference, vltrain.data.pairs) -> loop
(loops.dpo.train) -> report (export, preference metrics before/after, greedy answers counted as the chosen
or the rejected reply when `dpo.eval_generations` > 0, summary.json).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path


from loops.dpo import train
from recipes.sft import ensure_sft_export
from vltrain.build import build_model, build_reference
from vltrain.checkpoint import export_model
from vltrain.config import DPOConfig, MediaConfig
from vltrain.data.loader import build_loader
from vltrain.data.media import MediaOptions
from vltrain.data.pairs import PairCollator, PairDataset, load_pairs
from vltrain.distributed import gather_lists
from vltrain.preference import needs_reference
from vltrain.run import finish_run, open_run, parse_config, run_recipe, start_run
from vltrain.tracking import print0
from vltrain.training import log_metrics


def setup(argv: list[str]) -> DPOConfig:
    return parse_config(DPOConfig, argv, default="dpo_demo")


def reference_cache(cfg: DPOConfig, data_path: str | list[str], split: str) -> Path:
    """Where `dpo.precompute_ref_log_probs` keeps one split's table: the file name hashes everything the
    reference log-probs depend on (the data files' bytes, the model, media, template and length options)."""
    data = cfg.data
    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    data_sha256 = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths]
    key = {"data_sha256": data_sha256[0] if isinstance(data_path, str) else data_sha256,
           "model": dataclasses.asdict(cfg.model), "media": {f.name: getattr(data, f.name) for f in dataclasses.fields(MediaConfig)},
           "image_folder": data.image_folder, "system_prompt": data.system_prompt, "thinking": data.thinking,
           "max_seq_length": data.max_seq_length, "packing": data.packing}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cfg.dpo.ref_cache_dir or Path(cfg.train.output_dir) / "ref_logps")
    return folder / f"{split}-{'+'.join(Path(path).stem for path in paths)}-{digest}.json"


def generation_check(accelerator, model, processor, pairs, media, data, *, label: str, path: Path) -> dict:
    """Greedy answers to the held-out prompts (each rank its share), counted as the chosen reply, the rejected
    reply or neither (exact match, stripped); every answer is written to `path` (JSONL)."""
    from vltrain.generation import GenerationSettings, generate

    mine = pairs[accelerator.process_index:: accelerator.num_processes]
    replies = generate(model, processor, [p.prompt for p in mine], GenerationSettings(max_new_tokens=24), media=media,
                       image_folder=data.image_folder, system_prompt=data.system_prompt,
                       show_progress=accelerator.is_main_process)
    records = gather_lists(accelerator, [
        {"id": p.sample_id, "reply": r.text.strip(), "chosen": r.text.strip() == p.chosen.strip(),
         "rejected": r.text.strip() == p.rejected.strip()} for p, r in zip(mine, replies)])
    if accelerator.is_main_process:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    n = max(1, len(records))
    out = {"chosen": sum(r["chosen"] for r in records) / n, "rejected": sum(r["rejected"] for r in records) / n,
           "num_prompts": len(records), "examples": records[:5]}
    print0(f"greedy answers {label}: {out['chosen']:.1%} give the chosen reply, {out['rejected']:.1%} the rejected "
           f"one ({len(records)} held-out prompts; answers in {path})")
    return out


def main(cfg: DPOConfig) -> dict:
    accelerator, records = open_run(cfg, load_pairs)  # every record checked before the model loads
    data = cfg.data
    if cfg.dpo.precompute_ref_log_probs:
        for split, pairs in records.items():
            seen = set()
            for pair in pairs:
                if pair.sample_id in seen:
                    raise ValueError(f"{pair.prompt.source}: id {pair.sample_id!r} appears twice; "
                                     "dpo.precompute_ref_log_probs keys pairs by id: make the ids unique")
                seen.add(pair.sample_id)
    ensure_sft_export(accelerator, cfg.dpo.init_from_sft, cfg.model.name_or_path)
    start_run(accelerator, cfg, "dpo")

    built = build_model(cfg.model, cfg.trainable, cfg.lora, packing=data.packing, device=accelerator.device,
                        lora_reference=needs_reference(cfg.dpo.loss_type))  # LoRA: the policy, adapters off
    print0("\n".join(built.report))
    reference = None
    if needs_reference(cfg.dpo.loss_type):  # reference-free losses (simpo, orpo, sft) load none
        reference = build_reference(built.model, cfg.model, packing=data.packing)
        print0("reference: " + ("the policy with its adapters disabled" if reference.adapters_off else "a frozen copy"))
    media = MediaOptions.from_config(data, image_factor=built.spec.image_factor)
    collate = PairCollator(built.model.config, packing=data.packing, pad_token_id=built.processor.tokenizer.pad_token_id)
    loaders = {
        split: build_loader(
            PairDataset(pairs, built.processor, media, max_seq_length=data.max_seq_length, image_folder=data.image_folder,
                        system_prompt=data.system_prompt, thinking=data.thinking,
                        source=None if split == "train" else data.eval_path),
            data, built.processor, built.model.config, micro_batch_size=cfg.train.micro_batch_size,
            shuffle=split == "train", seed=cfg.train.seed, collate_fn=collate)
        for split, pairs in records.items()
    }
    print0("data: " + ", ".join(f"{len(loader.dataset)} {split} pairs" for split, loader in loaders.items()))
    ref_cache = None
    if cfg.dpo.precompute_ref_log_probs:
        ref_cache = {"train": reference_cache(cfg, data.train_path, "train")}
        if data.eval_path:
            ref_cache["eval"] = reference_cache(cfg, data.eval_path, "eval")

    result = train(accelerator, built.model, loaders["train"], cfg.train, cfg.optim, cfg.dpo, reference,
                   loaders.get("eval"), max_bad_fraction=data.max_bad_fraction, ref_cache=ref_cache)
    export_dir = None
    if result.preempted is None:
        export_dir = export_model(accelerator, result.model, built.processor, cfg, Path(cfg.train.output_dir) / "final")
    summary = {"losses": result.history, "final_loss": result.history[-1] if result.history else None,
               "steps": result.step, "num_skipped": result.num_skipped, "skipped": result.skipped,
               "truncated": result.truncated, "num_bad_steps": result.num_bad_steps,
               "eval": [{"step": step, **metrics} for step, metrics in result.eval_metrics],
               "last_step_metrics": result.metrics[-1] if result.metrics else None,
               "preempted": result.preempted, "export_dir": str(export_dir) if export_dir else None}

    if cfg.dpo.eval_generations and "eval" in records and result.preempted is None:
        pairs = records["eval"][: cfg.dpo.eval_generations]
        if result.reference is not None:  # the starting policy: the "before" answers
            with result.reference() as ref_model:
                summary["generations_before"] = generation_check(
                    accelerator, accelerator.unwrap_model(ref_model), built.processor, pairs, media, data,
                    label="before DPO (the reference)", path=Path(cfg.train.output_dir) / "generations_before.jsonl")
        summary["generations_after"] = generation_check(accelerator, accelerator.unwrap_model(result.model),
                                                        built.processor, pairs, media, data, label="after DPO",
                                                        path=Path(cfg.train.output_dir) / "generations_after.jsonl")
        log_metrics(accelerator, cfg.train.output_dir, {f"eval/greedy_{k}": summary["generations_after"][k]
                                                        for k in ("chosen", "rejected")}, result.step)
    if result.eval_metrics:
        first, last = result.eval_metrics[0], result.eval_metrics[-1]
        print0(f"held-out preference accuracy: {first[1]['rewards/accuracy']:.1%} at step {first[0]} -> "
               f"{last[1]['rewards/accuracy']:.1%} at step {last[0]}")
    return finish_run(accelerator, cfg, summary)


if __name__ == "__main__":
    run_recipe(setup, main, config_cls=DPOConfig)
