"""Resumable checkpoints (training state) and exports (what plain transformers / peft load).

A checkpoint is `output_dir/checkpoints/step_XXXXXX/`:
  model.safetensors       the *trainable* parameters only (LoRA: adapters + fully trained modules;
                          frozen base weights come from the base model at resume)
  optimizer.bin, random_states_*.pkl, (sampler.bin)   accelerate's state: optimizer, RNG of every rank
  scheduler.json          the LR schedule's state_dict (plain numbers: our LambdaLR's lambdas are closures,
                          saved as None, so nothing needs pickle)
  trainer_state.json      step, epoch, next_batch (the data position)
  COMPLETE                written last
It is written under `step_XXXXXX.tmp` and renamed by the main process before the marker is written
(a save first removes `.tmp` / `.del` folders torn by an earlier kill; old checkpoints are renamed to
`.del` before they are deleted):
`latest_checkpoint` / `resume: auto` only ever see folders with the marker, so a process killed
mid-save leaves a torn folder that is ignored. Only the newest `keep_last` complete ones are kept.
The model state is gathered once per save (`accelerator.get_state_dict` inside `save_state`).

An export is `save_pretrained` weights (safetensors) + processor + the resolved config. For a peft
model: `adapter/` (peft's folder, loadable with `PeftModel.from_pretrained`) and, with
`lora.merge_on_export`, `merged/` -- the base in the training dtype with the adapter merged in.

Loading unpickles nothing of ours; accelerate loads its own files (optimizer.bin, random_states_*.pkl,
sampler.bin) with `torch.load(weights_only=True)` (accelerate >= 1.x: its `load` defaults to it and allows
only numpy's RNG types beyond tensors), which is as safe as a pickle-format file can be loaded. Checkpoints of
older vltrain versions hold `scheduler_vltrain.pt`: read with `weights_only=True` too.

A save that hits a full disk (ENOSPC) removes its own `.tmp` folder and raises `DiskFullError` (one line: the
folder and the free space); the previous checkpoints are untouched, so the run resumes from the newest.

`VLTRAIN_SAVE_SLEEP=<seconds>` sleeps inside a save, between writing and renaming (for kill tests).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch

from vltrain.config import CHECKPOINT_COMPLETE as COMPLETE, check_resume_folder, dump_config

log = logging.getLogger(__name__)
SCHEDULER_FILE = "scheduler.json"
LEGACY_SCHEDULER_FILE = "scheduler_vltrain.pt"  # pickled by vltrain before the JSON file
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
MODEL_FILE = "model.safetensors"  # accelerate's name for the first prepared model's weights


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
        found = latest_checkpoint(output_dir)
        if found is None:
            from vltrain.tracking import print0

            print0(f"train.resume=auto: no complete checkpoint in {Path(output_dir) / 'checkpoints'}; starting at step 0")
        return found
    check_resume_folder(resume)  # already checked at config load; the folder may have gone since
    return Path(resume)


def _trainable_names(module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def _keep_trainable(models, weights, output_dir) -> None:
    """accelerate save-state pre-hook: drop frozen parameters (and buffers) from the model weights."""
    for i, (model, state) in enumerate(zip(models, weights)):
        keep = _trainable_names(model)
        weights[i] = {k: v for k, v in state.items() if k in keep}


def _register_hooks(accelerator) -> None:
    if not getattr(accelerator, "_vltrain_ckpt_hooks", False):
        accelerator.register_save_state_pre_hook(_keep_trainable)
        accelerator._vltrain_ckpt_hooks = True


class DiskFullError(OSError, ValueError):
    """A checkpoint could not be written: the disk is full. An OSError (ENOSPC); also a ValueError, so the
    recipes' one-line error handler (vltrain.run.run_recipe) reports it without a traceback."""


def _disk_full(error: OSError, folder: Path) -> DiskFullError:
    try:
        free = f"{shutil.disk_usage(folder.parent).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(errno.ENOSPC, f"disk full while writing checkpoint {folder} ({free}); the torn folder was "
                                       f"removed and the previous checkpoints are intact: free space (or set "
                                       f"train.output_dir elsewhere) and resume with train.resume=auto "
                                       f"[{error.strerror or error}]")


def _any_rank(accelerator, flag: bool) -> bool:
    from vltrain.faults import _max_over_ranks

    return bool(_max_over_ranks(accelerator, 1.0 if flag else 0.0))


