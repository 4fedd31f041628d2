"""What every recipe does around its loop: parse argv into a config, open the run (output folder, resolved
config, trackers), close it (summary.json, where the outputs are, `end_training`), and turn user mistakes into
one-line errors.

    if __name__ == "__main__":
        run_recipe(setup, main)      # setup(argv) -> config; main(config) -> summary dict
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vltrain.config import config_to_dict, dump_config, load_config
from vltrain.tracking import print0, setup_logging

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def parse_config(cls, argv: list[str], *, default: str | None = None):
    """argv: `[CONFIG] [section.field=value ...]`. CONFIG is a YAML path or the name of a shipped config
    (`demo`, `sft_full`, ...: recipes/configs/NAME.yaml). With no argument at all the recipe's `default`
    config runs (its demo); overrides without a CONFIG start from the dataclass defaults -- said on stdout,
    so a run never silently inherits the demo's settings."""
    if not argv and default is not None:
        path = CONFIGS_DIR / f"{default}.yaml"
        print0(f"config: {path} (the default; give a config file or name to train on your data)")
        return load_config(cls, path, [])
    path = None
    if argv and "=" not in argv[0]:
        path, argv = Path(argv[0]), argv[1:]
        if not path.suffix and not path.is_file() and (CONFIGS_DIR / f"{path}.yaml").is_file():
            path = CONFIGS_DIR / f"{path}.yaml"
    print0(f"config: {path if path else 'built-in defaults'}" + (f" + {len(argv)} override(s)" if argv else ""))
    return load_config(cls, path, argv)


def open_run(cfg, load) -> tuple[object, dict]:
    """What every recipe does before loading a model: the Accelerator (vltrain.distributed), the kernel check,
    the seed, the demo's synthetic data written (main process first), and every train / eval record read and
    checked by `load(path)` so that a bad file fails before the model loads (several `data.train_path` files:
    each read in turn, their records concatenated, each naming its own file: vltrain.data.mixture). Returns
    (accelerator, {"train": records[, "eval": records]})."""
    from accelerate.utils import set_seed

    from vltrain.data.loader import resolve_synthetic_data
    from vltrain.data.mixture import check_train_files
    from vltrain.distributed import build_accelerator, check_kernels_supported

    accelerator = build_accelerator(cfg.train)
    setup_logging(accelerator.is_main_process)  # before anything loads: library noise filtered, logs above the bars
    check_kernels_supported(accelerator, cfg.model)
    set_seed(cfg.train.seed)
    with accelerator.main_process_first():
        resolve_synthetic_data(cfg.data, cfg.train.output_dir)
    if isinstance(cfg.data.train_path, str):
        records = {"train": load(cfg.data.train_path)}
    else:
        records = {"train": [record for path in check_train_files(cfg.data) for record in load(path)]}
    if cfg.data.eval_path:
        records["eval"] = load(cfg.data.eval_path)
    return accelerator, records


def start_run(accelerator, cfg, name: str) -> Path:
    """Check that `model.name_or_path` is a model (its config only; the data was checked by `open_run`), then
    create `train.output_dir`, write and print the resolved config, start the trackers: a run that fails on
    its data or its model path leaves a previous run's config.yaml alone."""
    from vltrain.models import check_model_path

    check_model_path(cfg.model)
    output_dir = Path(cfg.train.output_dir)
    setup_logging(accelerator.is_main_process)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, output_dir / "config.yaml")
        print0("resolved config:\n" + (output_dir / "config.yaml").read_text())
    if cfg.train.report_to != "none":
        accelerator.init_trackers(cfg.train.run_name or name, config=flat_config(cfg))
    return output_dir


# Files a recipe may leave in output_dir, shown in the closing summary when they exist.
RESULT_FILES = {"exact_match.jsonl": "held-out answers", "generations_before.jsonl": "answers before training",
                "generations_after.jsonl": "answers after training", "completions.jsonl": "sampled rollouts"}


def finish_run(accelerator, cfg, summary: dict) -> dict:
    """Write `summary.json` and the run's plots (vltrain.plots), say where every output is and how to use it, end the
    trackers and the process group."""
    output_dir = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print0(closing_summary(output_dir, summary, cfg.train.report_to, plot(output_dir)))
    accelerator.end_training()
    return summary


