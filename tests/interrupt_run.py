"""Helper for test_interrupts.py: tiny recipe runs whose steps, saves, evaluations and rollouts are visible
from outside, so a test can kill one at a chosen moment and check what each step trained on.

    python tests/interrupt_run.py serve

A fork server: it imports the recipes once (tens of seconds on a loaded 2-core box) and then, per request,
forks a child that runs one recipe exactly as `python recipes/LOOP.py overrides...` would
(vltrain.run.run_recipe: the one-line errors included). The server itself never runs a torch op, so forking
it is safe. Requests and replies are JSON lines on stdin / stdout:
    {"cmd": "run", "loop": "sft", "overrides": [...], "log": PATH, "record": PATH, "pause": 0.0,
     "env": {...}, "enospc_at_save": 0, "loads": PATH | null}          -> {"pid": PID}
    {"cmd": "wait", "pid": PID}                                       -> {"status": exit status, -N: signal N}
The child writes everything it prints to `log`, and to `record` one line per optimizer step, appended (and
closed) as soon as the step is taken:
    {"step": N, "ids": [the sample ids of the step], "loss": the step's loss}
and one marker line to `log` as each moment begins (the test reads them to time its signal):
    @@ step N      optimizer step N was just taken (next: end_of_step's eval / save / signal check)
    @@ save N      a checkpoint of step N starts (with VLTRAIN_SAVE_SLEEP the save takes at least that long)
    @@ eval        an evaluation starts
    @@ rollout     a GRPO rollout starts
`pause` (seconds): every save, evaluation and rollout sleeps that long after its marker, inside the moment, so
a signal sent within `pause` of the marker lands in it. `enospc_at_save` K > 0: the K-th checkpoint save's
torch.save (accelerate's optimizer.bin) writes half its bytes and raises OSError(ENOSPC), as a full disk
does. `loads`: every torch.load call is appended there as {"file", "weights_only"}. Nothing else changes
what is computed.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOOPS = ("sft", "dpo", "grpo", "cls")


def _marker(text: str) -> None:
    print(f"@@ {text}", flush=True)


def instrument(loop: str, record: Path, pause: float = 0.0):
    """Wrap the loop's finish_step (records each step), the save, the evaluation and the rollout (markers +
    `pause`). Returns `undo()`."""
    import vltrain.training as training

    module = importlib.import_module(f"loops.{loop}")
    undo = []

    def patch(owner, name, wrapper):
        real = getattr(owner, name)
        setattr(owner, name, wrapper(real))
        undo.append(lambda: setattr(owner, name, real))

    def step_wrapper(real):
        def finish_step(accelerator, run, *args):
            out = real(accelerator, run, *args)
            with Path(record).open("a") as f:
                f.write(json.dumps({"step": run.state.step, "ids": [str(i) for i in args[-1]], "loss": out[0]}) + "\n")
            _marker(f"step {run.state.step}")
            return out
        return finish_step

    def moment(text):
        def wrapper(real):
            def wrapped(*args, **kwargs):
                label = text(*args) if callable(text) else text
                _marker(label)
                if pause:
                    time.sleep(pause)
                return real(*args, **kwargs)
            return wrapped
        return wrapper

    patch(module, "finish_step", step_wrapper)
    patch(training, "save_checkpoint", moment(lambda accelerator, output_dir, step, *rest: f"save {step}"))
    if hasattr(module, "evaluate"):
        patch(module, "evaluate", moment("eval"))
    if loop == "grpo":
        patch(module.Rollout, "__call__", moment("rollout"))

    def restore():
        for fn in reversed(undo):
            fn()
    return restore


def fill_disk_at_save(count: int) -> None:
    """The `count`-th checkpoint save fails as a full disk does: its first torch.save writes half its bytes
    and raises OSError(ENOSPC)."""
    import errno
    import io

    import torch

    import vltrain.training as training

    real_save, real_checkpoint = torch.save, training.save_checkpoint
    state = {"saves": 0, "armed": False}

    def checkpoint(*args, **kwargs):
        state["saves"] += 1
        state["armed"] = state["saves"] == count
        return real_checkpoint(*args, **kwargs)

    def save(obj, f, *args, **kwargs):
        if not state["armed"]:
            return real_save(obj, f, *args, **kwargs)
        state["armed"] = False
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    training.save_checkpoint, torch.save = checkpoint, save


def record_loads(path: Path) -> None:
    import torch

    real_load = torch.load

    def load(f, *args, **kwargs):
        with Path(path).open("a") as out:
            out.write(json.dumps({"file": str(f), "weights_only": kwargs.get("weights_only", "default")}) + "\n")
        return real_load(f, *args, **kwargs)

    torch.load = load


def _child(request: dict) -> int:
    """Runs in the forked child: one recipe run as its command line would; returns the exit status."""
    import os

    import torch

    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.environ.update(request.get("env") or {})
    torch.set_num_threads(1)
    instrument(request["loop"], Path(request["record"]), request.get("pause", 0.0))
    if request.get("enospc_at_save"):
        fill_disk_at_save(request["enospc_at_save"])
    if request.get("loads"):
        record_loads(Path(request["loads"]))
    recipe = importlib.import_module(f"recipes.{request['loop']}")
    from vltrain.run import run_recipe

    try:
        run_recipe(recipe.setup, recipe.main, list(request["overrides"]))
    except SystemExit as e:  # as the interpreter does: sys.exit("message") prints it and exits 1
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def serve() -> None:
    import os

    import torch

    # One intra-op thread before any torch op: no OpenMP pool exists when a child is forked (a forked child of a
    # process with a live pool can hang); tokenizers keep to one thread too (TOKENIZERS_PARALLELISM=false).
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    for loop in LOOPS:  # the slow part, once
        importlib.import_module(f"recipes.{loop}")
    import matplotlib.backends.backend_agg  # noqa: F401  (vltrain.plots draws plots.png at the end of a run)

    from vltrain.tiny import build_tiny

    build_tiny("qwen2_5_vl")  # the model classes' lazy imports and the tokenizer's BPE (cached) are inherited

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "run":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _child(request)
                finally:
                    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):  # fail() may use these
                        stream.flush()
                    os._exit(code)
            print(json.dumps({"pid": pid}), flush=True)
        elif request["cmd"] == "wait":
            _, status = os.waitpid(request["pid"], 0)
            print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    assert sys.argv[1:] == ["serve"], sys.argv
    serve()
