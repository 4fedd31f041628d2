"""Every way a GRPO reward can go wrong (#16 item 1) x how the user hears of it: a one-line error naming the
file, the function and -- for what only a call can show -- the step.

- load time (`load_rewards`, before anything else in recipes/grpo.py): a file that does not exist, does not
  import, defines no reward or not the named one; a signature that cannot take the keywords of every call;
- before the model loads (`check_reward_fields`, right after the data is read): a field the reward needs that
  no record has;
- call time (`compute_rewards`, every rollout): raises, hangs past `grpo.reward_timeout` (sync, async, and an
  async one that blocks its event loop), or returns something that is not one finite number or None per
  completion (wrong count, a string, a dict, None, NaN, inf, a 2-D tensor, a generator);
- through the real recipe as a subprocess (4 runs, 2 of them training a tiny model): the last line on stderr
  is that error, with no traceback, and a hung reward does not keep the process alive.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from vltrain.config import GRPOConfig, load_config
from vltrain.rewards import RewardError, check_reward_fields, compute_rewards, load_rewards

from conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

FAULTS = """
import asyncio
import time

import torch

def raises_reward(completions, **kwargs):
    raise KeyError("no such column")
def hangs_reward(completions, **kwargs):
    time.sleep(20)  # a judge that never answers
    return [1.0] * len(completions)
async def async_hangs_reward(completions, **kwargs):
    await asyncio.sleep(20)
    return [1.0] * len(completions)
async def async_blocks_loop_reward(completions, **kwargs):
    time.sleep(4)  # no await: the event loop itself is stuck
    return [1.0] * len(completions)
async def async_raises_timeout_reward(completions, **kwargs):
    raise TimeoutError("the judge's own HTTP timeout")
def wrong_count_reward(completions, **kwargs):
    return [1.0] * (len(completions) + 1)
def string_reward(completions, **kwargs):
    return "1.0 0.0"
def dict_reward(completions, **kwargs):
    return {"score": [1.0] * len(completions)}
def returns_none_reward(completions, **kwargs):
    scores = [1.0] * len(completions)  # ... and forgets to return them
def nan_reward(completions, **kwargs):
    return [1.0, float("nan")]
def inf_reward(completions, **kwargs):
    return [float("-inf"), 1.0]
def tensor_2d_reward(completions, **kwargs):
    return torch.ones(len(completions), 1)
def generator_reward(completions, **kwargs):
    return (1.0 for _ in completions)
def text_value_reward(completions, **kwargs):
    return [1.0, "good"]
"""

# name -> what the one-line error says after "reward '<name>' (<file>)"
CALL_FAULTS = {
    "raises_reward": "raised at step 7: KeyError: 'no such column'",
    "hangs_reward": "did not return within 0.3 s at step 7 (grpo.reward_timeout",
    "async_hangs_reward": "did not return within 0.3 s at step 7 (grpo.reward_timeout",
    "async_blocks_loop_reward": "blocked its event loop (no await) and did not return within 0.3 s at step 7",
    "async_raises_timeout_reward": "raised at step 7: TimeoutError: the judge's own HTTP timeout",
    "wrong_count_reward": "at step 7: returned 3 values for 2 completions",
    "string_reward": "at step 7: returned a str, expected a list of 2 values",
    "dict_reward": "at step 7: returned a dict, expected a list of 2 values",
    "returns_none_reward": "at step 7: returned None, expected a list of 2 values",
    "nan_reward": "at step 7: value 1 is nan",
    "inf_reward": "at step 7: value 0 is -inf",
    "tensor_2d_reward": "at step 7: returned a 2-D Tensor, expected a list of 2 values",
    "generator_reward": "at step 7: returned a generator, expected a list of 2 values",
    "text_value_reward": "at step 7: value 1 is a str",
}


def write(folder, name: str, source: str):
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def batch(num: int = 2, **columns) -> dict:
    """compute_rewards' keywords for `num` completions at step 7."""
    return dict(prompts=[[{"role": "user", "content": "Say a colour."}]] * num,
                completions=[[{"role": "assistant", "content": "red"}]] * num, completion_ids=[[1, 2]] * num,
                columns={"assistant": ["red"] * num, **columns}, trainer_state={"epoch": 0.0}, step=7)


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------------------
# Call time: every fault x compute_rewards


