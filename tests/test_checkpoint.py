"""Resumable checkpoints: contents, resume equivalence, SIGKILL mid-run (and mid-save), torn folders."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from safetensors import safe_open

from vltrain.checkpoint import COMPLETE, checkpoint_dirs, resolve_resume

from conftest import REPO
from test_lora import image_data, lora_cfg  # noqa: F401  (fixture + config helper)


def _reset_accelerate():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _run(cfg, monkeypatch):
    """recipes.sft.main(cfg), returning (summary, per-step losses of this run)."""
    from recipes import sft as recipe

    captured = {}
    real_train = recipe.train

    def spy(*args, **kwargs):
        result = real_train(*args, **kwargs)
        captured["losses"] = list(result.losses)
        return result

    monkeypatch.setattr(recipe, "train", spy)
    try:
        summary = recipe.main(cfg)
    finally:
        _reset_accelerate()
    return summary, captured["losses"]


def _keys(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_adapter_checkpoint_holds_no_frozen_weights_and_sizes(tmp_path, image_data, monkeypatch):
    lora = lora_cfg(tmp_path / "lora", "qwen2_5_vl", image_data, **{"train.max_steps": 2, "train.save_every": 2})
    _run(lora, monkeypatch)
    full = lora_cfg(tmp_path / "full", "qwen2_5_vl", image_data, **{
        "train.max_steps": 2, "train.save_every": 2, "lora.enabled": False,
        "trainable.freeze_llm": False, "trainable.freeze_vision_tower": False, "trainable.freeze_merger": False})
    _run(full, monkeypatch)
    lora_ckpt = checkpoint_dirs(lora.train.output_dir)[-1]
    full_ckpt = checkpoint_dirs(full.train.output_dir)[-1]
    keys = _keys(lora_ckpt)
    assert keys and all("lora_" in k for k in keys), [k for k in keys if "lora_" not in k][:5]
    assert len(_keys(full_ckpt)) > len(keys)
    for name in ("optimizer.bin", "scheduler.json", "trainer_state.json", COMPLETE):
        assert (lora_ckpt / name).is_file(), name
    assert list(lora_ckpt.glob("random_states_*.pkl"))
    state = json.loads((lora_ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and {"epoch", "next_batch"} <= set(state)
    sizes = {
        "full_ft_checkpoint": _size(full_ckpt), "lora_checkpoint": _size(lora_ckpt),
        "full_ft_model_weights": (full_ckpt / "model.safetensors").stat().st_size,
        "lora_model_weights": (lora_ckpt / "model.safetensors").stat().st_size,
        "full_ft_export": _size(Path(full.train.output_dir) / "final"),
        "lora_export_adapter": _size(Path(lora.train.output_dir) / "final" / "adapter"),
    }
    print("\ncheckpoint sizes (bytes, tiny qwen2_5_vl, rank 4):", json.dumps(sizes))
    assert sizes["lora_checkpoint"] < sizes["full_ft_checkpoint"] / 5


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_gives_the_same_losses(mode, tmp_path, image_data, monkeypatch):
    extra = {"train.max_steps": 6, "train.save_every": 3, "train.save_total_limit": 3, "lora.dropout": 0.1,
             "optim.scheduler": "cosine", "optim.warmup_steps": 1}
    if mode == "full":
        extra.pop("lora.dropout")  # no adapters: adapter options would be orphans
        extra.update({"lora.enabled": False, "trainable.freeze_llm": False})
    cfg = lora_cfg(tmp_path, "qwen2_vl", image_data, **extra)
    _, straight = _run(cfg, monkeypatch)
    assert len(straight) == 6
    steps = [p.name for p in checkpoint_dirs(cfg.train.output_dir)]
    assert steps == ["step_000003", "step_000006"]

    import shutil

    shutil.rmtree(Path(cfg.train.output_dir) / "checkpoints" / "step_000006")  # as if killed after step 3
    cfg.train.resume = "auto"
    _, resumed = _run(cfg, monkeypatch)
    assert resumed == straight[3:], (straight, resumed)  # bit-identical on CPU


def test_torn_checkpoints_are_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step_000004", True), ("step_000008", True), ("step_000012", False),
                           ("step_000016.tmp", False)]:
        (root / name).mkdir(parents=True)
        (root / name / "trainer_state.json").write_text("{}")
        if complete:
            (root / name / COMPLETE).write_text("ok\n")
    assert resolve_resume("auto", tmp_path) == root / "step_000008"
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(ValueError, match="step_000012"):
        resolve_resume(str(root / "step_000012"), tmp_path)
    assert resolve_resume("auto", tmp_path / "nothing_here") is None


def test_resume_with_other_settings_names_the_key(tmp_path, image_data, monkeypatch):
    cfg = lora_cfg(tmp_path, "qwen2_vl", image_data, **{"train.max_steps": 2, "train.save_every": 2})
    _run(cfg, monkeypatch)
    other = lora_cfg(tmp_path, "qwen2_vl", image_data, **{"train.max_steps": 4, "train.resume": "auto",
                                                          "lora.vision_lora": True})
    with pytest.raises(ValueError, match=r"missing \[.*visual"):
        _run(other, monkeypatch)


_CHILD = """
import sys
sys.path.insert(0, {repo!r})
from recipes.sft import main
from vltrain.config import SFTConfig, load_config
main(load_config(SFTConfig, None, {overrides!r}))
"""


def test_sigkill_mid_save_then_resume_ignores_the_torn_tmp_and_replaces_it(tmp_path, image_data):
    """SIGKILL at a random moment inside a save (after step 1's checkpoint is complete): the torn
    `step_N.tmp` is left behind; resume starts from the newest complete checkpoint (ignoring the .tmp),
    and the resumed run's save of step N replaces the torn folder, so no .tmp remains at the end."""
    cfg = lora_cfg(tmp_path, "qwen2_vl", image_data, **{"train.max_steps": 6, "train.save_every": 1,
                                                        "train.resume": "auto", "train.save_total_limit": 2})
    overrides = [f"{section}.{k}={v}" for section, values in
                 __import__("dataclasses").asdict(cfg).items() for k, v in values.items()
                 if v is not None and not isinstance(v, (list, tuple))]
    script = _CHILD.format(repo=str(REPO), overrides=overrides)
    save_sleep = 2.0  # every save sleeps this long between writing its .tmp and renaming it
    env = {**os.environ, "VLTRAIN_SAVE_SLEEP": str(save_sleep), "PYTHONPATH": str(REPO)}
    out = Path(cfg.train.output_dir)
    root = out / "checkpoints"
    rng = random.Random(int(time.time()))

    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    torn = []
    while not torn and time.time() < deadline and proc.poll() is None:
        torn = list(root.glob("*.tmp")) if checkpoint_dirs(out) else []
        time.sleep(0.01)
    child_err = proc.stderr.read().decode()[-2000:] if not torn and proc.poll() is not None else ""
    assert torn, f"no save after a complete one: {child_err}"
    time.sleep(rng.uniform(0.0, save_sleep / 2))  # somewhere between the .tmp's mkdir and its rename
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = [int(p.name.split("_")[1]) for p in checkpoint_dirs(out)]
    assert killed_at and killed_at[-1] < 6
    torn_step = int(torn[0].name.split("_")[1].removesuffix(".tmp"))
    assert list(root.glob("*.tmp")) == torn and torn_step == killed_at[-1] + 1, (torn, killed_at)
    assert not (root / f"step_{torn_step:06d}").exists()  # killed before the rename

    resumed = subprocess.run([sys.executable, "-c", script], env={**env, "VLTRAIN_SAVE_SLEEP": "0"}, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {root / f'step_{killed_at[-1]:06d}'}" in resumed.stdout + resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["step_000005", "step_000006"]  # the torn .tmp is gone


def test_save_sweeps_torn_folders_and_deletes_old_checkpoints_via_a_rename(tmp_path):
    """Folders torn by an earlier kill (a `.tmp` of a step never reached again, a `.del` left mid-deletion)
    are removed by the next save; pruning renames a checkpoint before deleting it, so no `step_N` folder is
    ever left without its COMPLETE marker."""
    from accelerate import Accelerator

    from vltrain.checkpoint import save_checkpoint

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    root = tmp_path / "checkpoints"
    for torn in ("step_000009.tmp", "step_000001.del"):
        (root / torn).mkdir(parents=True)
    renamed = []
    real_rename = Path.rename

    def spy(self, target):
        renamed.append((self.name, Path(target).name))
        return real_rename(self, target)

    Path.rename = spy
    try:
        for step in (2, 3):
            save_checkpoint(accelerator, tmp_path, step, scheduler, {"epoch": 0, "next_batch": step}, keep_last=1)
    finally:
        Path.rename = real_rename
    assert sorted(p.name for p in root.iterdir()) == ["step_000003"]
    assert ("step_000002", "step_000002.del") in renamed  # pruned through a rename, then deleted
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000003"]


def test_scheduler_state_of_older_checkpoints_loads_without_unpickling_objects(tmp_path):
    """Checkpoints written before scheduler.json hold scheduler_vltrain.pt: read with weights_only=True; one
    holding a pickled object is refused with one line naming the file."""
    from vltrain.checkpoint import LEGACY_SCHEDULER_FILE, load_scheduler_state

    model = torch.nn.Linear(2, 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=0.1), lambda s: 0.5)
    scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / LEGACY_SCHEDULER_FILE)
    assert load_scheduler_state(tmp_path) == scheduler.state_dict()
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"last_epoch": 1, "lr_lambdas": [Path("x")]}, evil / LEGACY_SCHEDULER_FILE)  # an object, not data
    with pytest.raises(ValueError, match=f"{evil / LEGACY_SCHEDULER_FILE}.*weights_only=True") as info:
        load_scheduler_state(evil)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no scheduler.json"):
        load_scheduler_state(tmp_path / "nothing")


def test_a_full_disk_in_a_save_removes_the_torn_folder_and_raises_one_line(tmp_path, monkeypatch):
    import errno

    from accelerate import Accelerator

    from vltrain.checkpoint import DiskFullError, save_checkpoint

    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(accelerator, tmp_path, 1, scheduler, {"epoch": 0, "next_batch": 1}, keep_last=2)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", full)
    with pytest.raises(DiskFullError, match=r"disk full while writing checkpoint .*step_000002\.tmp") as info:
        save_checkpoint(accelerator, tmp_path, 2, scheduler, {"epoch": 0, "next_batch": 2}, keep_last=2)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001"]
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000001"]
