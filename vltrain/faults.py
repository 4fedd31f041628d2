"""Faults every training loop must survive: preemption signals and non-finite steps.

Interface as the lead specified it, unchanged; additions only: `NonFiniteGuard(max_bad_steps, num_bad_steps=0)`
(a resumed run passes its total so far), `NonFiniteGuard.max_bad_steps`, `NonFiniteError`, `NAN_HOOK_ENV`. `optimizer_step(step=...)` is the 1-based number of the step being taken (the logged one).

A loop uses four pieces, the same under single process, DDP, FSDP and DeepSpeed ZeRO-2/3:

    with Preemption() as preemption:                  # SIGTERM / SIGINT only set a flag
        for each optimizer step:
            for each micro-batch:
                with accelerator.accumulate(model):
                    loss = ...
                    backward(accelerator, model, loss * ga * world)
            grad_norm, stepped = optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm=...,
                                                loss=step_loss, guard=guard, step=step, sample_ids=ids)
            if preemption.requested(accelerator):     # collective, once per step
                save a checkpoint, print one line, return

DataLoaders take `worker_init_fn=worker_init_fn` so their workers ignore the signal (see below).

Why a flag and a collective check: a scheduler's SIGTERM reaches ranks at slightly different times; a rank
that stopped on its own would leave the others blocked in the next all-reduce. Every rank therefore asks
`requested()` at the same step boundary, the answer is the max over ranks, and all ranks stop after the
same step with a complete checkpoint. Repeated signals (the scheduler's own plus the launcher's forwarded
copy) change nothing; a third SIGINT (Ctrl-C hammered at a terminal) raises KeyboardInterrupt at once.

What the launchers do on SIGTERM (read from accelerate 1.15 / 1.16 and torch 2.14 sources, checked by
tests/test_faults.py):
- `accelerate launch` with one process (accelerate.commands.launch.simple_launcher), accelerate < 1.16, runs
  the script with `subprocess.Popen(...).wait()` and installs no handler: the launcher dies of the signal at
  once (exit status -15 / shell 143) and forwards nothing. The script, in the same process group, gets the
  scheduler's SIGTERM itself, finishes the step, checkpoints and exits 0 -- as an orphan. A SIGTERM sent
  to the launcher's pid alone never reaches the script. accelerate 1.16 installs a handler: it SIGTERMs the
  script and its descendants, waits 5 s, SIGKILLs what is left and exits 143 -- a step plus a checkpoint
  save must fit in those 5 s (else the previous checkpoint is the one to resume from). `vltrain sft` etc. with
  one process run under `vltrain.cli.patient_launcher` instead (a SIGTERM passed on, no time limit), and
  without a launcher (`python recipes/sft.py`, one process) nothing bounds it either.
- `accelerate launch --multi_gpu` / `torchrun` (torch.distributed.elastic): each rank is started in its
  own session (`start_new_session=True`), so a signal to the launcher's process group reaches the agent
  only. The agent's handler (TORCHELASTIC_SIGNALS_TO_HANDLE, default SIGTERM,SIGINT,SIGHUP,SIGQUIT)
  raises SignalException; the agent then sends the same signal to each rank's process group (the rank
  and its DataLoader workers), waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30) for them, sends
  SIGKILL to those still alive, and exits 1 with a traceback whatever the ranks returned. So: raise
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT above one step plus one checkpoint save, and expect the launcher's exit
  status 1 after a clean preemption (the ranks themselves exit 0; nothing in the script can change the
  agent's status).

Non-finite steps: `optimizer_step` measures the gradient norm (clipping when max_grad_norm > 0) and asks
`NonFiniteGuard.step_ok`, a collective, whether the loss and the norm are finite on every rank. A bad step
changes no weight and no optimizer state and does not advance the scheduler; `max_bad_steps` bad steps
in a row raise NonFiniteError. Under DeepSpeed the engine clips and steps itself, so `backward` drives
the engine by hand (accumulation boundary flag, `engine.backward`, no `engine.step`) and `optimizer_step`
calls `engine.step()`: ZeRO-1/2/3 then skip a step whose global gradient norm is not finite (fp32
always; bf16 unless `bf16.check_grad_overflow` is false, which we refuse), discarding the reduced
gradients themselves. A loss that is non-finite on some rank while every gradient is finite would slip
through that check, so at the accumulation boundary `backward` first agrees across ranks on whether any
micro-batch loss of the step was non-finite and, if so, back-propagates the last one multiplied by NaN:
the engine then sees a NaN norm and takes its own skip path. Verified on CPU (tests/test_faults.py) for
ZeRO-2 and ZeRO-3, fp32 and bf16: weights, DeepSpeed's fp32 master partitions and Adam's moments and step
count are bit-identical across a skipped step. DeepSpeed fp16 also skips by its loss scaler, and every such
skip counts as a bad step here (a long run of early scale-calibration overflows can hit max_bad_steps).
Without DeepSpeed under fp16 (GPU only; untested here) a skipped step still calls `scaler.update()` so the
loss scale shrinks. Cost per optimizer step: one scalar all-reduce in `step_ok`, one in `requested`, and
under DeepSpeed one more at the boundary backward.

Signals that arrive before the loop enters `Preemption` (model loading, data checks) kill the process as
usual; nothing is lost then but start-up time.

Test hook (off unless set; read at every backward): VLTRAIN_TEST_NAN_BACKWARD="K[@R],..." multiplies the
loss of the K-th `backward` call of this process (1-based, counting micro-batches) by NaN, on rank R only
when "@R" is given (RANK from the launcher). It exists so the end-to-end tests can inject a real NaN
(NaN gradients, not just a NaN number) into one step of the real recipe.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
NAN_HOOK_ENV = "VLTRAIN_TEST_NAN_BACKWARD"


def _max_over_ranks(accelerator, value: float) -> float:
    """The largest `value` over all ranks (a collective when there is more than one process)."""
    if accelerator.num_processes == 1 or not dist.is_available() or not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float32, device=accelerator.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


class Preemption:
    """Context manager: installs SIGTERM/SIGINT handlers that only set a flag (restores the old ones on exit).

    Outside the main thread (where Python cannot install handlers) it installs nothing and `requested`
    only reports signals already recorded, so research code can still call the loop from a thread."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._signum = 0
        self._num_sigint = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            self._num_sigint += 1
            if self._num_sigint >= 3:
                raise KeyboardInterrupt
        if not self._signum:
            self._signum = signum
            self.signal_name = signal.Signals(signum).name
            log.warning("received %s: stopping after this step with a checkpoint", self.signal_name)

    def requested(self, accelerator) -> bool:
        """True on every rank if any rank got a signal. Collective: every rank calls it once per optimizer
        step, at the step boundary. Sets `signal_name` on ranks that only learnt of it from another rank."""
        signum = int(_max_over_ranks(accelerator, float(self._signum)))
        if signum and not self._signum:
            self._signum, self.signal_name = signum, signal.Signals(signum).name
        return bool(signum)


