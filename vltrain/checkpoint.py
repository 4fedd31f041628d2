"""Resumable checkpoints (training state) and exports (what plain transformers loads).

A checkpoint is `output_dir/checkpoints/step_XXXXXX/`: accelerate's state (model, optimizer, RNG
states; every rank writes its shard) plus `trainer_state.json` (step, data position) and the
scheduler. It is written under `step_XXXXXX.tmp`, renamed by the main process, and a `COMPLETE`
marker is written last: `latest_checkpoint` ignores any folder without it.

An export is `save_pretrained` weights (safetensors) + processor + the resolved config.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch

from vltrain.config import dump_config

log = logging.getLogger(__name__)
COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`None` -> no resume; `auto` -> newest complete checkpoint (or none); a path -> that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise ValueError(f"train.resume={resume!r} is not a complete checkpoint (no {COMPLETE} marker)")
    return path


def save_checkpoint(accelerator, output_dir, step: int, scheduler, trainer_state: dict, keep_last: int) -> Path:
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler_vltrain.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (final / COMPLETE).write_text("ok\n")
        for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, scheduler) -> dict:
    accelerator.load_state(str(path))
    scheduler.load_state_dict(torch.load(path / "scheduler_vltrain.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def export_model(accelerator, model, processor, cfg, out_dir: str | Path) -> Path:
    """`save_pretrained` weights + processor + resolved config, loadable by plain transformers."""
    out_dir = Path(out_dir)
    state_dict = accelerator.get_state_dict(model)  # gathers under ZeRO-3 / FSDP, once
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        processor.save_pretrained(out_dir)
        dump_config(cfg, out_dir / "vltrain_config.yaml")
        log.info("exported model to %s", out_dir)
    accelerator.wait_for_everyone()
    return out_dir
