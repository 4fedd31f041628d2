"""Helpers for test_faults.py.

    torchrun --nproc_per_node 2 tests/faults_run.py train BACKEND OUT_DIR [steps=6] [signal_step=0]
                                                    [loss_nan_step=0] [sleep=0]
    python tests/faults_run.py reap REPORT.json -- COMMAND ...

train: a tiny torch model trained with vltrain.faults on 2 CPU ranks for `steps` steps of 2 micro-batches.
    signal_step: rank 1 sends itself SIGTERM in the middle of that step (between its two micro-batches).
    loss_nan_step: rank 1 adds NaN to its first micro-batch loss of that step -- a NaN loss whose gradients
    stay finite. VLTRAIN_TEST_NAN_BACKWARD (set by the test) poisons whole micro-batches (NaN gradients).
    sleep: seconds per step, so a test can signal the launcher mid-run; rank 0 prints "step N done".
    Every rank records, per step, the norm, whether it stepped, which weights / optimizer tensors changed
    and whether the scheduler advanced; and the step after which `Preemption.requested` said stop and the
    signal name it learnt. The file is written last, after the process group is torn down.
    BACKEND ddp | zero2 | zero3 | zero2_bf16 | zero3_bf16: picked through accelerate's environment variables, as tests/dist_backends.py
    does (`accelerate launch --use_deepspeed` does not start on CPU). fp32. Each rank writes OUT_DIR/rank{r}.json.
reap: runs COMMAND as a child subreaper (Linux prctl): processes orphaned when their parent dies (the
    script under `accelerate launch` once the launcher is killed) are re-parented to this process, so their
    exit status can be read. Writes REPORT.json: [{pid, ppid, cmdline, status}] for every descendant, status
    as subprocess reports it (negative: killed by that signal). It survives signals sent to its own
    process group (the test signals the whole group) and forwards nothing.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GA, MICRO = 2, 2


def deepspeed_config(stage: int, bf16: bool, out: Path) -> Path:
    config = {
        "bf16": {"enabled": bf16}, "fp16": {"enabled": False},
        "zero_optimization": {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                              "reduce_bucket_size": 4096, "stage3_param_persistence_threshold": 0},
        "gradient_accumulation_steps": GA, "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": MICRO, "train_batch_size": MICRO * GA * 2,
        "zero_allow_untested_optimizer": True, "steps_per_print": 1e9, "wall_clock_breakdown": False,
    }
    path = out / f"ds_zero{stage}.json"
    path.write_text(json.dumps(config))
    return path


def snapshot(accelerator, optimizer) -> dict[str, torch.Tensor]:
    """Every tensor an optimizer step may change on this rank: the weights the model computes with (this
    rank's ZeRO-3 shard), the optimizer's own parameters (DeepSpeed's fp32 partitions) and its state."""
    model = accelerator._models[0]
    tensors = {}
    for name, p in model.named_parameters():
        tensors[f"param.{name}"] = (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach().clone()
    chain = [optimizer]  # AcceleratedOptimizer -> DeepSpeed's ZeRO optimizer -> torch AdamW
    while hasattr(chain[-1], "optimizer"):
        chain.append(chain[-1].optimizer)
    for wrapper in chain:  # DeepSpeed's fp32 master partitions (ZeRO-2 / ZeRO-3 names)
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            for i, flat in enumerate(getattr(wrapper, attr, None) or []):
                tensors[f"fp32.{i}"] = flat.detach().clone()
    base = chain[-1]
    for g, group in enumerate(base.param_groups):
        for i, p in enumerate(group["params"]):
            tensors[f"opt{g}.{i}"] = p.detach().clone()
    # keyed by position: ZeRO-3 swaps its fp32 partitions in and out of param_groups around each step
    for i, state in enumerate(base.state.values()):
        for key, value in state.items():
            tensors[f"state{i}.{key}"] = torch.as_tensor(value).detach().clone()
    return tensors


def changed(before: dict, after: dict) -> list[str]:
    """Names of the tensors that differ, appeared or vanished (Adam creates its state on the first step)."""
    return sorted(k for k in before.keys() | after.keys()
                  if k not in before or k not in after or not torch.equal(before[k], after[k]))


def train(backend: str, out: Path, steps: int = 6, signal_step: int = 0, loss_nan_step: int = 0,
          sleep: float = 0.0) -> None:
    if backend != "ddp":  # zero2, zero3, zero2_bf16, ...
        stage, bf16 = int(backend[4]), backend.endswith("_bf16")
        os.environ.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
                           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(deepspeed_config(stage, bf16, out))})
    os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    from accelerate import Accelerator

    from vltrain.distributed import accelerator_device_kwargs
    from vltrain.faults import NonFiniteGuard, Preemption, backward, optimizer_step

    accelerator = Accelerator(gradient_accumulation_steps=GA, **accelerator_device_kwargs())
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    guard = NonFiniteGuard(max_bad_steps=3)
    record = {"rank": rank, "world": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
              "steps": []}
    generator = torch.Generator().manual_seed(100 + rank)
    with Preemption() as preemption:
        for step in range(1, steps + 1):
            time.sleep(sleep)
            step_loss = torch.zeros(())
            for micro in range(GA):
                if rank == 1 and step == signal_step and micro == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                x = torch.randn(MICRO, 8, generator=generator).to(next(model.parameters()).dtype)
                with accelerator.accumulate(model):
                    loss = (model(x) - x[:, :4]).pow(2).mean()
                    if rank == 1 and step == loss_nan_step and micro == 0:
                        loss = loss + float("nan")
                    backward(accelerator, model, loss * GA * accelerator.num_processes)
                    step_loss += loss.detach()
            before = snapshot(accelerator, optimizer)
            last_epoch = scheduler.last_epoch
            norm, stepped = optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=1.0,
                                           loss=step_loss, guard=guard, step=step, sample_ids=[f"s{step}r{rank}"])
            record["steps"].append({"step": step, "grad_norm": norm, "stepped": stepped,
                                    "changed": changed(before, snapshot(accelerator, optimizer)),
                                    "scheduler_advanced": scheduler.last_epoch - last_epoch})
            if preemption.requested(accelerator):
                record.update(stopped_after=step, signal_name=preemption.signal_name)
                break
            if rank == 0:
                print(f"step {step} done", flush=True)
    record["num_bad_steps"] = guard.num_bad_steps
    # drop the prepared model (DDP's reducer holds gloo work objects) while the interpreter is alive: left to
    # interpreter finalization, a rank sometimes died with "terminate called without an active exception"
    # (SIGABRT) after a finished run -- 2 to 4 of 14 torchrun runs on torch 2.14.1, 0 of 14 with this
    del model, optimizer, scheduler
    accelerator.free_memory()
    accelerator.end_training()
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


