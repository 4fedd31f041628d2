"""vltrain.faults: preemption signals and non-finite steps, from unit level to the real recipe.

Tiers: pure units (the flag, the guard, worker_init_fn, optimizer_step on a small torch model); 2-rank CPU
runs of a small model under DDP (gloo) and DeepSpeed ZeRO-2 / ZeRO-3 through tests/faults_run.py; and the
real recipe under `accelerate launch`: SIGTERM to the whole process group, then resume, compared with a
straight run, and a NaN injected into one step. Every subprocess has a timeout, so a hang fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from vltrain.faults import (NAN_HOOK_ENV, NonFiniteError, NonFiniteGuard, Preemption, backward, optimizer_step,
                            worker_init_fn)

from conftest import REPO, mixed_records, sft_config, write_image, write_video

RUNNER = REPO / "tests" / "faults_run.py"


# ---------------------------------------------------------------- Preemption


def test_preemption_sets_a_flag_instead_of_dying_and_restores_the_old_handlers():
    def previous(signum, frame):
        raise AssertionError("the old handler must not run inside the context")

    old_int = signal.getsignal(signal.SIGINT)
    old_term = signal.signal(signal.SIGTERM, previous)
    try:
        accelerator = Accelerator(cpu=True)
        with Preemption() as preemption:
            assert not preemption.requested(accelerator) and preemption.signal_name is None
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's copy and the launcher's: still one stop
            os.kill(os.getpid(), signal.SIGINT)
            assert preemption.requested(accelerator) and preemption.signal_name == "SIGTERM"  # the first one
        assert signal.getsignal(signal.SIGTERM) is previous and signal.getsignal(signal.SIGINT) is old_int
    finally:
        signal.signal(signal.SIGTERM, old_term)


def test_third_sigint_interrupts_at_once():
    # A process started in the background by a non-interactive shell inherits SIGINT ignored (Python then installs
    # no KeyboardInterrupt handler): give this test the interactive default it is about.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with Preemption() as preemption:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            assert preemption.signal_name == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs between bytecodes; never reached
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_preemption_outside_the_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def body():
        with Preemption() as preemption:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["requested"] = preemption.requested(Accelerator(cpu=True))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "requested": False}


class _SignalsItself(torch.utils.data.Dataset):
    """Item 1 sends SIGTERM to the worker process that loads it."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
        return torch.tensor([i, os.getpid()])


def test_worker_init_fn_keeps_dataloader_workers_alive_through_sigterm():
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # workers start with the default: dying
    loader = torch.utils.data.DataLoader(_SignalsItself(), batch_size=None, num_workers=1,
                                         worker_init_fn=worker_init_fn)
    items = torch.stack(list(loader))
    assert items[:, 0].tolist() == [0, 1, 2, 3] and items[0, 1] != os.getpid()
    without = torch.utils.data.DataLoader(_SignalsItself(), batch_size=None, num_workers=1)
    with pytest.raises(RuntimeError, match="DataLoader worker .* (killed by signal|exited unexpectedly)"):
        list(without)


