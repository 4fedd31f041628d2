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


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
    )
    for noisy in ("transformers", "accelerate", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR if not is_main else logging.WARNING)


def print0(*args, **kwargs) -> None:
    """print on the main process only (rank from the launcher's environment)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


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