def plot(output_dir: Path) -> Path | None:
    """plots.png from metrics.jsonl; a plotting failure is reported, never fatal to a finished run."""
    import logging

    from vltrain.plots import plot_run

    try:
        return plot_run(output_dir)
    except Exception as e:  # noqa: BLE001 -- the model and checkpoints are written; a plot must not lose them
        logging.getLogger(__name__).warning("could not plot %s: %s", output_dir / "metrics.jsonl", one_line(e))
        return None


def closing_summary(output_dir: Path, summary: dict, report_to: str, plots: Path | None) -> str:
    """`done: N steps; model: PATH; summary: PATH` and one line per output with the command that uses it."""
    export = summary.get("export_dir")
    checkpoints = output_dir / "checkpoints"
    lines = [f"done: {summary.get('steps')} steps; model: {export or 'no export (stopped early)'}; "
             f"summary: {output_dir / 'summary.json'}" + (f"; checkpoints: {checkpoints}" if checkpoints.is_dir() else "")]
    rows = []
    if export:
        export = Path(export)
        if (export / "classifier.json").is_file():
            rows.append(("score a file", f"vltrain predict --model {export} --data FILE --out predictions.jsonl"))
        else:
            rows.append(("chat with it", f"vltrain serve --model {export}"))
            rows.append(("batch answers", f"vltrain generate --model {export} --data FILE --out predictions.jsonl"))
            if (export / "config.json").is_file():
                rows.append(("transformers", f"AutoModelForImageTextToText.from_pretrained({str(export)!r})"))
    if plots is not None:
        rows.append(("plots", str(plots)))
    if (output_dir / "metrics.jsonl").is_file():
        rows.append(("metrics", str(output_dir / "metrics.jsonl")))
    if report_to == "tensorboard":
        rows.append(("tensorboard", f"tensorboard --logdir {output_dir}"))
    rows += [(what, str(output_dir / name)) for name, what in RESULT_FILES.items() if (output_dir / name).is_file()]
    width = max((len(label) for label, _ in rows), default=0) + 1
    lines += [f"  {label + ':':<{width}} {value}" for label, value in rows]
    return "\n".join(lines)


def flat_config(cfg) -> dict:
    """`section.field: value` pairs for trackers (which take scalars)."""
    flat = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def recipe_help(module_doc: str | None, config_cls) -> str:
    """A recipe's `--help`: its docstring (the commands), the argument syntax, and every config field with its type,
    default and meaning (vltrain.config.config_help)."""
    from vltrain.config import config_help

    shipped = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
    return ((module_doc or "").strip()
            + "\n\nusage: [CONFIG.yaml | shipped config name] [section.field=value ...]"
            + f"\n  shipped configs (recipes/configs): {shipped}"
            + "\n  no CONFIG: overrides apply to the defaults below; no argument at all: the recipe's demo\n\n"
            + "config fields (section.field (type, default) and meaning):\n" + config_help(config_cls))


def fail(message: str) -> None:
    """Exit with status 1 and `message` as the last line on stderr. Under the `vltrain` CLI (VLTRAIN_ERROR_FILE set)
    the line is also appended to that file, so that the CLI can repeat it after a multi-process launcher's report."""
    import os

    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # a live bar would be redrawn after the message at exit
        bar.close()
    error_file = os.environ.get("VLTRAIN_ERROR_FILE")
    if error_file:
        with open(error_file, "a") as f:
            f.write(message + "\n")
    sys.exit(message)


def run_recipe(setup, main, argv: list[str] | None = None, config_cls=None) -> None:
    """`main(setup(argv))` with every user mistake (a bad config, data file or record, model path) ending in
    one line (exit status 1); a run stopped by a signal returns normally (exit 0) after its checkpoint.
    `-h` / `--help` prints the recipe's docstring and every field of `config_cls`."""
    from vltrain.data.formats import DataFormatError
    from vltrain.data.skips import TooManySkips
    from vltrain.faults import NonFiniteError

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(recipe_help(sys.modules[main.__module__].__doc__, config_cls))
        return
    try:
        config = setup(argv)
    except ValueError as e:
        fail(f"config error: {e}")
    try:
        main(config)
    except (DataFormatError, TooManySkips) as e:  # a malformed record or data file, or too many unusable samples
        fail(f"data error: {one_line(e)}")
    except NonFiniteError as e:
        fail(f"stopped: {one_line(e)}")
    except ValueError as e:  # a user mistake found while building (model path, options the model contradicts)
        fail(f"error: {one_line(e)}")


def one_line(error: BaseException) -> str:
    """The error's own message: raised in a DataLoader worker, torch re-raises it with the worker's whole
    traceback in the message, whose last line is the original `Type: message`."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())