def test_a_script_exiting_with_a_live_loader_iterator_is_not_held_up_by_its_workers():
    """At interpreter exit multiprocessing SIGTERMs daemonic workers and joins them: that one they obey."""
    script = (
        "import torch\nfrom vltrain.faults import worker_init_fn\n"
        "loader = torch.utils.data.DataLoader(list(range(8)), num_workers=2, persistent_workers=True,"
        " worker_init_fn=worker_init_fn)\n"
        "it = iter(loader)\nprint(next(it).tolist(), flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "[0]", proc.stderr[-2000:]


# ---------------------------------------------------------------- NonFiniteGuard


def test_guard_counts_bad_steps_resets_on_a_good_one_and_raises_after_max_in_a_row(caplog):
    guard = NonFiniteGuard(max_bad_steps=2)
    guard.record(1, True, ["a"])
    guard.record(2, False, ["b", "c"])
    assert "step 2 skipped" in caplog.text and "b, c" in caplog.text
    guard.record(3, True, ["d"])
    guard.record(4, False, ["e"])
    with pytest.raises(NonFiniteError, match=r"steps 4-5\).*train\.max_bad_steps=2") as info:
        guard.record(5, False, ["f"])
    assert "\n" not in str(info.value) and isinstance(info.value, RuntimeError)
    assert guard.num_bad_steps == 3
    with pytest.raises(ValueError, match="train.max_bad_steps"):
        NonFiniteGuard(0)


def test_guard_resumes_its_total():
    guard = NonFiniteGuard(max_bad_steps=2, num_bad_steps=4)
    guard.record(9, False, [])
    assert guard.num_bad_steps == 5


def test_deepspeed_settings_that_would_apply_a_nan_step_are_refused(monkeypatch):
    """Checked on a stand-in engine: the real ones run in the 2-rank DeepSpeed tests below."""
    import types

    import vltrain.faults as faults

    def engine(bf16=True, check=True, zero=True, norm=True):
        return types.SimpleNamespace(
            bfloat16_enabled=lambda: bf16, zero_optimization=lambda: zero, zero_compute_grad_norm=lambda: norm,
            _config=types.SimpleNamespace(bfloat16_config=types.SimpleNamespace(check_grad_overflow=check)))

    monkeypatch.setattr(faults, "_STATE", faults._BackwardState())
    for kwargs, field in (({"check": False}, "bf16.check_grad_overflow"), ({"zero": False}, "stage 0"),
                          ({"norm": False}, "zero_optimization.compute_grad_norm")):
        accelerator = types.SimpleNamespace(deepspeed_engine_wrapped=types.SimpleNamespace(engine=engine(**kwargs)))
        with pytest.raises(ValueError, match=field):
            backward(accelerator, None, torch.tensor(1.0))


def test_guard_step_ok_needs_finite_loss_and_norm():
    accelerator, guard = Accelerator(cpu=True), NonFiniteGuard(1)
    finite = torch.tensor(1.5)
    assert guard.step_ok(accelerator, finite, torch.tensor(2.0)) and guard.step_ok(accelerator, finite, 2.0)
    assert guard.step_ok(accelerator, finite, None)  # a backend that did not measure the norm
    assert not guard.step_ok(accelerator, torch.tensor(float("nan")), 2.0)
    assert not guard.step_ok(accelerator, finite, float("inf"))
    assert not guard.step_ok(accelerator, finite, torch.tensor(float("nan")))


# ---------------------------------------------------------------- optimizer_step, one process


def _small_run(poison_step: int | None, steps: int, *, skip_data_of: int | None = None, max_grad_norm=0.5):
    """Train a 2-layer MLP with AdamW + a decaying LambdaLR for `steps` steps of 2 micro-batches; the loss of
    `poison_step` is multiplied by NaN (NaN gradients); `skip_data_of` drops that step's batches altogether.
    Returns per-step records and the final model / optimizer / scheduler."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    guard, records = NonFiniteGuard(max_bad_steps=2), []
    data = torch.randn(steps, 2, 4, 6, generator=torch.Generator().manual_seed(1))
    for step in range(1, steps + 1):
        if step == skip_data_of:
            continue
        step_loss = torch.zeros(())
        for micro in range(2):
            with accelerator.accumulate(model):
                x = data[step - 1, micro]
                loss = (model(x) - x[:, :3]).pow(2).mean()
                if step == poison_step:
                    loss = loss * float("nan")
                backward(accelerator, model, loss)
                step_loss += loss.detach()
        before = _state(model, optimizer)
        last_epoch = scheduler.last_epoch
        norm, stepped = optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=max_grad_norm,
                                       loss=step_loss, guard=guard, step=step, sample_ids=[f"s{step}"])
        after = _state(model, optimizer)
        records.append({"norm": norm, "stepped": stepped, "scheduler": scheduler.last_epoch - last_epoch,
                        "changed": sorted(k for k in after if k not in before or not torch.equal(before[k], after[k])),
                        "grads": [p.grad for p in model.parameters()]})
    return records, model, optimizer, scheduler, guard


def _state(model, optimizer) -> dict:
    tensors = {f"param{i}": p.detach().clone() for i, p in enumerate(model.parameters())}
    for i, p in enumerate(model.parameters()):
        for key, value in optimizer.optimizer.state.get(p, {}).items():
            tensors[f"param{i}.{key}"] = torch.as_tensor(value).clone()
    return tensors


def test_a_nan_step_changes_no_weight_no_adam_state_and_not_the_schedule():
    records, model, optimizer, scheduler, guard = _small_run(poison_step=2, steps=4)
    assert [r["stepped"] for r in records] == [True, False, True, True]
    bad = records[1]
    assert bad["changed"] == [] and bad["scheduler"] == 0 and bad["norm"] != bad["norm"]  # NaN
    every_tensor = {f"param{i}{k}" for i in range(4) for k in ("", ".exp_avg", ".exp_avg_sq", ".step")}
    assert set(records[2]["changed"]) == every_tensor and records[2]["scheduler"] == 1  # the next steps train
    assert all(g is None for r in records for g in r["grads"])  # zero_grad(set_to_none) always
    assert guard.num_bad_steps == 1 and scheduler.last_epoch == 3
    assert all(float(optimizer.optimizer.state[p]["step"]) == 3 for p in model.parameters())
    # a skipped step is the same as not having had that step's data at all
    _, reference, ref_optimizer, _, _ = _small_run(poison_step=None, steps=4, skip_data_of=2)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.optimizer.state[p]["exp_avg_sq"], ref_optimizer.optimizer.state[q]["exp_avg_sq"])


def test_optimizer_step_returns_the_norm_before_clipping_and_measures_without_clipping():
    clipped, _, opt_clipped, _, _ = _small_run(poison_step=None, steps=1, max_grad_norm=1e-3)
    free, _, opt_free, _, _ = _small_run(poison_step=None, steps=1, max_grad_norm=0)
    assert clipped[0]["norm"] == pytest.approx(free[0]["norm"]) and clipped[0]["norm"] > 1e-2

    def first_moment_norm(optimizer):  # AdamW's exp_avg after one step is 0.1 x the (clipped) gradient
        return float(torch.cat([s["exp_avg"].flatten() for s in optimizer.optimizer.state.values()]).norm())

    assert first_moment_norm(opt_clipped) == pytest.approx(0.1 * 1e-3, rel=1e-3)
    assert first_moment_norm(opt_free) == pytest.approx(0.1 * free[0]["norm"], rel=1e-4)


def test_max_bad_steps_in_a_row_stop_the_loop():
    with pytest.raises(NonFiniteError, match="train.max_bad_steps=2"):
        accelerator = Accelerator(cpu=True)
        model = torch.nn.Linear(2, 1)
        optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        guard = NonFiniteGuard(2)
        for step in (1, 2):
            loss = model(torch.ones(1, 2)).sum() * float("inf")
            backward(accelerator, model, loss)
            optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=1.0, loss=loss.detach(),
                           guard=guard, step=step, sample_ids=[])


def test_nan_hook_poisons_the_kth_backward_of_the_named_rank(monkeypatch):
    import vltrain.faults as faults

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    monkeypatch.setattr(faults, "_STATE", faults._BackwardState())
    monkeypatch.setenv(NAN_HOOK_ENV, "2,3@1")
    monkeypatch.setenv("RANK", "0")
    finite = []
    for _ in range(3):
        model.zero_grad()
        backward(accelerator, model, model(torch.ones(1, 2)).sum())
        finite.append(bool(torch.isfinite(model.weight.grad).all()))
    assert finite == [True, False, True]  # call 2 on every rank; call 3 only on rank 1


# ---------------------------------------------------------------- 2 ranks: DDP and DeepSpeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(backend: str, out: Path, **options) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            str(RUNNER), "train", backend, str(out), *(f"{k}={v}" for k, v in options.items())]


def _two_ranks(backend: str, out: Path, nan: str, timeout: int = 240, **options) -> list[dict]:
    cmd = _torchrun(backend, out, **options)
    env = {**os.environ, NAN_HOOK_ENV: nan}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{backend} run hung (> {timeout} s): {(e.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    return ranks


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Backward call 3 on rank 1 (step 2's first micro-batch there) is NaN, rank 1's step-3 loss is NaN with
    finite gradients, and rank 1 signals itself in step 4."""
    return _two_ranks("ddp", tmp_path_factory.mktemp("ddp"), nan="3@1", steps=6, signal_step=4, loss_nan_step=3)


def test_ddp_nan_on_one_rank_skips_on_both_and_a_signal_to_one_rank_stops_both(ddp_run):
    r0, r1 = ddp_run
    for rank in (r0, r1):
        assert rank["distributed_type"] == "DistributedType.MULTI_CPU"
        assert [s["stepped"] for s in rank["steps"]] == [True, False, False, True]
        for bad in rank["steps"][1:3]:
            assert bad["changed"] == [] and bad["scheduler_advanced"] == 0
        assert rank["steps"][2]["grad_norm"] == pytest.approx(rank["steps"][2]["grad_norm"])  # finite: the loss decided
        assert all(s["changed"] and s["scheduler_advanced"] == 1 for s in rank["steps"] if s["stepped"])
        assert rank["num_bad_steps"] == 2
        # both stop after step 4 (rank 0 never got a signal) and know which signal it was
        assert rank["stopped_after"] == 4 and rank["signal_name"] == "SIGTERM"
    assert r0["steps"] == r1["steps"]


@pytest.mark.slow
# Both stages and both dtypes with two runs (the CPU budget); "zero3" and "zero2_bf16" pass too (faults_run.py).
@pytest.mark.parametrize("backend", ["zero2", "zero3_bf16"])
def test_deepspeed_nan_on_one_rank_leaves_weights_and_optimizer_state_unchanged(tmp_path, backend, ddp_run):
    pytest.importorskip("deepspeed")
    # step 2: NaN gradients (DeepSpeed's own skip); step 3: a NaN loss with finite gradients on rank 1
    ranks = _two_ranks(backend, tmp_path, nan="3@1", steps=6, loss_nan_step=3)
    for rank in ranks:
        assert rank["distributed_type"] == "DistributedType.DEEPSPEED" and "stopped_after" not in rank
        assert [s["stepped"] for s in rank["steps"]] == [True, False, False, True, True, True]
        for bad in rank["steps"][1:3]:
            assert bad["changed"] == [] and bad["scheduler_advanced"] == 0 and bad["grad_norm"] == float("inf")
        good = rank["steps"][3]["changed"]
        # weights (this rank's shard), DeepSpeed's fp32 master partition, Adam's moments and step all move
        assert any(k.startswith("param.") for k in good) and "fp32.0" in good
        assert {k.split(".", 1)[1] for k in good if k.startswith("state")} == {"exp_avg", "exp_avg_sq", "step"}
        assert all(s["scheduler_advanced"] == 1 for s in rank["steps"] if s["stepped"])
    assert ranks[0]["steps"] == ranks[1]["steps"]
    # same gradients, clipping and schedule as DDP (fp32) on the applied steps
    ddp = [s["grad_norm"] for s in ddp_run[0]["steps"]]
    norms = [s["grad_norm"] for s in ranks[0]["steps"]][: len(ddp)]
    assert [norms[0], norms[3]] == pytest.approx([ddp[0], ddp[3]], rel=2e-2 if "bf16" in backend else 1e-5)


def test_sigterm_to_torchrun_reaches_every_rank_which_checkpoint_step_and_exit_while_the_agent_exits_1(tmp_path):
    """What torchrun's elastic agent (also `accelerate launch --multi_gpu`) does with a SIGTERM sent to its
    process group: the ranks live in their own sessions, so only the agent gets it; it forwards SIGTERM to
    each rank's group, waits for them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) and exits 1."""
    out = tmp_path / "ranks"
    cmd = [sys.executable, str(RUNNER), "reap", str(tmp_path / "reap.json"), "--",
           *_torchrun("ddp", out, steps=60, sleep=0.25)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, NAN_HOOK_ENV: ""})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 2 done" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    else:
        pytest.fail("no step finished:\n" + "".join(lines)[-3000:])
    output = "".join(lines) + _finish(proc, 120)
    agent = next(p for p in json.loads((tmp_path / "reap.json").read_text()) if "torch.distributed.run" in p["cmdline"])
    assert agent["status"] == 1 and "death signal, shutting down workers" in output, output[-3000:]
    assert output.count("closing signal SIGTERM") == 2  # one forwarded SIGTERM per rank (to its process group)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))  # written after end_training
    assert r0["stopped_after"] == r1["stopped_after"] < 60 and r0["signal_name"] == r1["signal_name"] == "SIGTERM"
    assert "SIGKILL" not in output


