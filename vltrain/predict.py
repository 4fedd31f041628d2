"""Score a JSON / JSONL file with a classifier that recipes/cls.py exported; one prediction per line.

    python -m vltrain.predict --model outputs/cls_demo/best --data test.json --out predictions.jsonl

Records are the classification format (`{id, image | video, prompt?, label?}`, vltrain.data.labels); the label is
optional here, and when every record has one the metrics (accuracy, macro-F1, per-class, confusion matrix, AUROC)
are printed and written next to the predictions (`<out>.metrics.json`). Media sizing, the system prompt, the default
prompt and the maximum length are the ones the model was trained with (read from the export's
vltrain_config.yaml); `--image_folder` overrides where relative media paths are resolved.

Each line: {"id", "label" (class name), "label_id", "probabilities": {class: p}} for single-label models;
{"id", "labels": [names], "probabilities"} for multi-label; {"id", "value"} for regression; plus "target" when the
record had a label.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vltrain.cli import program
from vltrain.classifier import load_classifier


def _training_config(model_dir: Path) -> dict:
    for candidate in (model_dir / "vltrain_config.yaml", model_dir / "adapter" / "vltrain_config.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}


def _line(sample_id, logits: torch.Tensor, spec, target) -> dict:
    names = list(spec.classes) if spec.classes else [str(i) for i in range(spec.num_labels)]
    out = {"id": sample_id}
    if spec.problem_type == "single_label":
        probs = logits.softmax(-1)
        best = int(probs.argmax())
        out |= {"label": names[best], "label_id": best, "probabilities": dict(zip(names, probs.tolist()))}
    elif spec.problem_type == "multi_label":
        probs = logits.sigmoid()
        out |= {"labels": [n for n, p in zip(names, probs.tolist()) if p >= 0.5], "probabilities": dict(zip(names, probs.tolist()))}
    else:
        out["value"] = float(logits[0])
    if target is not None:
        out["target"] = target
    return out


def predict_file(model_dir, data_path, out_path, *, batch_size: int = 16, image_folder: str | None = None,
                 device: str | None = None, num_workers: int = 0) -> dict:
    """Write predictions for `data_path` to `out_path` (JSONL); returns {"num_predictions", "metrics" (or None)}."""
    from vltrain.classification import classification_metrics, predictions, scalar_metrics
    from vltrain.config import DataConfig, from_dict
    from vltrain.data.labels import ClassificationDataset, ClsCollator, LabelSpec, load_cls_records
    from vltrain.data.media import MediaOptions
    from vltrain.families import family_spec

    model_dir = Path(model_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_classifier(model_dir, device=device)
    spec = model.spec
    trained = _training_config(model_dir)
    data_cfg = from_dict(DataConfig, {**(trained.get("data") or {}), "train_path": str(data_path), "eval_path": None}, "data")
    prompt = (trained.get("cls") or {}).get("prompt") or json.loads((model_dir / "classifier.json").read_text()).get("prompt")
    label_spec = LabelSpec(spec.problem_type, spec.num_labels, spec.classes)
    records = load_cls_records(data_path, label_spec, prompt, require_label=False)
    labelled = sum(conv.extra["target"] is not None for conv in records)
    if 0 < labelled < len(records):
        print(f"{labelled} of {len(records)} records have a label: no metrics (they need every record labelled)")
        for conv in records:
            conv.extra["target"] = None
    media = MediaOptions.from_config(data_cfg, image_factor=family_spec(model).image_factor)
    dataset = ClassificationDataset(records, processor, media, spec=label_spec, max_seq_length=data_cfg.max_seq_length,
                                    default_prompt=prompt, image_folder=image_folder or data_cfg.image_folder,
                                    system_prompt=data_cfg.system_prompt, thinking=data_cfg.thinking, source=str(data_path))
    collate = ClsCollator(model.config, packing=False, pad_token_id=processor.tokenizer.pad_token_id,
                          problem_type=spec.problem_type)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    lines, all_logits, targets, skipped = [], [], [], []
    with torch.no_grad():
        for batch in tqdm(loader, desc="predict", dynamic_ncols=True):
            skipped += batch.pop("skipped", [])
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logits = model(**inputs).cpu()
            batch_targets = batch["target"].tolist() if isinstance(batch.get("target"), torch.Tensor) else [None] * len(logits)
            for sample_id, row, target in zip(batch["id"], logits, batch_targets):
                lines.append(_line(sample_id, row, spec, target))
            all_logits.append(logits)
            targets += batch_targets
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    metrics = None
    if lines and all(t is not None for t in targets):
        logits = torch.cat(all_logits)
        dtype = torch.long if spec.problem_type == "single_label" else torch.float32
        scores, _ = predictions(logits, spec.problem_type)
        metrics = classification_metrics(scores, torch.tensor(targets, dtype=dtype), problem_type=spec.problem_type,
                                         num_labels=spec.num_labels, class_names=list(spec.classes) if spec.classes else None)
        out_path.with_suffix(".metrics.json").write_text(json.dumps(metrics, indent=1))
        print(" | ".join(f"{k} {v:.4f}" for k, v in scalar_metrics(metrics).items()))
    if skipped:
        print(f"skipped {len(skipped)} sample(s) that could not be used: " + ", ".join(str(s.get("id")) for s in skipped[:10]))
    print(f"{len(lines)} predictions written to {out_path}" + (f"; metrics in {out_path.with_suffix('.metrics.json')}" if metrics else ""))
    return {"num_predictions": len(lines), "metrics": metrics, "num_skipped": len(skipped)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=program("python -m vltrain.predict"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an export of recipes/cls.py (its best/ or final/ folder)")
    parser.add_argument("--data", required=True, help="JSON / JSONL records {id, image | video, prompt?, label?}")
    parser.add_argument("--out", required=True, help="where to write the predictions (JSONL)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--image_folder", default=None, help="resolve relative media paths here (default: as trained)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers decoding media")
    args = parser.parse_args(argv)
    from vltrain.data.formats import DataFormatError

    try:
        predict_file(args.model, args.data, args.out, batch_size=args.batch_size, image_folder=args.image_folder,
                     device=args.device, num_workers=args.num_workers)
    except (DataFormatError, ValueError) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()
