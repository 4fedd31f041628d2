"""Batch inference and eval: a trained model's replies to every record of a data file, one JSON line each.

    python -m vltrain.infer --model outputs/demo/final --data outputs/demo/data/eval.json --out preds.jsonl

Records are the training formats (LLaVA `conversations` or OpenAI-style `messages`, vltrain.data.formats). A record
that ends with an assistant turn is a prompt (every turn before that turn) and its reference (that turn's text);
a record that ends with a user turn is a prompt only (every turn; an earlier assistant turn stays in the prompt).
Media sizing and the system prompt are the ones the model was trained with (`TrainedModel.generate_kwargs()`);
relative media paths resolve against --image_folder, else the training run's data.image_folder when every
relative file of the data is there, else the data file's folder (the output says which). Generation is greedy
unless --temperature > 0, in left-padded batches of --batch_size (vltrain.generation).

Each line, in input order: {"id", "prediction" (the reply, stripped), "finish_reason" ("stop" | "length")}, plus
{"reference", "exact_match" (stripped equality, as vltrain.evaluate scores the demo), "contains_match" (the
reference, lower-cased with whitespace runs collapsed, inside the prediction normalised the same way)} when the
record has a reference. With references the two rates are printed and written to `<out stem>.metrics.json`
({num_predictions, num_with_reference, exact_match, contains_match}; the rates are over the records with a
reference). Both files are written to a temporary name and renamed: a crash leaves no half file.

A classifier export (a folder with classifier.json, from recipes/cls.py) is scored by
`vltrain.predict.predict_file` with the same --model / --data / --out / --batch_size / --image_folder / --device;
the generation options do not apply to it and are refused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from vltrain.cli import program
from vltrain.data.formats import Conversation, DataFormatError, load_conversations

# Options that only mean something for a generative model (refused for a classifier export).
GENERATION_OPTIONS = ("base", "bits", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
                      "limit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program("python -m vltrain.infer"), description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="an export of a recipe (OUTPUT_DIR/final, its merged/ or adapter/ export) or a run folder")
    parser.add_argument("--data", required=True, help="JSON / JSONL records in a training format (LLaVA or messages)")
    parser.add_argument("--out", required=True, help="where to write the predictions (JSONL, one line per record)")
    parser.add_argument("--base", default=None, help="base model of an adapter export (default: the recorded one)")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=None,
                        help="load the LLM's linear layers in 4 or 8 bits (bitsandbytes, GPU)")
    parser.add_argument("--batch_size", type=int, default=16, help="prompts per generate call (default 16)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="most tokens generated per reply (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest tokens (0 = off)")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="penalty on repeated tokens (1 = off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same replies)")
    parser.add_argument("--image_folder", default=None,
                        help="resolve relative media paths here (default: the training run's, else the data file's folder)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N records")
    return parser


# ------------------------------------------------------------------------------------------ scoring
def normalise(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.lower().split())


def split_reference(conv: Conversation) -> tuple[Conversation, str | None]:
    """(prompt, reference): a record ending with an assistant turn -> the turns before it and its text; else the
    whole record and None."""
    from vltrain.evaluate import prompt_and_answer

    if conv.turns[-1].role != "assistant":
        return conv, None
    return prompt_and_answer(conv)


def score_line(sample_id: str, prediction: str, finish_reason: str, reference: str | None) -> dict:
    from vltrain.evaluate import exact_match

    line = {"id": sample_id, "prediction": prediction, "finish_reason": finish_reason}
    if reference is not None:
        line |= {"reference": reference, "exact_match": exact_match(prediction, reference),
                 "contains_match": normalise(reference) in normalise(prediction)}
    return line


def summarise(lines: list[dict]) -> dict:
    """{num_predictions, num_with_reference, exact_match, contains_match} (rates None without references)."""
    scored = [line for line in lines if "reference" in line]

    def rate(key: str) -> float | None:
        return sum(line[key] for line in scored) / len(scored) if scored else None

    return {"num_predictions": len(lines), "num_with_reference": len(scored), "exact_match": rate("exact_match"),
            "contains_match": rate("contains_match")}


# ------------------------------------------------------------------------------------------ media
_REMOTE = re.compile(r"^(https?://|data:)")


def _relative_media(conversations: list[Conversation]) -> list[tuple[str, str]]:
    """(sample id, path) of every relative local media reference."""
    return [(c.sample_id, ref) for c in conversations for ref in c.images + c.videos
            if not _REMOTE.match(ref) and not os.path.isabs(ref.removeprefix("file://"))]


def choose_image_folder(conversations: list[Conversation], data_path: Path, given: str | None,
                        trained: str | None) -> tuple[str | None, str]:
    """(folder relative media resolve against, why that one); see the module docstring for the order."""
    relative = _relative_media(conversations)
    if given is not None:
        return given, "--image_folder"
    if not relative:
        return None, "no relative media paths in the data"
    if trained and all(os.path.exists(os.path.join(trained, ref)) for _, ref in relative):
        return trained, "the training run's data.image_folder"
    return str(data_path.parent), "the data file's folder"


def check_media(conversations: list[Conversation], image_folder: str | None, why: str) -> None:
    """Every local media file exists; else a ValueError naming the sample, the file and where it was looked for."""
    from vltrain.data.media import resolve_media_path

    for conv in conversations:
        for ref in conv.images + conv.videos:
            if _REMOTE.match(ref):
                continue
            path = resolve_media_path(ref, image_folder).removeprefix("file://")
            if not os.path.exists(path):
                raise ValueError(f"sample {conv.sample_id!r}: media file {path!r} not found (relative paths resolve "
                                 f"against {why}: {image_folder}; pass --image_folder DIR)")


# ------------------------------------------------------------------------------------------ files
def write_atomic(path: Path, text: str) -> None:
    """`text` to `path` through `path.tmp` and a rename: `path` is either absent, the old file or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def metrics_path(out: Path) -> Path:
    """`preds.jsonl` -> `preds.metrics.json` (as vltrain.predict names it)."""
    return out.with_suffix(".metrics.json")