def _main_process_exiting() -> None:
    _EXITING.set()


# Set by the main process when its interpreter exits (atexit runs last-registered first, so this runs before
# multiprocessing's own exit function, which SIGTERMs and then joins daemonic children such as loader
# workers). Forked workers inherit the event; with the spawn start method they get a fresh, never-set one.
_EXITING = multiprocessing.Event()
atexit.register(_main_process_exiting)


def _worker_signal(signum, frame) -> None:
    if _EXITING.is_set():  # the main process is exiting and terminates its workers: go
        os._exit(0)


def worker_init_fn(worker_id: int) -> None:
    """DataLoader(worker_init_fn=...): workers ignore SIGTERM/SIGINT from a scheduler or a launcher.

    torchrun's agent signals each rank's whole process group and a scheduler may signal every process;
    a worker killed mid-epoch makes the main process raise "DataLoader worker ... killed by signal" before
    it reaches the step boundary. Ignoring it is safe: the main process shuts its workers down, and a
    worker whose parent died exits on its own (DataLoader's watchdog). The one SIGTERM a worker obeys is
    the one its main process sends while exiting (multiprocessing terminates daemonic children at
    interpreter exit, e.g. when a loader's iterator is still alive in a script's globals): ignoring that one
    would leave the main process waiting for the worker forever."""
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, _worker_signal)


class NonFiniteError(RuntimeError):
    """Too many non-finite optimizer steps in a row."""


