"""Interrupted runs, every loop (SFT, DPO, GRPO, classification): SIGKILL and SIGTERM at chosen or random
moments (during a step, a save, an evaluation, a GRPO rollout), then `train.resume=auto`; a disk that fills up
during a save; torn caches and logs; checkpoints that hold no pickle of ours.

A trial kills a tiny recipe run and resumes it; it passes when, against the straight (never interrupted) run
with the same seed: the per-step losses are equal, the steps trained the same samples in the same order (no
sample of the epoch twice, none skipped: the killed run's steps up to its checkpoint followed by the resumed
run's steps are the straight run's), the exported weights are equal, and metrics.jsonl (and GRPO's
completions.jsonl) hold every step once.

Runs are forked from one warm server (tests/interrupt_run.py): a fresh interpreter imports for ~25 s on this
box, a forked run starts in well under a second. The straight run of each loop is made once and shared.

CI runs a fixed subset (per loop one SIGKILL and one SIGTERM trial at chosen moments). The random-moment
trials run with VLTRAIN_FULL_TRIALS=N (N trials per loop and signal, moments and delays drawn at random;
VLTRAIN_TRIAL_SEED picks the draw) and print how many ran and how many resumed exactly.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vltrain.checkpoint import COMPLETE, checkpoint_dirs
from vltrain.plots import read_metrics

from conftest import REPO, mixed_records, write_image, write_video

HELPER = REPO / "tests" / "interrupt_run.py"
NUM_STEPS = 6
SAVE_EVERY = 2
EVAL_EVERY = 3
PAUSE = 0.4  # seconds every save / evaluation / rollout lasts at least in a killed run (interrupt_run.py)
MOMENTS = {"sft": ("step", "save", "eval"), "dpo": ("step", "save", "eval"), "cls": ("step", "save", "eval"),
           "grpo": ("step", "save", "rollout")}
RUN_TIMEOUT = 240

REWARD_FILE = '''
def even_reward(completions, completion_ids, **kwargs):
    """The fraction of completion tokens with an even id: dense, reachable from a random model."""
    return [sum(i % 2 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids]
'''


# ------------------------------------------------------------------------------- the server and the data
class Server:
    """The fork server of tests/interrupt_run.py: `start(...)` -> pid, `wait(pid)` -> exit status."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(HELPER), "serve"], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert json.loads(self._reply(300)) == {"ready": True}

    def _reply(self, timeout: float) -> str:
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.proc.kill()
                pytest.fail(f"interrupt_run.py server gave no answer within {timeout} s")
        return self.proc.stdout.readline()

    def _ask(self, request: dict, timeout: float = 30) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._reply(timeout))

    def start(self, loop: str, overrides: list[str], folder: Path, name: str, pause: float = 0.0, **extra) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        run = {"log": str(folder / f"{name}.log"), "record": str(folder / f"{name}.jsonl")}
        for path in run.values():
            Path(path).unlink(missing_ok=True)
        run["pid"] = self._ask({"cmd": "run", "loop": loop, "overrides": overrides, "pause": pause, **run,
                                **extra})["pid"]
        return run

    def wait(self, run: dict, timeout: float = RUN_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while _alive(run["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(run["pid"]):
            os.kill(run["pid"], signal.SIGKILL)
            self._ask({"cmd": "wait", "pid": run["pid"]})
            pytest.fail(f"run hung (> {timeout} s):\n{_log(run)[-3000:]}")
        return self._ask({"cmd": "wait", "pid": run["pid"]})["status"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _alive(pid: int) -> bool:
    """True until the child has exited (a zombie waiting for the server's waitpid counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _log(run: dict) -> str:
    path = Path(run["log"])
    return path.read_text(errors="replace") if path.is_file() else ""


def _records(run: dict) -> list[dict]:
    """The run's per-step records (a line cut by a SIGKILL mid-write is dropped)."""
    path = Path(run["record"])
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


@pytest.fixture(scope="module")
def server():
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four samples per loop (text, one image, two images, a video) in one folder, and a reward file."""
    from test_cls import cls_records
    from test_dpo import pair_records
    from test_grpo import prompt_records

    folder = tmp_path_factory.mktemp("interrupt_data")
    write_image(folder / "a.png", (64, 64), seed=1)
    write_image(folder / "b.png", (96, 64), seed=2)
    write_video(folder / "clip.mp4")
    for name, records in (("sft", mixed_records()), ("dpo", pair_records()), ("cls", cls_records()),
                          ("grpo", prompt_records())):
        (folder / f"{name}.json").write_text(json.dumps(records))
    (folder / "rewards.py").write_text(REWARD_FILE)
    return folder


def overrides(loop: str, data: Path, out: Path, **extra) -> list[str]:
    """The tiny run of `loop`: 6 steps of one sample, a checkpoint every 2 steps, evaluation every 3 (SFT, DPO,
    classification), resume=auto."""
    values = {
        "model.name_or_path": "tiny:qwen2_5_vl", "model.dtype": "float32", "model.attn_implementation": "sdpa",
        "data.train_path": str(data / f"{loop}.json"), "data.image_folder": str(data), "data.num_workers": 0,
        "data.nframes": 4, "data.image_max_pixels": 64 * 64 * 2, "data.video_max_pixels": 64 * 64,
        "optim.lr": 3e-3, "optim.warmup_steps": 0, "optim.scheduler": "constant", "train.report_to": "none",
        "train.output_dir": str(out), "train.max_steps": NUM_STEPS, "train.micro_batch_size": 1,
        "train.log_every": 1, "train.save_every": SAVE_EVERY, "train.resume": "auto",
    }
    if loop == "grpo":
        values.update({"data.packing": "true", "grpo.num_generations": 4, "grpo.max_completion_length": 6,
                       "grpo.rewards": f"[{data / 'rewards.py'}]"})
    else:
        values.update({"data.eval_path": str(data / f"{loop}.json"), "train.eval_every": EVAL_EVERY})
    if loop == "cls":
        values["cls.classes"] = "[cat,dog,bird]"
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file of the export (`out/final`), keyed by file and name."""
    files = sorted((out / "final").rglob("*.safetensors"))
    assert files, f"nothing exported in {out / 'final'}"
    return {f"{f.relative_to(out)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


_STRAIGHT: dict[str, dict] = {}


@pytest.fixture(scope="module")
def straight(server, data, tmp_path_factory):
    """straight(loop) -> the uninterrupted run's {"records", "summary", "weights", "out", "log"}, made once.
    It runs with resume=auto in an empty folder: it must say it starts fresh."""
    def get(loop: str) -> dict:
        if loop not in _STRAIGHT:
            out = tmp_path_factory.mktemp(f"straight_{loop}")
            run = server.start(loop, overrides(loop, data, out), out, "straight")
            assert server.wait(run) == 0, _log(run)[-3000:]
            log = _log(run)
            assert f"train.resume=auto: no complete checkpoint in {out / 'checkpoints'}; starting at step 0" in log
            records = _records(run)
            assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
            _STRAIGHT[loop] = {"records": records, "summary": json.loads((out / "summary.json").read_text()),
                               "weights": _weights(out), "out": out, "log": log, "data": data}
        return _STRAIGHT[loop]
    yield get
    _STRAIGHT.clear()


# ------------------------------------------------------------------------------- one trial
def _wait_for_marker(run: dict, marker: str, occurrence: int, timeout: float = RUN_TIMEOUT) -> bool:
    """Wait until the run's log holds `occurrence` lines equal to `marker`; False if the run ended first."""
    deadline, line = time.monotonic() + timeout, marker + "\n"  # a progress bar may share its line (no "\n")
    while time.monotonic() < deadline:
        if _log(run).count(line) >= occurrence:
            return True
        if not _alive(run["pid"]):
            return _log(run).count(line) >= occurrence
        time.sleep(0.01)
    pytest.fail(f"no {marker!r} within {timeout} s:\n{_log(run)[-3000:]}")


def interrupt_and_resume(server, straight, data, folder: Path, loop: str, sig: int, moment: str, occurrence: int,
                         delay: float) -> dict:
    """Send `sig` to a run of `loop` `delay` s after the `occurrence`-th marker of `moment` ("step" / "save": the
    step number), resume it with resume=auto, and check it against the straight run (module docstring).
    Returns what happened (for the trial report)."""
    base = straight(loop)
    out = folder / "out"
    marker = f"@@ {moment} {occurrence}" if moment in ("step", "save") else f"@@ {moment}"
    count = 1 if moment in ("step", "save") else occurrence
    env = {"VLTRAIN_SAVE_SLEEP": str(PAUSE)} if moment == "save" else {}
    killed = server.start(loop, overrides(loop, data, out), folder, "killed", pause=PAUSE, env=env)
    assert _wait_for_marker(killed, marker, count), f"the run ended before {marker!r}:\n{_log(killed)[-3000:]}"
    time.sleep(delay)
    os.kill(killed["pid"], sig)
    status = server.wait(killed)
    log = _log(killed)
    done = checkpoint_dirs(out)
    resumed_from = int(done[-1].name.split("_")[1]) if done else 0
    what = {"loop": loop, "signal": signal.Signals(sig).name, "moment": f"{moment} #{occurrence}",
            "delay": round(delay, 3), "status": status, "checkpoint": resumed_from}
    if sig == signal.SIGKILL:
        assert status == -signal.SIGKILL, log[-3000:]
    else:  # the loop finishes its step, checkpoints and returns: exit 0, no traceback, the one line
        assert status == 0 and "Traceback" not in log, log[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["preempted"] == "SIGTERM" and summary["steps"] == resumed_from, summary
        assert f"SIGTERM received: stopped after step {resumed_from}, checkpoint written" in log
    killed_records = _records(killed)
    assert [r["step"] for r in killed_records][:resumed_from] == list(range(1, resumed_from + 1))

    resumed = server.start(loop, overrides(loop, data, out), folder, "resumed")
    assert server.wait(resumed) == 0, _log(resumed)[-3000:]
    resumed_log = _log(resumed)
    if resumed_from:
        assert f"resumed from {out / 'checkpoints' / f'step_{resumed_from:06d}'} at step {resumed_from}" in resumed_log
    else:
        assert "no complete checkpoint" in resumed_log and "starting at step 0" in resumed_log

    # the samples of every step, in order: the killed run's up to its checkpoint, then the resumed run's
    trained = [r for r in killed_records if r["step"] <= resumed_from] + _records(resumed)
    assert [(r["step"], r["ids"]) for r in trained] == [(r["step"], r["ids"]) for r in base["records"]]
    assert [r["loss"] for r in trained] == pytest.approx([r["loss"] for r in base["records"]], rel=1e-5, abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == NUM_STEPS and summary["preempted"] is None
    assert summary["losses"] == pytest.approx(base["summary"]["losses"], rel=1e-5, abs=1e-6)
    weights = _weights(out)
    assert weights.keys() == base["weights"].keys()
    for key, value in weights.items():
        assert torch.allclose(value, base["weights"][key], rtol=1e-5, atol=1e-6), key
    # one history: every step's loss line once, in order (a resumed run keeps the lines up to its checkpoint)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == list(range(1, NUM_STEPS + 1))
    if loop == "grpo":  # every line whole, each logged step once
        lines = (out / "completions.jsonl").read_text().splitlines()
        logged = [(json.loads(line)["step"], json.loads(line)["id"]) for line in lines]
        assert sorted(set(logged)) == sorted(logged) and {s for s, _ in logged} == set(range(1, NUM_STEPS + 1))
    assert not list((out / "checkpoints").glob("*.tmp")), "a torn checkpoint folder was left behind"
    shutil.rmtree(out / "final")
    return what


# ------------------------------------------------------------------------------- CI subset: chosen moments
# (loop, signal, moment, occurrence, delay): each loop once killed and once terminated, the moments spread over
# steps, saves (mid-save: between writing and the rename), evaluations and rollouts.
CHOSEN = [
    ("sft", signal.SIGKILL, "save", 4, PAUSE + 0.1),  # inside the save of step 4 (its VLTRAIN_SAVE_SLEEP)
    ("sft", signal.SIGTERM, "eval", 1, 0.1),  # during the evaluation of step 3
    ("dpo", signal.SIGKILL, "step", 3, 0.0),  # right after step 3: before its end_of_step, or in step 4
    ("dpo", signal.SIGTERM, "save", 2, 0.1),  # during a save: the flag waits for the end of the next step
    ("grpo", signal.SIGKILL, "rollout", 4, 0.1),  # in the rollout of step 4
    ("grpo", signal.SIGTERM, "rollout", 2, 0.1),
    ("cls", signal.SIGKILL, "eval", 1, 0.1),  # in the step-0 baseline evaluation: no checkpoint yet, starts fresh
    ("cls", signal.SIGTERM, "step", 5, 0.0),
]


IN_CI = {0, 3, 4, 7}  # one trial per loop, both signals twice; the other four run with VLTRAIN_FULL_TRIALS


def _full_trials() -> int:
    return int(os.environ.get("VLTRAIN_FULL_TRIALS", "0") or 0)


@pytest.mark.parametrize("loop,sig,moment,occurrence,delay", [
    c if i in IN_CI else pytest.param(*c, marks=pytest.mark.skipif(not _full_trials(), reason="VLTRAIN_FULL_TRIALS"))
    for i, c in enumerate(CHOSEN)], ids=[f"{c[0]}-{signal.Signals(c[1]).name}-{c[2]}{c[3]}" for c in CHOSEN])
def test_interrupted_run_resumes_exactly(server, straight, data, tmp_path, loop, sig, moment, occurrence, delay):
    what = interrupt_and_resume(server, straight, data, tmp_path, loop, sig, moment, occurrence, delay)
    print(f"\ntrial: {json.dumps(what)}")


# ------------------------------------------------------------------------------- resume: auto, a full disk, caches
@pytest.mark.parametrize("loop", ["sft", "dpo", "grpo", "cls"])
def test_resume_auto_of_a_finished_run_trains_nothing_more_and_reports_the_same(server, straight, tmp_path, loop):
    """(A run with no checkpoint starting fresh and saying so is checked on every straight run.)"""
    base = straight(loop)
    out = tmp_path / "out"
    shutil.copytree(base["out"], out, ignore=shutil.ignore_patterns("final"))
    argv = [a.replace(str(base["out"]), str(out)) for a in overrides(loop, base["data"], base["out"])]
    run = server.start(loop, argv, tmp_path, "again")
    assert server.wait(run) == 0, _log(run)[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_000006'} at step 6" in _log(run)
    assert _records(run) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == NUM_STEPS and summary["losses"] == base["summary"]["losses"]
    for key, value in _weights(out).items():
        assert torch.equal(value, base["weights"][key]), key
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == list(range(1, NUM_STEPS + 1))


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_stops_with_one_line(server, straight, data,
                                                                                         tmp_path):
    """The save of step 4 runs out of space half-way through accelerate's optimizer.bin: the run stops (exit 1)
    with one line naming the folder, the torn folder is gone, step 2's checkpoint is intact; resuming from it
    gives the straight run, and loading it unpickled nothing (every torch.load had weights_only=True)."""
    base = straight("sft")
    out = tmp_path / "out"
    run = server.start("sft", overrides("sft", data, out), tmp_path, "full", enospc_at_save=2)
    assert server.wait(run) == 1
    log = _log(run)
    assert "Traceback" not in log, log[-3000:]
    [last] = [line for line in log.splitlines() if line.startswith("error:")]
    assert last.startswith("error: [Errno 28] disk full while writing checkpoint "
                           f"{out / 'checkpoints' / 'step_000004.tmp'}") and "train.resume=auto" in last, last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]
    assert (out / "checkpoints" / "step_000002" / COMPLETE).is_file()

    loads = tmp_path / "loads.jsonl"
    resumed = server.start("sft", overrides("sft", data, out), tmp_path, "resumed", loads=str(loads))
    assert server.wait(resumed) == 0, _log(resumed)[-3000:]
    assert "resumed from" in _log(resumed) and "at step 2" in _log(resumed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["losses"] == pytest.approx(base["summary"]["losses"], rel=1e-5, abs=1e-6)
    calls = [json.loads(line) for line in loads.read_text().splitlines()]
    assert {Path(c["file"]).name for c in calls} >= {"optimizer.bin", "random_states_0.pkl"}
    assert all(c["weights_only"] is True for c in calls), calls


def test_a_checkpoint_holds_no_pickle_of_ours_and_accelerates_files_load_weights_only(straight):
    """Ours: safetensors, JSON and the marker. accelerate's optimizer.bin and random_states_*.pkl are torch.save
    files (zip + pickle) that accelerate loads with weights_only=True: they load so here too."""
    checkpoint = checkpoint_dirs(straight("sft")["out"])[-1]
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == sorted([COMPLETE, "model.safetensors", "optimizer.bin", "random_states_0.pkl", "scheduler.json",
                            "trainer_state.json"]), names
    for name in ("scheduler.json", "trainer_state.json"):
        json.loads((checkpoint / name).read_text())
    scheduler = json.loads((checkpoint / "scheduler.json").read_text())
    assert scheduler["last_epoch"] == NUM_STEPS and set(scheduler["lr_lambdas"]) == {None}  # closures: nothing
    import numpy as np
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    assert torch.load(checkpoint / "optimizer.bin", weights_only=True)["state"]
    with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):  # numpy's RNG state: what accelerate allows
        states = torch.load(checkpoint / "random_states_0.pkl", weights_only=True)
    assert isinstance(states["numpy_random_seed"][1], np.ndarray) and "torch_manual_seed" in states


def test_a_torn_dpo_reference_cache_is_rebuilt(server, straight, data, tmp_path):
    cache = tmp_path / "ref"
    extra = {"dpo.precompute_ref_log_probs": "true", "dpo.ref_cache_dir": str(cache), "train.max_steps": 2}
    first = server.start("dpo", overrides("dpo", data, tmp_path / "a", **extra), tmp_path, "first")
    assert server.wait(first) == 0, _log(first)[-3000:]
    [train_cache] = cache.glob("train-*.json")
    whole = train_cache.read_bytes()
    train_cache.write_bytes(whole[: len(whole) // 2])  # cut off mid-write (a copy, an older writer)
    second = server.start("dpo", overrides("dpo", data, tmp_path / "b", **extra), tmp_path, "second")
    assert server.wait(second) == 0, _log(second)[-3000:]
    log = _log(second)
    assert f"reference log-probs: {train_cache} is incomplete or corrupt (JSONDecodeError" in log
    assert f"computed, cached in {train_cache}" in log and "reused from" in log  # the eval table was whole
    assert json.loads(train_cache.read_bytes()) == json.loads(whole)
    assert [r["loss"] for r in _records(second)] == [r["loss"] for r in _records(first)]


# ------------------------------------------------------------------------------- full trials: random moments

def _draw(rng: random.Random, loop: str, sig: int) -> tuple[str, int, float]:
    """A random moment of `loop`: (moment, occurrence, delay). SIGTERM only inside the loop (after it the
    handlers are gone and a signal kills as it always does), SIGKILL anywhere up to the last step."""
    moment = rng.choice(MOMENTS[loop])
    if moment == "step":
        return moment, rng.randint(1, NUM_STEPS - 1), rng.uniform(0.0, 0.3)
    if moment == "save":
        saves = list(range(SAVE_EVERY, NUM_STEPS + (sig == signal.SIGKILL), SAVE_EVERY))
        return moment, rng.choice(saves), rng.uniform(0.0, 2 * PAUSE)  # the marker's pause, then the save sleep
    if moment == "rollout":
        return moment, rng.randint(1, NUM_STEPS if sig == signal.SIGKILL else NUM_STEPS - 1), rng.uniform(0.0, PAUSE)
    # evaluations: DPO and cls at step 0 (the baseline, before the loop), 3 and after the loop; SFT at 3 and after
    # the loop. SIGTERM only in the loop's one (step 3).
    if sig == signal.SIGTERM:
        return moment, {"cls": 2, "sft": 1, "dpo": 2}[loop], rng.uniform(0.0, PAUSE)
    return moment, rng.randint(1, {"cls": 3, "sft": 2, "dpo": 3}[loop]), rng.uniform(0.0, PAUSE)


@pytest.mark.slow
@pytest.mark.skipif(not _full_trials(), reason="set VLTRAIN_FULL_TRIALS=N for N random-moment trials per loop and signal")
@pytest.mark.parametrize("loop", ["sft", "dpo", "grpo", "cls"])
def test_random_moment_trials(server, straight, data, tmp_path, loop):
    seed = int(os.environ.get("VLTRAIN_TRIAL_SEED", str(int(time.time()))))
    rng = random.Random(f"{seed}-{loop}")
    results, failures = [], []
    for n in range(_full_trials()):
        for sig in (signal.SIGKILL, signal.SIGTERM):
            moment, occurrence, delay = _draw(rng, loop, sig)
            try:
                results.append(interrupt_and_resume(server, straight, data, tmp_path / f"t{n}_{sig}", loop, sig,
                                                    moment, occurrence, delay))
            except AssertionError as e:
                failures.append({"loop": loop, "signal": signal.Signals(sig).name, "moment": f"{moment} #{occurrence}",
                                 "delay": round(delay, 3), "error": (str(e).strip().splitlines() or [""])[-1][:300]})
            shutil.rmtree(tmp_path / f"t{n}_{sig}", ignore_errors=True)
    ran = len(results) + len(failures)
    report = {"loop": loop, "seed": seed, "trials": ran, "resumed_exactly": len(results),
              "by_signal": {name: sum(r["signal"] == name for r in results) for name in ("SIGKILL", "SIGTERM")},
              "failures": failures}
    print(f"\ntrials: {json.dumps(report)}")
    assert not failures, report


# ------------------------------------------------------------------------------- torn logs
def test_a_resumed_grpo_run_drops_a_torn_completions_line_and_the_steps_it_redoes(tmp_path):
    from loops.grpo import start_completions_log

    path = tmp_path / "completions.jsonl"
    lines = [json.dumps({"step": s, "id": f"p{s}", "completions": ["a"]}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "id": "p5", "compl')  # killed mid-write
    start_completions_log(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    start_completions_log(path, 0)  # a fresh run: an empty log, as metrics.jsonl
    assert path.read_text() == ""
    start_completions_log(tmp_path / "none.jsonl", 3)
    assert not (tmp_path / "none.jsonl").exists()