@pytest.mark.parametrize("name", list(CALL_FAULTS))
def test_a_faulty_reward_call_is_one_line_naming_file_function_and_step(tmp_path, name):
    path = write(tmp_path, "faults.py", FAULTS)
    rewards = load_rewards([f"{path}:{name}"], timeout=0.3)
    start = time.monotonic()
    with pytest.raises(RewardError) as info:
        compute_rewards(rewards, **batch())
    elapsed = time.monotonic() - start
    message = one_line(info.value)
    assert message.startswith(f"grpo.rewards: reward '{name}' ({path}) "), message
    assert CALL_FAULTS[name] in message, message
    assert elapsed < 3.0, f"{name}: the call took {elapsed:.1f} s with a 0.3 s limit"  # hangs end at the limit (+1 s)


def test_a_hung_sync_reward_is_left_in_a_daemon_thread_and_the_next_call_still_works(tmp_path):
    path = write(tmp_path, "slow.py", """
        import threading, time
        release = threading.Event()
        def stuck_reward(completions, **kwargs):
            release.wait(30)
            return [0.0] * len(completions)
        def quick_reward(completions, **kwargs):
            return [threading.current_thread().name != "MainThread"] * len(completions)
    """)
    stuck, quick = load_rewards([f"{path}:stuck_reward", f"{path}:quick_reward"], timeout=0.2)
    with pytest.raises(RewardError, match="stuck_reward.*did not return within 0.2 s"):
        compute_rewards([stuck], **batch())
    hung = [t for t in threading.enumerate() if t.name == "vltrain-reward-stuck_reward"]
    assert hung and all(t.daemon for t in hung)  # a daemon: it cannot keep the process from exiting
    # a user's sync reward with a limit runs in a worker thread; the value it returns is used as it is
    assert compute_rewards([quick], **batch()) == {"quick_reward": [1.0, 1.0]}
    sys.modules[stuck.fn.__module__].release.set()
    for thread in hung:
        thread.join(5)
    assert not any(t.is_alive() for t in hung)


def test_limit_0_or_none_calls_the_reward_in_the_calling_thread_and_waits(tmp_path):
    path = write(tmp_path, "main_thread.py", """
        import threading, time
        def where_reward(completions, **kwargs):
            time.sleep(0.5)  # longer than the 0.2 s limit below would allow
            return [float(threading.current_thread() is threading.main_thread())] * len(completions)
    """)
    for timeout in (0, None):
        assert compute_rewards(load_rewards([f"{path}:where_reward"], timeout=timeout), **batch()) == {
            "where_reward": [1.0, 1.0]}
    with pytest.raises(RewardError, match="within 0.2 s"):
        compute_rewards(load_rewards([f"{path}:where_reward"], timeout=0.2), **batch())
    # the built-ins (math_verify's own timeout uses signals, main thread only) always run in the calling thread
    assert compute_rewards(load_rewards(["builtin:accuracy"], timeout=0.2), **batch()) == {"accuracy": [1.0, 1.0]}


def test_slow_rewards_within_the_limit_and_errors_inside_the_worker_thread(tmp_path):
    path = write(tmp_path, "ok.py", """
        import asyncio, time
        def slow_reward(completions, **kwargs):
            time.sleep(0.2)
            return [0.5] * len(completions)
        async def slow_async_reward(completions, **kwargs):
            await asyncio.sleep(0.2)
            return [0.25] * len(completions)
        def bad_reward(completions, **kwargs):
            return [1.0] * len(completions[0]["missing"])
    """)
    rewards = load_rewards([f"{path}:slow_reward", f"{path}:slow_async_reward"], timeout=2)
    assert compute_rewards(rewards, **batch()) == {"slow_reward": [0.5, 0.5], "slow_async_reward": [0.25, 0.25]}
    with pytest.raises(RewardError, match=r"'bad_reward' .* raised at step 7: TypeError") as info:
        compute_rewards(load_rewards([f"{path}:bad_reward"], timeout=2), **batch())
    assert isinstance(info.value.__cause__, TypeError)  # the reward's own error, raised in the worker thread


def test_a_completion_no_reward_scores_is_warned_about_once(tmp_path, caplog):
    import vltrain.rewards

    path = write(tmp_path, "none.py", """
        def abstain_reward(completions, **kwargs):
            return [None] * len(completions)
    """)
    rewards = load_rewards([str(path)])
    vltrain.rewards._warned_unscored.clear()
    with caplog.at_level(logging.WARNING, logger="vltrain.rewards"):
        assert compute_rewards(rewards, **batch()) == {"abstain_reward": [None, None]}  # TRL's "not applicable"
        compute_rewards(rewards, **batch())
    warned = [r.getMessage() for r in caplog.records if "returned None" in r.getMessage()]
    assert warned == ["grpo.rewards: every reward returned None for 2 of 2 completions at step 7: they get a total "
                      "reward of 0 (said once per process)"]


# ---------------------------------------------------------------------------------------------------------------
# Load time and before the model: load_rewards, check_reward_fields, the config field