# ---------------------------------------------------------------- the real recipe under accelerate launch


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults_recipe")
    write_image(root / "a.png", (64, 64), seed=1)
    write_image(root / "b.png", (96, 64), seed=2)
    write_video(root / "clip.mp4")
    records = [dict(r, id=f"{r['id']}{i}") for i in range(2) for r in mixed_records()]
    (root / "train.json").write_text(json.dumps(records))
    return root / "train.json"


def _overrides(data: Path, out: Path, **extra) -> dict:
    """The recipe's settings for these tests, as conftest.sft_config would set them, with one loader worker."""
    cfg = sft_config(out.parent, "qwen2_5_vl", data, **{"data.num_workers": 1, "train.output_dir": str(out), **extra})
    base = {"model.name_or_path": cfg.model.name_or_path, "model.dtype": "float32", "model.attn_implementation": "sdpa",
            "data.train_path": str(data), "data.image_folder": str(data.parent), "data.num_workers": 1,
            "data.max_seq_length": 1024, "data.nframes": 4, "data.image_max_pixels": 64 * 64 * 2,
            "data.video_max_pixels": 64 * 64, "optim.lr": 3e-3, "optim.warmup_steps": 0, "optim.scheduler": "constant",
            "train.output_dir": str(out), "train.report_to": "none", "train.micro_batch_size": 2, "train.log_every": 1}
    return {**base, **extra}


