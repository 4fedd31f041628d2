"""Console and tracker logging: `print0`, the fixed-format step line, and memory readings.

Trackers (tensorboard by default, wandb optional) go through accelerate's `init_trackers` / `log`
in the loop; this module only formats.
"""

from __future__ import annotations

import logging
import os
import resource
import sys

import torch


class _AboveProgressBars(logging.StreamHandler):
    """Log records (and Python warnings, through `logging.captureWarnings`) written with `tqdm.write`: on a line of
    their own above the progress bar, never glued onto it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 -- logging must never break a run
            self.handleError(record)


# Warnings a user of vltrain cannot act on (said once here, instead of on every run):
_UNACTIONABLE = [
    # peft records the base's name_or_path; a `tiny:` model built from config has none to record
    (r"The PEFT config's `base_model_name_or_path` was renamed", UserWarning),
    (r"Could not find a config file in tiny:", UserWarning),
    # transformers 5.24 calls its own deprecated alias inside gradient checkpointing (once per layer and step)
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
]
# Log records dropped (logger -> a part of the message): torch 2.14 logs this for torchao 0.18's enums on every
# import of torchao, which transformers imports whenever it builds a model once torchao is installed (vltrain[fp8])
_UNACTIONABLE_LOGS = {"torch.utils._pytree": "is an Enum subclass and is now natively supported"}


def _drop_unactionable(record: logging.LogRecord) -> bool:
    part = _UNACTIONABLE_LOGS.get(record.name)
    return part is None or part not in record.getMessage()


def quiet_library_noise() -> None:
    """Silence the library messages listed in `_UNACTIONABLE` and `_UNACTIONABLE_LOGS`, and DeepSpeed's "Setting accelerator to CPU" banner on
    machines without CUDA (DS_ACCELERATOR=cpu is what it would pick anyway)."""
    import warnings

    for message, category in _UNACTIONABLE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _UNACTIONABLE_LOGS:
        logging.getLogger(name).addFilter(_drop_unactionable)  # once: addFilter skips a filter already there
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def setup_logging(is_main: bool) -> None:
    """INFO from vltrain on the main process (WARNING elsewhere), as lines above the progress bar; Python warnings
    go the same way; the unactionable ones are dropped (`quiet_library_noise`)."""
    quiet_library_noise()
    handler = _AboveProgressBars()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, handlers=[handler], force=True)
    logging.captureWarnings(True)
    for noisy in ("transformers", "accelerate", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not is_main else logging.WARNING)


def print0(*args, **kwargs) -> None:
    """print on the main process only (rank from the launcher's environment), above any progress bar."""
    if int(os.environ.get("RANK", "0")) == 0:
        if kwargs:
            print(*args, **kwargs, flush=True)
            return
        from tqdm.auto import tqdm

        tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)
        sys.stdout.flush()


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


_FORMATS = {"loss": ("loss", "{:.4f}"), "lr": ("lr", "{:.2e}"), "grad_norm": ("grad", "{:.3f}"),
            "tokens_per_s": ("tok/s", "{:,.0f}"), "memory_gib": ("mem", "{:.2f} GiB")}
_NOT_SHOWN = ("epoch",)


def format_step(step: int, total: int, metrics: dict) -> str:
    """`step   12/300 | loss 1.2345 | lr 2.00e-05 | grad 0.812 | tok/s 12,345 | mem 3.21 GiB | other 0.5`

    Any metrics dict: the known keys in that order and format, every other number after them (`{:.4g}`)."""
    width = len(str(total))
    parts = [f"step {step:>{width}}/{total}"]
    for key, (label, fmt) in _FORMATS.items():
        if key in metrics:
            parts.append(f"{label} {fmt.format(metrics[key])}")
    parts += [f"{key} {value:.4g}" for key, value in metrics.items()
              if key not in _FORMATS and key not in _NOT_SHOWN and isinstance(value, (int, float))]
    return " | ".join(parts)