def _descendants(root: int, seen: dict) -> None:
    """Record pid -> (ppid, cmdline) of every live descendant of `root` (and of already-seen pids)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in seen:
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == root or ppid in seen:
            seen[int(entry.name)] = (ppid, cmdline)


def reap(report: Path, command: list[str]) -> None:
    import ctypes
    import subprocess

    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)  # a Python handler: reset to the default in the exec'd child
    seen: dict[int, tuple[int, str]] = {}
    child = subprocess.Popen(command)
    seen[child.pid] = (os.getpid(), " ".join(command))
    statuses = {}
    while True:
        _descendants(os.getpid(), seen)
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
            continue
        statuses[pid] = os.waitstatus_to_exitcode(status)
    child.returncode = statuses.get(child.pid)
    report.write_text(json.dumps([{"pid": pid, "ppid": ppid, "cmdline": cmdline, "status": statuses.get(pid)}
                                  for pid, (ppid, cmdline) in seen.items()], indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "reap":
        assert sys.argv[3] == "--", sys.argv
        reap(Path(sys.argv[2]), sys.argv[4:])
    else:
        torch.set_num_threads(1)
        options = {k: float(v) if k == "sleep" else int(v) for k, v in (a.split("=") for a in sys.argv[4:])}
        train(sys.argv[2], Path(sys.argv[3]), **options)
