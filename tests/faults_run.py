"""Helper for test_faults.py: a tiny torch model trained with vltrain.faults under 2 CPU ranks.

    torchrun --nproc_per_node 2 tests/faults_run.py MODE BACKEND OUT_DIR

MODE signal: rank 1 sends itself SIGTERM in the middle of step 3 (between its two micro-batches); every rank
    records the step after which `Preemption.requested` said stop, and the signal name it learnt.
MODE nan: VLTRAIN_TEST_NAN_BACKWARD (set by the test) poisons one micro-batch on one rank; every rank records,
    per step, the norm, whether it stepped, and whether the weights / optimizer state / scheduler changed.
BACKEND ddp | zero2 | zero3: the backend is picked through accelerate's environment variables, as
tests/dist_backends.py does (`accelerate launch --use_deepspeed` does not start on CPU). fp32 throughout.

Each rank writes OUT_DIR/rank{r}.json.
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GA, MICRO, STEPS = 2, 2, 5


def deepspeed_config(stage: int, out: Path) -> Path:
    config = {
        "bf16": {"enabled": False}, "fp16": {"enabled": False},
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


def run(mode: str, backend: str, out: Path) -> None:
    if backend != "ddp":
        os.environ.update({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
                           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(deepspeed_config(int(backend[-1]), out))})
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
        for step in range(1, STEPS + 1):
            step_loss = torch.zeros(())
            for micro in range(GA):
                if mode == "signal" and rank == 1 and step == 3 and micro == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                x = torch.randn(MICRO, 8, generator=generator)
                with accelerator.accumulate(model):
                    loss = (model(x) - x[:, :4]).pow(2).mean()
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
    record["num_bad_steps"] = guard.num_bad_steps
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    accelerator.end_training()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