def _launch(overrides: dict, report: Path, env: dict | None = None) -> subprocess.Popen:
    """`accelerate launch recipes/sft.py ...` in a new session, under the reaper (tests/faults_run.py)."""
    cmd = [sys.executable, str(RUNNER), "reap", str(report), "--", sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "recipes" / "sft.py"), *(f"{k}={v}" for k, v in overrides.items())]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _statuses(report: Path) -> dict[str, int | None]:
    """Exit status of the launcher and of the recipe process it started (DataLoader workers left out). The
    recipe's is None when the launcher outlived it and reaped it itself (then the launcher's status is 1 if
    the recipe failed)."""
    procs = json.loads(report.read_text())
    launcher = next(p for p in procs if "accelerate.commands.launch" in p["cmdline"])
    script = next(p for p in procs if p["ppid"] == launcher["pid"])
    return {"launcher": launcher["status"], "recipe": script["status"]}


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"run hung (> {timeout} s): {proc.communicate()[0][-3000:]}")
    return out


def test_vltrain_cli_lets_a_preempted_single_process_run_finish_a_save_longer_than_5_s(recipe_data, tmp_path):
    """`vltrain sft` (one process): a SIGTERM to the command's pid alone reaches the recipe, which finishes its step
    and writes its checkpoint although the save takes 8 s (VLTRAIN_SAVE_SLEEP) -- accelerate 1.16's own launcher
    kills the recipe 5 s after a SIGTERM -- and the command exits 0."""
    out = tmp_path / "run"
    steps = 12
    cmd = [sys.executable, "-m", "vltrain.cli", "sft",
           *(f"{k}={v}" for k, v in _overrides(recipe_data, out, **{"train.max_steps": steps}).items())]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "VLTRAIN_SAVE_SLEEP": "8"})
    deadline, lines = time.monotonic() + 150, []
    for line in proc.stdout:
        lines.append(line)
        if f"step {3:>2}/{steps}" in line:
            os.kill(proc.pid, signal.SIGTERM)  # the command only, not its process group
            break
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
    else:
        pytest.fail("the run ended before step 3 was logged:\n" + "".join(lines)[-3000:])
    start = time.monotonic()
    output = "".join(lines) + _finish(proc, 120)
    assert proc.returncode == 0, output[-3000:]
    assert time.monotonic() - start > 8  # the save's sleep was waited for
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["preempted"] == "SIGTERM" and 3 <= stopped < steps
    assert (out / "checkpoints" / f"step_{stopped:06d}" / "COMPLETE").is_file()
    assert f"SIGTERM received: stopped after step {stopped}, checkpoint written" in output