LOAD_FAULTS = {  # case -> (file text or None for no file, spec suffix, what the error says)
    "file does not exist": (None, ":any_reward", "function 'any_reward' of file {path} not found"),
    "syntax error": ("def broken_reward(completions, **kwargs)\n    return []\n", "",
                     "importing {path} failed: SyntaxError"),
    "import raises": ("import no_such_module_here\n", "", "importing {path} failed: ModuleNotFoundError"),
    "no reward defined": ("def helper(x):\n    return x\n", "", "{path} defines no REWARDS list and no function"),
    "named function missing": ("def a_reward(completions, **kwargs):\n    return []\n", ":b_reward",
                               "{path} has no function 'b_reward' (it defines: a_reward)"),
    "name is not a function": ("b_reward = 3\n", ":b_reward", "'b_reward' in {path} is a int, not a function"),
    "no **kwargs": ("def strict_reward(completions):\n    return []\n", "",
                    "reward 'strict_reward' ({path}) has no **kwargs but is called with every keyword, assistant, "
                    "completion_ids, prompts, trainer_state among them: add **kwargs"),
    "positional-only": ("def pos_reward(completions, /, **kwargs):\n    return []\n", "",
                        "reward 'pos_reward' ({path}) takes 'completions' positionally only"),
    "REWARDS not a list": ("REWARDS = 'a_reward'\n", "", "REWARDS in {path} must be a list of functions"),
}


@pytest.mark.parametrize("case", list(LOAD_FAULTS))
def test_a_bad_reward_file_fails_at_load_with_one_line_naming_it(tmp_path, case):
    source, suffix, expected = LOAD_FAULTS[case]
    path = tmp_path / f"{case.replace(' ', '_').replace('*', '').replace('-', '_')}.py"
    if source is not None:
        path.write_text(source)
    with pytest.raises(ValueError) as info:
        load_rewards([f"{path}{suffix}"])
    message = one_line(info.value)
    assert message.startswith("grpo.rewards: ") and expected.format(path=path) in message, message


@pytest.mark.parametrize("timeout", [-1, float("nan"), "60", True])
def test_a_bad_timeout_is_refused_by_load_rewards(timeout):
    with pytest.raises(ValueError, match="grpo.reward_timeout must be a number of seconds >= 0"):
        load_rewards(["builtin:format"], timeout=timeout)


def test_a_field_the_reward_needs_and_no_record_has_fails_before_the_model(tmp_path):
    path = write(tmp_path, "fields.py", """
        def level_reward(completions, level, **kwargs):
            return [float(v or 0) for v in level]
        def optional_reward(completions, level=None, **kwargs):
            return [0.0] * len(completions)
        def strict(prompts, completions, completion_ids, trainer_state, assistant, level):
            return [0.0] * len(completions)
    """)
    level, optional, strict = load_rewards([f"{path}:level_reward", f"{path}:optional_reward", f"{path}:strict"])
    for reward in (level, optional, strict):
        check_reward_fields([reward], {"level"}, "data.train_path (t.json)")  # the field exists: fine
    check_reward_fields([optional], set(), "data.train_path (t.json)")  # a default: fine without it
    with pytest.raises(ValueError) as info:
        check_reward_fields([level], {"difficulty"}, "data.train_path (t.json)")
    assert one_line(info.value) == (
        f"grpo.rewards: reward 'level_reward' ({path}) needs the data field 'level', which no record of "
        "data.train_path (t.json) has (the fields it gets: assistant, difficulty); add it to the records or give "
        "the parameter a default")
    with pytest.raises(ValueError, match=r"'strict' .* has no \*\*kwargs but is called with every keyword, "
                                         r"difficulty among them"):
        check_reward_fields([strict], {"level", "difficulty"}, "data.train_path (t.json)")


@pytest.mark.parametrize("value, expected", [("-1", "grpo.reward_timeout must be >= 0"),
                                             ("soon", "grpo.reward_timeout must be a number")])
def test_the_timeout_field_is_checked_with_the_config(value, expected):
    with pytest.raises(ValueError, match=expected):
        load_config(GRPOConfig, None, ["data.train_path=x.json", f"grpo.reward_timeout={value}"])
    for ok, limit in (("0", 0.0), ("none", None), ("2.5", 2.5)):
        assert load_config(GRPOConfig, None, ["data.train_path=x.json", f"grpo.reward_timeout={ok}"]
                           ).grpo.reward_timeout == limit
    assert GRPOConfig().grpo.reward_timeout == 60.0


# ---------------------------------------------------------------------------------------------------------------
# Through the recipe: what the user sees