def save_checkpoint(accelerator, output_dir, step: int, scheduler, trainer_state: dict, keep_last: int) -> Path:
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    _register_hooks(accelerator)
    if accelerator.is_main_process:
        for stale in [*root.glob("step_*.tmp"), *root.glob("step_*.del")]:
            shutil.rmtree(stale, ignore_errors=True)  # torn by an earlier kill: never complete, never resumed from
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # DeepSpeed writes its own engine checkpoint; leave frozen (base) weights out of it too.
    kwargs = {"exclude_frozen_parameters": True} if accelerator.distributed_type == "DEEPSPEED" else {}
    full: OSError | None = None
    try:
        accelerator.save_state(str(tmp), **kwargs)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        full = e
    # every rank writes into tmp (RNG states; DeepSpeed's shards) before the rename; a full disk on any rank
    # stops every rank (collective, instead of leaving the others in the next barrier)
    if _any_rank(accelerator, full is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_full(full or OSError(errno.ENOSPC, "on another rank"), tmp)
    if accelerator.is_main_process:
        try:
            (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise _disk_full(e, tmp) from None
        if os.environ.get("VLTRAIN_SAVE_SLEEP"):
            time.sleep(float(os.environ["VLTRAIN_SAVE_SLEEP"]))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (final / COMPLETE).write_text("ok\n")  # an empty file would do: even a full disk has room for its inode
        for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
            # renamed first: a kill during the rmtree leaves a `.del` folder (swept at the next save), never a
            # `step_N` folder without its COMPLETE marker
            doomed = old.with_name(old.name + ".del")
            old.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _check_keys(accelerator, path: Path) -> None:
    """Every trainable parameter must be in the checkpoint and nothing else: a mismatch names the key."""
    from safetensors import safe_open

    file = path / MODEL_FILE
    if not file.is_file() or not accelerator._models:
        return  # FSDP / DeepSpeed write their own format; their loaders check it
    with safe_open(str(file), "pt") as f:
        saved = set(f.keys())
    expected = _trainable_names(accelerator._models[0])
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model being trained: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            "(was it written with other trainable.* / lora.* settings?)"
        )


def load_checkpoint(accelerator, path: Path, scheduler) -> dict:
    """Restore model (trainable weights), optimizer, RNG states, scheduler; returns trainer_state."""
    path = Path(path)
    _check_keys(accelerator, path)
    kwargs = {"load_module_strict": False} if accelerator.distributed_type == "DEEPSPEED" else {"strict": False}
    accelerator.load_state(str(path), **kwargs)  # accelerate's files: torch.load(weights_only=True)
    scheduler.load_state_dict(load_scheduler_state(path))
    return json.loads((path / "trainer_state.json").read_text())


def load_scheduler_state(path: Path) -> dict:
    """The LR schedule's state_dict from checkpoint `path`: `scheduler.json`, or an older checkpoint's
    `scheduler_vltrain.pt` read without arbitrary unpickling (`weights_only=True`)."""
    path = Path(path)
    if (path / SCHEDULER_FILE).is_file():
        return json.loads((path / SCHEDULER_FILE).read_text())
    legacy = path / LEGACY_SCHEDULER_FILE
    if not legacy.is_file():
        raise ValueError(f"checkpoint {path} has no {SCHEDULER_FILE} (nor an older {LEGACY_SCHEDULER_FILE})")
    try:
        return torch.load(legacy, weights_only=True)
    except Exception as e:  # an UnpicklingError names the refused global
        raise ValueError(f"{legacy} holds objects that cannot be loaded safely (torch.load weights_only=True: "
                         f"{str(e).splitlines()[0]}); re-save it with a vltrain that writes {SCHEDULER_FILE}") from None


def export_model(accelerator, model, processor, cfg, out_dir: str | Path) -> Path:
    """`save_pretrained` weights + processor + resolved config, loadable by plain transformers (or,
    for a peft model, `adapter/` for peft and optionally `merged/` for plain transformers). A classifier
    (vltrain.classifier.VLClassifier) saves its backbone so, and its head as `head.safetensors` +
    `classifier.json` in `out_dir` (reload: vltrain.classifier.load_classifier)."""
    out_dir = Path(out_dir)
    state_dict = accelerator.get_state_dict(model)  # gathers under ZeRO-3 / FSDP, once
    unwrapped = accelerator.unwrap_model(model)
    head = None
    if hasattr(unwrapped, "split_state_dict"):  # a classifier (vltrain.classifier): its backbone saves as any model
        head, (unwrapped, state_dict, head_state) = unwrapped, unwrapped.split_state_dict(state_dict)
    is_peft = hasattr(unwrapped, "peft_config")
    if accelerator.is_main_process:
        target = out_dir / "adapter" if is_peft else out_dir
        target.mkdir(parents=True, exist_ok=True)
        unwrapped.save_pretrained(target, state_dict=state_dict, safe_serialization=True)
        if head is not None:
            head.save_head(out_dir, head_state, base=cfg.model.name_or_path, dtype=cfg.model.dtype)
        processor.save_pretrained(target)
        dump_config(cfg, target / "vltrain_config.yaml")
        log.info("exported %s to %s", "adapter" if is_peft else "model", target)
        if is_peft and getattr(getattr(cfg, "lora", None), "merge_on_export", False):
            from vltrain.lora import merge_adapter

            # merged from the saved adapter into a fresh, unquantized base in the training dtype (a
            # 4/8-bit base cannot hold the merge exactly); on CPU so it never competes for GPU memory
            merged, merged_processor = merge_adapter(target, base=cfg.model.name_or_path, dtype=cfg.model.dtype)
            merged.save_pretrained(out_dir / "merged", safe_serialization=True)
            merged_processor.save_pretrained(out_dir / "merged")
            dump_config(cfg, out_dir / "merged" / "vltrain_config.yaml")
            log.info("exported merged model to %s", out_dir / "merged")
    accelerator.wait_for_everyone()
    return out_dir