def is_classifier(model: Path) -> Path | None:
    """The classifier export folder at `model` (or its final/), or None."""
    for folder in (model, model / "final"):
        if (folder / "classifier.json").is_file():
            return folder
    return None


# ------------------------------------------------------------------------------------------ entry
def infer_file(args: argparse.Namespace) -> dict:
    """Predictions for `args.data` written to `args.out`; returns the metrics dict (see `summarise`)."""
    from vltrain.generation import GenerationSettings, generate
    from vltrain.inference import load_trained

    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                      seed=args.seed)
    except ValueError as e:  # its message names the field: name the option instead
        raise ValueError(str(e).replace("GenerationSettings.", "--")) from None
    data_path, out = Path(args.data), Path(args.out)
    conversations = load_conversations(data_path, require_reply=False)[: args.limit]  # every record checked first
    prompts, references = zip(*(split_reference(c) for c in conversations))
    trained = load_trained(args.model, base=args.base, bits=args.bits or 16, device=args.device)
    kwargs = trained.generate_kwargs()
    folder, why = choose_image_folder(conversations, data_path, args.image_folder, trained.image_folder)
    check_media(conversations, folder, why)
    print(f"model: {trained.weights}; {len(conversations)} records from {data_path}"
          + (f"; media under {folder} ({why})" if folder else f"; {why}"))
    kwargs["image_folder"] = folder
    replies = generate(trained.model, trained.processor, list(prompts), settings, batch_size=args.batch_size,
                       show_progress=True, **kwargs)
    lines = [score_line(c.sample_id, r.text.strip(), r.finish_reason, ref)
             for c, r, ref in zip(conversations, replies, references)]
    write_atomic(out, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    metrics = summarise(lines)
    where = f"{len(lines)} predictions written to {out}"
    if metrics["num_with_reference"]:
        n = metrics["num_with_reference"]
        num_exact = sum(line.get("exact_match", False) for line in lines)
        num_contains = sum(line.get("contains_match", False) for line in lines)
        print(f"exact match {metrics['exact_match']:.1%} ({num_exact}/{n}), "
              f"contains match {metrics['contains_match']:.1%} ({num_contains}/{n})")
        write_atomic(metrics_path(out), json.dumps(metrics, indent=1) + "\n")
        where += f"; metrics in {metrics_path(out)}"
    print(where)
    return metrics


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv` (default sys.argv[1:]), run, return the metrics; a user mistake exits 1 with `error: ...`."""
    from vltrain.data.encode import SampleSkipped

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        classifier = is_classifier(Path(args.model))
        if classifier is None:
            return infer_file(args)
        from vltrain.predict import predict_file

        changed = [f"--{name}" for name in GENERATION_OPTIONS if getattr(args, name) != parser.get_default(name)]
        if changed:
            raise ValueError(f"--model {args.model} is a classifier export (classifier.json), scored by vltrain.predict: "
                             f"{', '.join(changed)} {'does' if len(changed) == 1 else 'do'} not apply")
        print(f"--model {classifier} is a classifier export: scoring it with vltrain.predict")
        return predict_file(classifier, args.data, args.out, batch_size=args.batch_size, image_folder=args.image_folder,
                            device=args.device)
    except (DataFormatError, ValueError, SampleSkipped) as e:
        sys.exit(f"error: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()