class NonFiniteGuard:
    """Decides (collectively) whether a step is finite and counts skipped steps."""

    def __init__(self, max_bad_steps: int, num_bad_steps: int = 0):
        """num_bad_steps: the total so far (a resumed run passes its checkpoint's count)."""
        if max_bad_steps < 1:
            raise ValueError(f"train.max_bad_steps must be >= 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.num_bad_steps = num_bad_steps
        self._bad_run: list[int] = []

    def step_ok(self, accelerator, loss: torch.Tensor, grad_norm) -> bool:
        """True when `loss` (this rank's) and `grad_norm` are finite on every rank. Collective."""
        local_ok = _finite(loss) and _finite(grad_norm)
        return _max_over_ranks(accelerator, 0.0 if local_ok else 1.0) == 0.0

    def record(self, step: int, ok: bool, sample_ids: list[str]) -> None:
        """Count a bad step (warning with its sample ids, this rank's); raise NonFiniteError after
        max_bad_steps bad steps in a row. A good step ends the run of bad ones."""
        if ok:
            self._bad_run.clear()
            return
        self.num_bad_steps += 1
        self._bad_run.append(step)
        rank = os.environ.get("RANK", "0")
        log.warning("step %d skipped: non-finite loss or gradient norm (rank %s samples: %s)",
                    step, rank, ", ".join(map(str, sample_ids)) or "-")
        if len(self._bad_run) >= self.max_bad_steps:
            steps = self._bad_run
            raise NonFiniteError(
                f"{len(steps)} non-finite steps in a row (steps {steps[0]}-{steps[-1]}) reached "
                f"train.max_bad_steps={self.max_bad_steps}: lower optim.lr, check the data of those steps, "
                f"or raise train.max_bad_steps")


def _as_float(value) -> float:
    """A norm or loss as a Python float (a DTensor norm under FSDP2 is gathered first)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value.detach().float().sum()) if isinstance(value, torch.Tensor) else float(value)


def _finite(value) -> bool:
    if value is None:
        return True  # not measured (DeepSpeed with compute_grad_norm off is refused): the loss decides alone
    return math.isfinite(_as_float(value))


def _deepspeed_engine(accelerator):
    """The DeepSpeed engine when accelerate runs under DeepSpeed, else None."""
    wrapper = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return None if wrapper is None else wrapper.engine


def _nan_hook_fires(count: int) -> bool:
    spec = os.environ.get(NAN_HOOK_ENV, "").strip()
    if not spec:
        return False
    rank = os.environ.get("RANK", "0")
    for item in spec.split(","):
        index, _, on_rank = item.strip().partition("@")
        if int(index) == count and (not on_rank or on_rank == rank):
            return True
    return False


class _BackwardState:
    """Per-process bookkeeping of `backward`: the call count (for the test hook) and, under DeepSpeed,
    whether a micro-batch loss of the current step was non-finite."""

    def __init__(self) -> None:
        self.num_calls = 0
        self.bad_loss_in_step = False
        self.checked_engines: set[int] = set()


_STATE = _BackwardState()


def backward(accelerator, model, loss: torch.Tensor) -> None:
    """`accelerator.backward(loss)`, except under DeepSpeed, where the engine is driven without its step
    (see the module docstring). loss: a scalar tensor."""
    _STATE.num_calls += 1
    if _nan_hook_fires(_STATE.num_calls):
        loss = loss * float("nan")
    engine = _deepspeed_engine(accelerator)
    if engine is None:
        accelerator.backward(loss)
        return
    _check_deepspeed_skips(engine)
    _STATE.bad_loss_in_step |= not _finite(loss)
    boundary = accelerator.sync_gradients
    if boundary:
        if _max_over_ranks(accelerator, 1.0 if _STATE.bad_loss_in_step else 0.0):
            loss = loss * float("nan")  # a NaN gradient norm makes the engine skip this step itself
        _STATE.bad_loss_in_step = False
    engine.set_gradient_accumulation_boundary(is_boundary=boundary)
    engine.backward(loss)


def _check_deepspeed_skips(engine) -> None:
    """Refuse the DeepSpeed settings under which the engine would apply a step with a NaN norm."""
    if id(engine) in _STATE.checked_engines:
        return
    if engine.bfloat16_enabled() and not engine._config.bfloat16_config.check_grad_overflow:
        raise ValueError("the DeepSpeed config sets bf16.check_grad_overflow=false: non-finite steps would be "
                         "applied; remove it (vltrain skips non-finite steps)")
    if not engine.zero_optimization():
        raise ValueError("DeepSpeed without ZeRO (zero_optimization.stage 0) does not skip non-finite steps: "
                         "use stage 1, 2 or 3, or DDP")
    if not engine.zero_compute_grad_norm():
        raise ValueError("the DeepSpeed config sets zero_optimization.compute_grad_norm=false: non-finite "
                         "steps would not be detected; remove it")
    _STATE.checked_engines.add(id(engine))


def optimizer_step(accelerator, model, optimizer, scheduler, *, max_grad_norm: float, loss: torch.Tensor,
                   guard: NonFiniteGuard, step: int, sample_ids: list[str]) -> tuple[float, bool]:
    """Clip (max_grad_norm 0: measure only), check finiteness on every rank, then step the optimizer and
    the scheduler only when finite; zero the gradients always. Returns (grad_norm, stepped).

    A skipped step changes no parameter and no optimizer state (Adam moments, step counts) and does not
    advance the scheduler. `step` and `sample_ids` (this rank's samples of the step) go to the warning."""
    engine = _deepspeed_engine(accelerator)
    if engine is not None:
        engine.step()  # clips with the config's gradient_clipping; skips by itself on a non-finite norm
        grad_norm = engine.get_global_grad_norm()
        ok = guard.step_ok(accelerator, loss, grad_norm)
        stepped = engine.was_step_applied()
        if stepped and not ok:
            raise NonFiniteError(f"DeepSpeed applied step {step} although its loss or gradient norm "
                                 f"({grad_norm}) is not finite: the weights are no longer trustworthy")
        if stepped and engine.lr_scheduler is None:  # a scheduler handed to the engine is stepped by it
            scheduler.step()
    else:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0
                                                else float("inf"))
        ok = guard.step_ok(accelerator, loss, grad_norm)
        if ok:
            optimizer.step()
        elif accelerator.scaler is not None:
            accelerator.scaler.update()  # fp16: shrink the loss scale, as its own skipped step would
        stepped = ok and not getattr(optimizer, "step_was_skipped", False)
        if stepped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    guard.record(step, ok, sample_ids)
    return (_as_float(grad_norm) if grad_norm is not None else float("nan")), stepped