RUN_REWARDS = """
import time

def even_reward(completions, completion_ids, **kwargs):
    return [sum(i % 2 == 0 for i in ids) / max(1, len(ids)) for ids in completion_ids]

def breaks_at_step_2_reward(completions, trainer_state, **kwargs):
    if trainer_state["step"] >= 2:
        raise RuntimeError("judge service down")
    return [0.0] * len(completions)

def hangs_at_step_2_reward(completions, trainer_state, **kwargs):
    if trainer_state["step"] >= 2:
        time.sleep(3600)
    return [0.0] * len(completions)

def needs_level_reward(completions, level, **kwargs):
    return [0.0] * len(completions)
"""


@pytest.fixture
def grpo_run(tmp_path):
    """(run(rewards spec, *overrides) -> (returncode, stdout, stderr, seconds), the rewards file, output_dir)."""
    records = [{"id": f"p{i}", "conversations": [{"from": "human", "value": f"Say colour {i}."},
                                                 {"from": "gpt", "value": "red"}]} for i in range(4)]
    data = tmp_path / "prompts.json"
    data.write_text(json.dumps(records))
    rewards = write(tmp_path, "run_rewards.py", RUN_REWARDS)
    out = tmp_path / "out"

    def run(spec: str, *overrides: str):
        args = ["model.name_or_path=tiny:qwen2_5_vl", "model.dtype=float32", "model.attn_implementation=sdpa",
                f"data.train_path={data}", "data.num_workers=0", "data.max_seq_length=256", "train.report_to=none",
                "train.max_steps=2", "train.micro_batch_size=2", "train.log_every=1", f"train.output_dir={out}",
                "optim.warmup_steps=0", "grpo.num_generations=2", "grpo.max_completion_length=4",
                f"grpo.rewards=[{spec}]", *overrides]
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "recipes/grpo.py", *args], capture_output=True, text=True,
                              timeout=300, cwd=REPO, env=ENV)
        return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start

    return run, rewards, out


def error_line(stderr: str) -> str:
    """The one error line the recipe printed (vltrain.run.fail). It is not always the last line: the loop's
    progress bar can redraw after it (on a terminal the bar line is overwritten, the message stays)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    found = re.findall(r"(?:^|[\r\n\]])(error: [^\r\n]*)", stderr)
    assert len(found) == 1, stderr[-3000:]
    return found[0]


def test_recipe_a_reward_that_raises_mid_run_ends_on_one_line(grpo_run):
    run, rewards, out = grpo_run
    returncode, stdout, stderr, _ = run(f"{rewards}:even_reward,{rewards}:breaks_at_step_2_reward")
    assert returncode == 1, stderr[-3000:]
    assert re.search(r"step\s+1/2", stdout), stdout[-2000:]  # step 1 trained: the error is a run-time one
    assert error_line(stderr) == (f"error: grpo.rewards: reward 'breaks_at_step_2_reward' ({rewards}) raised at "
                                 "step 2: RuntimeError: judge service down")


def test_recipe_a_reward_that_hangs_ends_on_one_line_at_the_limit_and_the_process_exits(grpo_run):
    run, rewards, out = grpo_run
    returncode, stdout, stderr, seconds = run(f"{rewards}:hangs_at_step_2_reward", "grpo.reward_timeout=1")
    assert returncode == 1, stderr[-3000:]
    assert re.search(r"step\s+1/2", stdout), stdout[-2000:]
    assert error_line(stderr).startswith(f"error: grpo.rewards: reward 'hangs_at_step_2_reward' ({rewards}) did not "
                                        "return within 1 s at step 2 (grpo.reward_timeout")
    assert seconds < 200  # the hung thread (an hour's sleep) did not keep the process alive


@pytest.mark.parametrize("case", ["field missing from the records", "syntax error"])
def test_recipe_reward_mistakes_found_before_the_model_loads(grpo_run, case):
    run, rewards, out = grpo_run
    if case == "syntax error":
        broken = rewards.with_name("broken.py")
        broken.write_text("def broken_reward(completions, **kwargs)\n    return []\n")
        expected = f"error: grpo.rewards: importing {broken} failed: SyntaxError: "
        returncode, stdout, stderr, _ = run(str(broken))
    else:
        expected = (f"error: grpo.rewards: reward 'needs_level_reward' ({rewards}) needs the data field 'level', "
                    f"which no record of data.train_path ({rewards.with_name('prompts.json')}) has")
        returncode, stdout, stderr, _ = run(f"{rewards}:needs_level_reward")
    assert returncode == 1
    assert error_line(stderr).startswith(expected), stderr[-2000:]
    # no model was built: the resolved config is printed (and output_dir made) only after the checks
    assert "resolved config" not in stdout and not out.exists()
