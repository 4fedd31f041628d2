"""Classification: a head on a Qwen-VL model trained on labelled images, videos or text.

    accelerate launch recipes/cls.py                                   # the demo (recipes/configs/cls_demo.yaml)
    accelerate launch recipes/cls.py recipes/configs/cls_lora.yaml data.train_path=train.json data.eval_path=val.json \\
        cls.classes=[cat,dog,bird] model.name_or_path=Qwen/Qwen2.5-VL-3B-Instruct
    python -m vltrain.predict --model outputs/cls/best --data test.json --out predictions.jsonl

parse (vltrain.run.parse_config) -> build (vltrain.build: the backbone as SFT builds it; vltrain.classifier: the
head; vltrain.data.labels) -> loop (loops.cls.train) -> report (best/ -- the best evaluation's export -- and
final/, held-out metrics before / best / final, summary.json). Reload an export with
`vltrain.classifier.load_classifier(path)`.
"""

from __future__ import annotations

import functools
from pathlib import Path

from loops.cls import train
from vltrain.build import build_model
from vltrain.checkpoint import export_model
from vltrain.classification import class_balanced_weights
from vltrain.classifier import HeadSpec, VLClassifier
from vltrain.config import CLSConfig
from vltrain.data.labels import ClassBalancedSampler, ClassificationDataset, ClsCollator, LabelSpec, label_counts, load_cls_records
from vltrain.data.formats import DataFormatError
from vltrain.data.loader import build_loader
from vltrain.data.media import MediaOptions
from vltrain.run import finish_run, open_run, parse_config, run_recipe, start_run
from vltrain.tracking import print0


def setup(argv: list[str]) -> CLSConfig:
    return parse_config(CLSConfig, argv, default="cls_demo")


def label_spec(cfg: CLSConfig) -> LabelSpec:
    return LabelSpec(cfg.cls.problem_type, cfg.cls.num_labels, tuple(cfg.cls.classes) if cfg.cls.classes else None)


def _unique_ids(records, what: str) -> None:
    seen = set()
    for conv in records:
        if conv.sample_id in seen:
            raise DataFormatError(f"{conv.source}: id {conv.sample_id!r} appears twice in the {what} data; evaluation "
                                  "counts each sample once by id: make the ids unique")
        seen.add(conv.sample_id)


def main(cfg: CLSConfig) -> dict:
    spec = label_spec(cfg)
    accelerator, records = open_run(cfg, functools.partial(load_cls_records, spec=spec, default_prompt=cfg.cls.prompt))
    if "eval" in records:
        _unique_ids(records["eval"], "eval")
    data = cfg.data
    start_run(accelerator, cfg, "cls")

    built = build_model(cfg.model, cfg.trainable, cfg.lora, packing=data.packing, device=accelerator.device,
                        allow_frozen=True)
    model = VLClassifier(built.model, HeadSpec.from_config(cfg.cls))
    head_params = sum(p.numel() for p in model.head.parameters())
    print0("\n".join(built.report))
    print0(f"head: {'linear' if not cfg.cls.mlp_head_dim else f'MLP ({cfg.cls.mlp_head_dim} hidden)'} -> "
           f"{cfg.cls.num_labels} output(s), {head_params:,} parameters, trained fully at lr "
           f"{cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr:g}; loss {cfg.cls.loss_type}")

    media = MediaOptions.from_config(data, image_factor=built.spec.image_factor)
    collate = ClsCollator(built.model.config, packing=data.packing, pad_token_id=built.processor.tokenizer.pad_token_id,
                          problem_type=cfg.cls.problem_type)
    datasets = {split: ClassificationDataset(convs, built.processor, media, spec=spec, max_seq_length=data.max_seq_length,
                                             default_prompt=cfg.cls.prompt, image_folder=data.image_folder,
                                             system_prompt=data.system_prompt, thinking=data.thinking,
                                             source=None if split == "train" else data.eval_path)
                for split, convs in records.items()}
    class_weights = None
    if cfg.cls.loss_type.startswith("class_balanced"):
        class_weights = class_balanced_weights(label_counts(records["train"], spec), cfg.cls.class_balanced_beta,
                                               class_names=spec.classes)
        print0("class-balanced weights: " + ", ".join(f"{spec.name(i)} {w:.3f}" for i, w in enumerate(class_weights.tolist())))
    sampler = ClassBalancedSampler(datasets["train"].targets(), seed=cfg.train.seed) if cfg.cls.balanced_sampler else None
    loaders = {split: build_loader(ds, data, built.processor, built.model.config, micro_batch_size=cfg.train.micro_batch_size,
                                   shuffle=split == "train", seed=cfg.train.seed, collate_fn=collate,
                                   sampler=sampler if split == "train" else None)
               for split, ds in datasets.items()}
    print0("data: " + ", ".join(f"{len(ds)} {split} samples" for split, ds in datasets.items())
           + (" (class-balanced sampling)" if sampler is not None else ""))

    output_dir = Path(cfg.train.output_dir)

    def export_best(step: int, prepared) -> None:
        export_model(accelerator, prepared, built.processor, cfg, output_dir / "best")
        print0(f"best so far (step {step}): exported to {output_dir / 'best'}")

    result = train(accelerator, model, loaders["train"], cfg.train, cfg.optim, cfg.cls, loaders.get("eval"),
                   class_weights=class_weights, class_names=list(spec.classes) if spec.classes else None,
                   on_best=export_best, max_bad_fraction=data.max_bad_fraction)
    export_dir = None
    if result.preempted is None:
        export_dir = export_model(accelerator, result.model, built.processor, cfg, output_dir / "final")
    summary = {"losses": result.history, "final_loss": result.history[-1] if result.history else None,
               "steps": result.step, "num_skipped": result.num_skipped, "skipped": result.skipped,
               "truncated": result.truncated, "num_bad_steps": result.num_bad_steps,
               "eval": [{"step": step, **metrics} for step, metrics in result.eval_metrics],
               "best": {"step": result.best[0], **result.best[1], "export_dir": str(output_dir / "best")} if result.best else None,
               "stopped_early": result.stopped_early, "preempted": result.preempted,
               "export_dir": str(export_dir) if export_dir else None}
    if result.best:
        step, metrics = result.best
        shown = ("accuracy", "macro_f1") if cfg.cls.problem_type != "regression" else ("mse", "r2")
        first = result.eval_metrics[0][1] if result.eval_metrics and result.eval_metrics[0][0] == 0 else None
        print0(f"held-out {' and '.join(shown)}: " + (" / ".join(f"{first[k]:.3f}" for k in shown) + " before training -> "
                                                     if first else "")
               + " / ".join(f"{metrics[k]:.3f}" for k in shown) + f" at the best step {step} ({output_dir / 'best'})")
    return finish_run(accelerator, cfg, summary)


if __name__ == "__main__":
    run_recipe(setup, main, config_cls=CLSConfig)