def test_recipe_sigterm_to_the_process_group_checkpoints_exits_0_and_resumes_like_a_straight_run(recipe_data, tmp_path):
    from recipes.sft import main
    from vltrain.config import SFTConfig, load_config

    steps = 12
    out = tmp_path / "preempted"
    proc = _launch(_overrides(recipe_data, out, **{"train.max_steps": steps}), tmp_path / "reap.json")
    deadline, lines = time.monotonic() + 150, []
    for line in proc.stdout:  # SIGTERM to every process of the job once 3 steps have been logged
        lines.append(line)
        if f"step {3:>2}/{steps}" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
        assert time.monotonic() < deadline, "".join(lines)[-3000:]
    else:
        pytest.fail("the run ended before step 3 was logged:\n" + "".join(lines)[-3000:])
    # while it finishes its step and saves: the straight run, in this process
    straight = main(load_config(SFTConfig, None, [f"{k}={v}" for k, v in _overrides(
        recipe_data, tmp_path / "straight", **{"train.max_steps": steps}).items()]))
    assert len(straight["losses"]) == steps
    output = "".join(lines) + _finish(proc, 90)

    statuses = _statuses(tmp_path / "reap.json")
    # accelerate's single-process launcher (documented in vltrain/faults.py): before 1.16 it has no SIGTERM
    # handler and dies of the signal at once, the recipe finishing its step, checkpointing and exiting 0 as an
    # orphan; from 1.16 it terminates the recipe too, waits for it (5 s, then SIGKILL) and exits 143 -- the
    # recipe, reaped by the launcher, has no status of its own here: the checkpoint below shows it finished
    assert statuses in ({"launcher": -signal.SIGTERM, "recipe": 0}, {"launcher": 128 + signal.SIGTERM, "recipe": None}), \
        output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["preempted"] == "SIGTERM" and 3 <= stopped < steps and summary["export_dir"] is None
    # accelerate >= 1.16 tees the recipe's stderr (the progress bar) through the launcher while stdout (this
    # message) goes straight out, so in the merged output a bar fragment can precede the message on its line
    [message] = [line[line.index("SIGTERM received"):] for line in output.splitlines()
                 if "received: stopped after step" in line]
    assert message.startswith(f"SIGTERM received: stopped after step {stopped}, checkpoint written")
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == [f"step_{stopped:06d}"]
    assert (out / "checkpoints" / checkpoints[0] / "COMPLETE").is_file()
    assert "Traceback" not in output and not (out / "final").exists()

    resumed = main(load_config(SFTConfig, None, [f"{k}={v}" for k, v in _overrides(
        recipe_data, out, **{"train.max_steps": steps, "train.resume": "auto"}).items()]))
    assert resumed["steps"] == steps and resumed["preempted"] is None
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5)
    assert resumed["losses"][:stopped] == summary["losses"]


def test_recipe_skips_an_injected_nan_step_and_still_finishes(recipe_data, tmp_path):
    out = tmp_path / "nan"
    # micro-batch 1 x accumulation 1: backward call 3 is step 3's only micro-batch
    proc = _launch(_overrides(recipe_data, out, **{"train.max_steps": 6, "train.micro_batch_size": 1}),
                   tmp_path / "reap.json", env={NAN_HOOK_ENV: "3"})
    output = _finish(proc, 150)
    assert _statuses(tmp_path / "reap.json") == {"launcher": 0, "recipe": None}, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["num_bad_steps"] == 1 and summary["export_dir"]
    assert (out / "final" / "model.safetensors").is_file()
    [warning] = [line for line in output.splitlines() if "step 3 skipped" in line]
    third_sample = json.loads(recipe_data.read_text())  # shuffled: the id is one of the dataset's
    assert any(f"samples: {r['id']}" in warning for r in third_sample), warning
    step_lines = [line for line in output.splitlines() if "| loss" in line]
    assert [("skipped (non-finite)" in line) for line in step_lines] == [False, False, True, False, False, False]
