"""Supervised fine-tuning of a Qwen-VL model.

    accelerate launch recipes/sft.py                                   # the demo (recipes/configs/demo.yaml)
    accelerate launch recipes/sft.py recipes/configs/sft_full.yaml data.train_path=my.json
    accelerate launch --config_file accelerate_configs/zero2.yaml recipes/sft.py CONFIG [overrides]

Parse the config, build accelerator / model / data, call `loops.sft.train`, and (when
`train.eval_exact_match` > 0) report exact-match accuracy of greedy answers on held-out samples.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
from torch.utils.data import DataLoader

from loops.sft import train
from vltrain.config import SFTConfig, dump_config, load_config
from vltrain.data.dataset import PadCollator, SFTDataset
from vltrain.data.packing import PackCollator, TokenBudgetBatchSampler, example_lengths
from vltrain.data.formats import DataFormatError, load_conversations
from vltrain.data.media import MediaOptions
from vltrain.distributed import accelerator_device_kwargs, parameters_sharded
from vltrain.families import family_spec
from vltrain.models import enable_gradient_checkpointing, load_model
from vltrain.tracking import print0, setup_logging
from vltrain.trainable import configure_trainable

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def setup(argv: list[str]) -> SFTConfig:
    """argv: an optional YAML path, then `section.field=value` overrides."""
    path = DEFAULT_CONFIG
    if argv and "=" not in argv[0]:
        path, argv = Path(argv[0]), argv[1:]
    return load_config(SFTConfig, path, argv)


def build_data(cfg: SFTConfig, processor, media: MediaOptions, accelerator, model_config=None):
    """Train / eval DataLoaders; `model_config` (the model's config) is needed when data.packing is on."""
    data = cfg.data
    if data.train_path.startswith("synthetic:"):
        from vltrain.synthetic import write_shapes_dataset

        with accelerator.main_process_first():
            train_path, eval_path = write_shapes_dataset(Path(cfg.train.output_dir) / "data")
        data.train_path, data.eval_path = str(train_path), str(eval_path)
        data.image_folder = str(Path(train_path).parent / "images")

    def dataset(path):
        return SFTDataset(path, processor, media, max_seq_length=data.max_seq_length,
                          image_folder=data.image_folder, system_prompt=data.system_prompt)

    def loader(ds, shuffle):
        collate = PackCollator(model_config) if data.packing else PadCollator(processor.tokenizer.pad_token_id)
        common = dict(num_workers=data.num_workers, collate_fn=collate, persistent_workers=data.num_workers > 0)
        if data.max_tokens_per_batch:
            lengths = example_lengths(ds, data.num_workers)
            sampler = TokenBudgetBatchSampler(lengths, data.max_tokens_per_batch, shuffle=shuffle, seed=cfg.train.seed)
            print0(f"token budget {data.max_tokens_per_batch}: {len(ds)} samples -> {len(sampler)} micro-batches "
                   f"of {sampler.mean_tokens_per_batch():.0f} tokens on average")
            return DataLoader(ds, batch_sampler=sampler, **common)
        return DataLoader(ds, batch_size=cfg.train.micro_batch_size, shuffle=shuffle, drop_last=False, **common)

    train_ds = dataset(data.train_path)
    eval_ds = dataset(data.eval_path) if data.eval_path else None
    return loader(train_ds, True), (loader(eval_ds, False) if eval_ds else None)


def main(cfg: SFTConfig) -> dict:
    accelerator = Accelerator(
        **accelerator_device_kwargs(),  # CPU gloo runs (plain and DeepSpeed) need it said explicitly
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=None if cfg.train.report_to == "none" else cfg.train.report_to,
        project_dir=cfg.train.output_dir,
    )
    setup_logging(accelerator.is_main_process)
    if cfg.train.eval_exact_match and parameters_sharded(accelerator):
        raise ValueError("train.eval_exact_match generates on one process, which cannot work under ZeRO-3/FSDP "
                         "sharding: set it to 0 and evaluate the export in final/ instead")
    if "compile_layers" in cfg.model.kernels and parameters_sharded(accelerator):
        raise ValueError("model.kernels compile_layers is not supported under ZeRO-3/FSDP sharding (untested there): "
                         "drop it from model.kernels")
    set_seed(cfg.train.seed)
    output_dir = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, output_dir / "config.yaml")
        print0("resolved config:\n" + (output_dir / "config.yaml").read_text())

    from vltrain.lora import load_model_for_lora

    if cfg.lora.enabled:
        model, processor = load_model_for_lora(cfg.model, cfg.lora, accelerator.device)  # 4/8-bit when lora.bits < 16
    else:
        model, processor = load_model(cfg.model)
    spec = family_spec(model)
    if cfg.data.packing:
        from vltrain.attention import enable_packed_attention

        print0("; ".join(enable_packed_attention(model)))
    if cfg.model.kernels:
        from vltrain.kernels import apply_kernels

        print0("kernels: " + "; ".join(apply_kernels(model, cfg.model.kernels)))
    if cfg.lora.enabled:
        from vltrain.lora import apply_lora
        from vltrain.trainable import trainable_counts

        configure_trainable(model, cfg.trainable, adapters_follow=True)  # what trains fully; adapters go on the rest
        model = apply_lora(model, cfg.lora, base_name=cfg.model.name_or_path)
        counts = trainable_counts(model)
    else:
        counts = configure_trainable(model, cfg.trainable)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model, cfg.model.checkpoint_every_n_layers)
    total = sum(p.numel() for p in model.parameters())
    print0(f"model {spec.model_type}: {total:,} parameters, trainable " +
           ", ".join(f"{k} {v:,}" for k, v in counts.items()))

    media = MediaOptions.from_config(cfg.data, image_factor=spec.image_factor)
    train_loader, eval_loader = build_data(cfg, processor, media, accelerator, model_config=model.config)
    print0(f"data: {len(train_loader.dataset)} train samples" +
           (f", {len(eval_loader.dataset)} eval samples" if eval_loader else ""))
    if accelerator.is_main_process:
        dump_config(cfg, output_dir / "config.yaml")  # synthetic data paths resolved
    if cfg.train.report_to != "none":
        accelerator.init_trackers(cfg.train.run_name or "sft", config=_flat(cfg))

    result = train(cfg, accelerator, model, processor, train_loader, eval_loader)
    summary = {"losses": result.losses, "final_loss": result.losses[-1], "steps": result.step, "num_skipped": result.num_skipped,
               "eval_losses": result.eval_losses, "export_dir": str(result.export_dir)}

    if cfg.train.eval_exact_match and cfg.data.eval_path and accelerator.is_main_process:
        from vltrain.evaluate import exact_match_accuracy

        model = accelerator.unwrap_model(model)
        conversations = load_conversations(cfg.data.eval_path)[: cfg.train.eval_exact_match]
        accuracy, records = exact_match_accuracy(model, processor, conversations, media, image_folder=cfg.data.image_folder,
                                           system_prompt=cfg.data.system_prompt)
        summary["exact_match"] = accuracy
        (output_dir / "exact_match.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        print0(f"held-out exact-match accuracy: {accuracy:.1%} on {len(conversations)} samples")
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _flat(cfg) -> dict:
    from vltrain.config import config_to_dict

    flat = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


if __name__ == "__main__":
    try:
        config = setup(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"config error: {e}")
    try:
        main(config)
    except DataFormatError as e:  # a malformed record: its file, sample and field, not a traceback
        sys.exit(f"data error: {e}")
