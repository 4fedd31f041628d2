"""Loop plumbing (vltrain.progress): train state, sampler epochs under accelerate's shard, the banner, and a
2-process token-budget run resumed after an epoch boundary."""

import json
import shutil
import subprocess
import sys

import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import DataLoader

from vltrain.data.packing import TokenBudgetBatchSampler
from vltrain.progress import TrainState, _set_sampler_epoch, describe_run, model_inputs

from conftest import REPO, mixed_records, write_image, write_video


def test_train_state_round_trip_and_older_checkpoints():
    state = TrainState(step=7, epoch=1, next_batch=3, num_skipped=2, num_bad_steps=1, losses=[2.0, 1.5])
    assert TrainState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert TrainState.from_dict({"step": 4, "epoch": 0, "next_batch": 4}) == TrainState(step=4, next_batch=4)


def test_model_inputs_drop_everything_the_model_does_not_take():
    batch = {"input_ids": torch.ones(1, 3), "labels": torch.ones(1, 3), "id": ["a"], "skipped": [], "pixel_values": None}
    assert set(model_inputs(batch)) == {"input_ids", "labels"}
    assert set(model_inputs(batch, labels=False)) == {"input_ids"}


def test_sampler_epoch_reaches_a_batch_sampler_under_accelerates_shard():
    sampler = TokenBudgetBatchSampler([5, 3, 8, 2, 7, 4, 6, 1], 10, shuffle=True, seed=0)
    shard = BatchSamplerShard(sampler, num_processes=2, process_index=0)
    loader = DataLoader(list(range(8)), batch_sampler=shard)
    assert not hasattr(shard, "set_epoch")  # accelerate's shard would drop the epoch
    _set_sampler_epoch(loader, 3)
    assert sampler.epoch == 3


def test_banner_reads_the_loader_not_the_config():
    plain = DataLoader(list(range(10)), batch_size=4)
    assert "micro-batch 4 x accumulation 2 x 1 process(es) = 8 samples/step" in describe_run(plain, 2, 1, 6, 3)
    budget = DataLoader(list(range(8)), batch_sampler=TokenBudgetBatchSampler([5, 5, 5, 5, 5, 5, 5, 5], 10, shuffle=False))
    line = describe_run(budget, 1, 1, 4, 4)
    assert "~2.0 samples per micro-batch (token budget)" in line and "~2 samples/step" in line


def _launch(data, out, *overrides):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29541",
           str(REPO / "tests" / "dist_train.py"), str(data), str(out), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)], proc.stdout + proc.stderr


def test_two_process_token_budget_resume_after_an_epoch_boundary(tmp_path):
    """Token-budget batches, shuffled per epoch, 2 ranks: a run resumed in epoch 1 sees epoch 1's order
    (before the fix the shard dropped set_epoch, and the resumed epoch replayed epoch 0's order)."""
    write_image(tmp_path / "a.png", (64, 64), seed=1)
    write_image(tmp_path / "b.png", (96, 64), seed=2)
    write_video(tmp_path / "clip.mp4")
    records = [dict(r, id=f"{r['id']}{i}") for i in range(2) for r in mixed_records()]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    common = ["data.max_tokens_per_batch=128", "data.max_seq_length=128", "train.gradient_accumulation_steps=1", "train.num_epochs=3",
              "train.max_steps=-1", "train.save_every=1", "train.save_total_limit=20", "optim.lr=1e-3"]
    straight, _ = _launch(data, tmp_path / "out", *common)
    losses = straight[0]["losses"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    steps = summary["steps"]
    per_epoch = steps // 3
    assert per_epoch >= 2 and len(losses) == steps
    resume_at = per_epoch + 1  # one step into epoch 1
    for folder in (tmp_path / "out" / "checkpoints").iterdir():
        if int(folder.name.split("_")[1]) > resume_at:
            shutil.rmtree(folder)
    resumed, log = _launch(data, tmp_path / "out", *common, "train.resume=auto")
    assert f"at step {resume_at}" in log
    assert resumed[0]["losses"] == losses[resume_at:], (losses, resumed[0]["losses"])
    assert resumed[0]["checksum"] == resumed[1]["checksum"] == straight[0]["checksum"]
