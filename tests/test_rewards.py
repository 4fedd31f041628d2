"""vltrain.rewards: loading reward files and built-ins, TRL's call convention, output checks, totals, stats."""

from __future__ import annotations

import asyncio
import gc
import math
import subprocess
import sys
import textwrap
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vltrain.rewards import (Reward, RewardError, accuracy, compute_rewards, format_reward, load_rewards, reward_stats,
                             total_reward)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "rewards" / "shapes_rewards.py"


def write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def batch(answers, references, **columns):
    """compute_rewards' keywords for completions `answers` (conversational), references in `assistant`."""
    num = len(answers)
    return dict(prompts=[[{"role": "user", "content": "<image>\nWhat colour is the shape?"}]] * num,
                completions=[[{"role": "assistant", "content": a}] for a in answers],
                completion_ids=[[1, 2, 3]] * num,
                columns={"assistant": list(references), **columns},
                trainer_state={"step": 7, "epoch": 0.5}, step=7)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_load_function_spec_and_weights(tmp_path):
    path = write(tmp_path, "mine.py", """
        def accuracy_reward(completions, **kwargs):
            return [1.0] * len(completions)
        def other(completions, **kwargs):
            return [0.0] * len(completions)
    """)
    rewards = load_rewards([f"{path}:other", "builtin:format"], [0.5, 2.0])
    assert [(r.name, r.weight, r.source) for r in rewards] == [("other", 0.5, str(path)), ("format", 2.0, "builtin")]
    assert rewards[0].fn(completions=["a", "b"]) == [0.0, 0.0]
    assert rewards[1].fn is format_reward


def test_load_relative_path_against_cwd(tmp_path, monkeypatch):
    write(tmp_path, "rel.py", "def x_reward(completions, **kw):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    (reward,) = load_rewards(["rel.py"])
    assert reward.source == str((tmp_path / "rel.py").resolve())


def test_load_whole_file_with_rewards_list(tmp_path):
    path = write(tmp_path, "listed.py", """
        def b(completions, **kwargs):
            return [2.0] * len(completions)
        def a(completions, **kwargs):
            return [1.0] * len(completions)
        def ignored_reward(completions, **kwargs):
            return [9.0] * len(completions)
        REWARDS = [a, b]
    """)
    assert [r.name for r in load_rewards([str(path)])] == ["a", "b"]  # REWARDS order; the suffix is not used


def test_load_whole_file_by_suffix_in_definition_order(tmp_path):
    write(tmp_path, "helper.py", "def imported_reward(completions, **kw):\n    return [0.0] * len(completions)\n")
    path = write(tmp_path, "suffix.py", """
        import sys
        sys.path.insert(0, %r)
        from helper import imported_reward

        def zeta_reward(completions, **kwargs):
            return [1.0] * len(completions)
        def not_a_reward_at_all(completions, **kwargs):
            return [5.0] * len(completions)
        async def alpha_reward(completions, **kwargs):
            return [2.0] * len(completions)
        threshold_reward = 3  # not a function
    """ % str(tmp_path))
    rewards = load_rewards([str(path)], weights=[1.0, 0.25])
    assert [(r.name, r.weight) for r in rewards] == [("zeta_reward", 1.0), ("alpha_reward", 0.25)]


def test_each_file_is_imported_once(tmp_path):
    counter = tmp_path / "count.txt"
    path = write(tmp_path, "once.py", f"""
        from pathlib import Path
        p = Path({str(counter)!r}); p.write_text(p.read_text() + "x" if p.exists() else "x")
        def a_reward(completions, **kwargs):
            return [1.0] * len(completions)
        def b_reward(completions, **kwargs):
            return [1.0] * len(completions)
    """)
    load_rewards([f"{path}:a_reward", f"{path}:b_reward"])
    load_rewards([str(path)])
    assert counter.read_text() == "x"


def test_two_files_with_one_stem_do_not_collide(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = write(tmp_path / "one", "rewards.py", "def first_reward(completions, **kw):\n    return [1.0]\n")
    second = write(tmp_path / "two", "rewards.py", "def second_reward(completions, **kw):\n    return [2.0]\n")
    rewards = load_rewards([str(first), str(second)])
    assert [r.name for r in rewards] == ["first_reward", "second_reward"]
    assert [r.fn(completions=["x"]) for r in rewards] == [[1.0], [2.0]]


@pytest.mark.parametrize("spec_suffix, source, weights, expected", [
    ("", None, None, ["grpo.rewards", "not found", "missing.py"]),
    (":accuracy_reward", None, None, ["grpo.rewards", "not found", "missing.py", "accuracy_reward"]),
    (":nope", "def yes(completions, **kw):\n    return [1.0]\n", None,
     ["grpo.rewards", "bad.py", "'nope'", "yes"]),
    (":THRESHOLD", "THRESHOLD = 0.5\n", None, ["grpo.rewards", "bad.py", "'THRESHOLD'", "not a function"]),
    ("", "def helper(x):\n    return x\n", None, ["grpo.rewards", "bad.py", "_reward", "REWARDS"]),
    ("", "REWARDS = []\n", None, ["grpo.rewards", "bad.py", "REWARDS", "empty"]),
    ("", "REWARDS = [1.0]\n", None, ["grpo.rewards", "bad.py", "REWARDS[0]", "not a function"]),
    ("", "def a_reward(completions, **kw):\n    return [1.0]\n", [1.0, 2.0],
     ["grpo.reward_weights", "2 weights for 1 rewards", "a_reward"]),
    ("", "import does_not_exist_anywhere\n", None, ["grpo.rewards", "bad.py", "does_not_exist_anywhere"]),
])
def test_load_errors_name_file_and_function(tmp_path, spec_suffix, source, weights, expected):
    path = tmp_path / ("missing.py" if source is None else "bad.py")
    if source is not None:
        path.write_text(source)
    with pytest.raises(ValueError) as info:
        load_rewards([f"{path}{spec_suffix}"], weights)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_unknown_builtin_and_duplicate_names(tmp_path):
    with pytest.raises(ValueError, match=r"grpo.rewards: unknown builtin 'acuracy'.*accuracy, format"):
        load_rewards(["builtin:acuracy"])
    path = write(tmp_path, "dup.py", "def accuracy(completions, **kw):\n    return [1.0]\n")
    with pytest.raises(ValueError, match=r"two rewards named 'accuracy' \(builtin and .*dup.py\)"):
        load_rewards(["builtin:accuracy", f"{path}:accuracy"])
    with pytest.raises(ValueError, match="grpo.rewards: no reward given"):
        load_rewards([])
    with pytest.raises(ValueError, match="grpo.reward_weights: 2 weights for 1 rewards"):
        load_rewards(["builtin:format"], [1.0, 1.0])


# ---------------------------------------------------------------------------------------------------------------
# Calling


def test_trl_keyword_signature_and_columns(tmp_path):
    path = write(tmp_path, "sig.py", """
        seen = {}
        def generic_reward(prompts, completions, completion_ids, trainer_state, **kwargs):
            seen["generic"] = dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                   trainer_state=trainer_state, kwargs=kwargs)
            return [float(len(ids)) for ids in completion_ids]
        def column_reward(completions, assistant, difficulty, **kwargs):
            seen["column"] = dict(assistant=assistant, difficulty=difficulty, kwargs=sorted(kwargs))
            return [d * (c[0]["content"] == a) for c, a, d in zip(completions, assistant, difficulty)]
        def strict(*, prompts, completions, completion_ids, assistant, difficulty, trainer_state):
            return [None] * len(completions)
    """)
    rewards = load_rewards([str(path), f"{path}:strict"])
    inputs = batch(["red", "blue"], ["red", "red"], difficulty=[2.0, 2.0])
    values = compute_rewards(rewards, **inputs)
    assert values == {"generic_reward": [3.0, 3.0], "column_reward": [2.0, 0.0], "strict": [None, None]}
    seen = sys.modules[rewards[0].fn.__module__].seen
    assert seen["generic"]["prompts"] == inputs["prompts"]
    assert seen["generic"]["completions"] == inputs["completions"]
    assert seen["generic"]["trainer_state"] == {"step": 7, "epoch": 0.5}
    assert seen["generic"]["kwargs"] == {"assistant": ["red", "red"], "difficulty": [2.0, 2.0]}
    assert seen["column"] == {"assistant": ["red", "red"], "difficulty": [2.0, 2.0],
                              "kwargs": ["completion_ids", "prompts", "trainer_state"]}


def test_trainer_state_gets_the_step_and_is_a_copy():
    states = []

    def mutating(completions, trainer_state, **kwargs):
        states.append(dict(trainer_state))
        trainer_state["step"] = -1
        return [0.0] * len(completions)

    rewards = load_rewards(["builtin:format"])
    rewards[0].fn, rewards[0].name = mutating, "mutating"
    caller_state = {"epoch": 1.25}
    inputs = batch(["a"], ["a"])
    inputs.update(trainer_state=caller_state, step=12)
    compute_rewards(rewards, **inputs)
    assert states == [{"step": 12, "epoch": 1.25}]
    assert caller_state == {"epoch": 1.25}


def test_none_excluded_from_mean_and_zero_in_total(tmp_path):
    path = write(tmp_path, "partial.py", """
        def sometimes_reward(completions, **kwargs):
            return [1.0, None, 3.0, None]
        def never_reward(completions, **kwargs):
            return [None, None, None, None]
        def always_reward(completions, **kwargs):
            return [0.5, 0.5, None, None]
    """)
    rewards = load_rewards([str(path)], [2.0, 1.0, -1.0])
    values = compute_rewards(rewards, **batch(["a", "b", "c", "d"], ["a"] * 4))
    total = total_reward(values, rewards)
    assert total.dtype == torch.float32 and total.shape == (4,)
    # by hand: 2*1 - 0.5 ; 0 - 0.5 ; 2*3 ; every reward None -> 0
    assert total.tolist() == [1.5, -0.5, 6.0, 0.0]
    stats = reward_stats(values)
    assert stats["rewards/sometimes_reward/mean"] == 2.0
    assert stats["rewards/sometimes_reward/std"] == pytest.approx(math.sqrt(2.0))  # sample std of {1, 3}
    assert stats["rewards/sometimes_reward/none_frac"] == 0.5
    assert math.isnan(stats["rewards/never_reward/mean"]) and math.isnan(stats["rewards/never_reward/std"])
    assert stats["rewards/never_reward/none_frac"] == 1.0
    assert stats["rewards/always_reward/std"] == 0.0


def test_outputs_accepted_as_tuple_tensor_and_ints():
    def as_tensor(completions, **kw):
        return torch.tensor([1.0, 0.0])

    def as_tuple(completions, **kw):
        return (1, True)

    def as_scalars(completions, **kw):
        return [np.float32(0.25), torch.tensor(0.5)]

    rewards = load_rewards(["builtin:accuracy", "builtin:format"])
    rewards[0].fn, rewards[0].name = as_tensor, "as_tensor"
    rewards[1].fn, rewards[1].name = as_tuple, "as_tuple"
    rewards.append(Reward(name="as_scalars", fn=as_scalars, weight=1.0, source="test"))
    values = compute_rewards(rewards, **batch(["a", "b"], ["a", "b"]))
    assert values == {"as_tensor": [1.0, 0.0], "as_tuple": [1.0, 1.0], "as_scalars": [0.25, 0.5]}
    assert all(type(v) is float for column in values.values() for v in column)


def test_async_rewards_run_concurrently(tmp_path):
    path = write(tmp_path, "judges.py", """
        import asyncio
        async def slow_a_reward(completions, **kwargs):
            await asyncio.sleep(0.2)
            return [1.0] * len(completions)
        async def slow_b_reward(completions, **kwargs):
            await asyncio.sleep(0.2)
            return [None] * len(completions)
        def sync_reward(completions, **kwargs):
            return [0.5] * len(completions)
    """)
    rewards = load_rewards([str(path)])
    start = time.perf_counter()
    values = compute_rewards(rewards, **batch(["a", "b"], ["a", "b"]))
    elapsed = time.perf_counter() - start
    assert list(values) == ["slow_a_reward", "slow_b_reward", "sync_reward"]  # rewards order, not finish order
    assert values == {"slow_a_reward": [1.0, 1.0], "slow_b_reward": [None, None], "sync_reward": [0.5, 0.5]}
    assert elapsed < 0.35, elapsed


def test_async_rewards_inside_a_running_event_loop(tmp_path):
    path = write(tmp_path, "nb.py", """
        import asyncio
        async def judge_reward(completions, **kwargs):
            await asyncio.sleep(0.01)
            return [1.0] * len(completions)
    """)
    rewards = load_rewards([str(path)])

    async def notebook_cell():  # a caller that already runs a loop in this thread, as Jupyter does
        return compute_rewards(rewards, **batch(["a"], ["a"]))

    assert asyncio.run(notebook_cell()) == {"judge_reward": [1.0]}


BAD = """
    import asyncio
    def raising_reward(completions, **kwargs):
        raise KeyError("no such column")
    def short_reward(completions, **kwargs):
        return [1.0]
    def string_reward(completions, **kwargs):
        return "1.0 0.0"
    def text_value_reward(completions, **kwargs):
        return [1.0, "good"]
    def nan_reward(completions, **kwargs):
        return [1.0, float("nan")]
    def scalar_reward(completions, **kwargs):
        return 1.0
    async def async_raising_reward(completions, **kwargs):
        await asyncio.sleep(0)
        raise RuntimeError("judge unreachable")
    async def async_short_reward(completions, **kwargs):
        return []
"""


@pytest.mark.parametrize("name, what", [
    ("raising_reward", "raised at step 7: KeyError: 'no such column'"),
    ("short_reward", "returned 1 values for 2 completions"),
    ("string_reward", "returned a str, expected a list of 2 values"),
    ("text_value_reward", "value 1 is a str"),
    ("nan_reward", "value 1 is nan"),
    ("scalar_reward", "returned a float"),
    ("async_raising_reward", "raised at step 7: RuntimeError: judge unreachable"),
    ("async_short_reward", "returned 0 values for 2 completions"),
])
def test_bad_rewards_raise_reward_error_naming_file_function_step(tmp_path, name, what):
    path = write(tmp_path, "bad_rewards.py", BAD)
    rewards = load_rewards([f"{path}:{name}"])
    with pytest.raises(RewardError) as info:
        compute_rewards(rewards, **batch(["a", "b"], ["a", "b"]))
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    for part in (f"'{name}'", str(path), "step 7", what):
        assert part in message, (part, message)
    if "raised" in what:
        assert info.value.__cause__ is not None and type(info.value.__cause__).__name__ in what


def test_a_failing_sync_reward_closes_pending_async_ones(tmp_path):
    path = write(tmp_path, "mixed.py", BAD)
    rewards = load_rewards([f"{path}:async_short_reward", f"{path}:raising_reward"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RewardError, match="raising_reward"):
            compute_rewards(rewards, **batch(["a", "b"], ["a", "b"]))
        gc.collect()  # an unclosed, never-awaited coroutine warns when it is collected
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_input_length_mismatch_and_reserved_column():
    rewards = load_rewards(["builtin:format"])
    inputs = batch(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"'assistant' has 1 values for 2 completions at step 7"):
        compute_rewards(rewards, **inputs)
    inputs = batch(["a"], ["a"], trainer_state=["x"])  # a record field named like TRL's keyword
    with pytest.raises(ValueError, match="field 'trainer_state'"):
        compute_rewards(rewards, **inputs)


# ---------------------------------------------------------------------------------------------------------------
# Built-ins


def test_accuracy_with_and_without_answer_tags(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # the string path, whether or not it is installed
    completions = [
        [{"role": "assistant", "content": "<think>it looks red</think><answer> Red. </answer>"}],
        [{"role": "assistant", "content": "<answer>blue</answer>"}],
        [{"role": "assistant", "content": "  a   Red  Circle "}],
        "<think>\nfirst guess\n</think>\n<answer>\nblue\n</answer> then <answer>\nred\n</answer>",  # last block
        [{"role": "assistant", "content": "<answer>\nlarge red\ncircle\n</answer>"}],  # multi-line answer
        [{"role": "assistant", "content": ""}],
        "red",
    ]
    references = ["red", "red", "A red circle.", "red", {"role": "assistant", "content": "<answer>Large red circle"
                                                         "</answer>"}, "", None]
    assert accuracy(completions, references) == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, None]


def test_accuracy_numbers(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    completions = ["<answer>3.0</answer>", "3", "<answer>1,000</answer>", "<answer>3.5</answer>", "3 apples"]
    assert accuracy(completions, ["3", "3.00", "1000", "3", "3"]) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_accuracy_consults_math_verify_when_importable(monkeypatch):
    calls = []
    fake = types.ModuleType("math_verify")
    fake.parse = lambda text: ("parsed", text.strip())
    fake.verify = lambda gold, answer: calls.append((gold, answer)) or {gold[1], answer[1]} == {"1/2", "0.5"}
    monkeypatch.setitem(sys.modules, "math_verify", fake)
    scores = accuracy(["<answer>0.5</answer>", "0.25", "red"], ["1/2", "1/2", "red"])
    assert scores == [1.0, 0.0, 1.0]  # "red": verify says no, the string match still runs
    assert calls[0] == (("parsed", "1/2"), ("parsed", "0.5"))  # verify(gold, answer)

    def broken(text):
        raise RuntimeError("parse timeout")

    fake.parse = broken
    assert accuracy(["3.0", "x"], ["3", "y"]) == [1.0, 0.0]  # a math_verify failure falls back


def test_accuracy_with_real_math_verify():
    pytest.importorskip("math_verify")  # not installed on the CI box (checked with `pip show math-verify`)
    assert accuracy(["<answer>$\\frac{1}{2}$</answer>", "<answer>$0.3$</answer>"], ["$0.5$", "$0.5$"]) == [1.0, 0.0]


def test_format_reward():
    good = ["<think>red pixels</think><answer>red</answer>",
            "  <think>\nline one\nline two\n</think>\n\n<answer>\nred\n</answer>\n",
            [{"role": "assistant", "content": "<think></think> <answer>x</answer>"}]]
    bad = ["red", "<answer>red</answer>", "<think>a</think>", "<answer>red</answer><think>a</think>",
           "<think>a</think><answer>red</answer> and more text",
           "<think>a</think><answer>b</answer><answer>c</answer>",
           "<think>a<think>b</think><answer>c</answer>", "prefix <think>a</think><answer>b</answer>",
           [{"role": "assistant", "content": ""}]]
    assert format_reward(good) == [1.0] * len(good)
    assert format_reward(bad) == [0.0] * len(bad)


def test_builtins_through_compute_rewards():
    rewards = load_rewards(["builtin:accuracy", "builtin:format"], [1.0, 0.5])
    values = compute_rewards(rewards, **batch(
        ["<think>it is red</think><answer>red</answer>", "<answer>blue</answer>", "circle"],
        [{"role": "assistant", "content": "red"}, "red", "circle"]))
    assert values == {"accuracy": [1.0, 0.0, 1.0], "format": [1.0, 0.0, 0.0]}
    assert total_reward(values, rewards).tolist() == [1.5, 0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# The demo reward file


def test_demo_file_loads_by_suffix_and_scores():
    rewards = load_rewards([str(DEMO)])
    assert [r.name for r in rewards] == ["shape_answer_reward", "brevity_reward"]
    answers = ["red", "Red.", "circle, I think", "It is red.", "blue", "", "red red red red"]
    references = ["red", "red", "circle", "red", "red", "red", {"role": "assistant", "content": "red"}]
    values = compute_rewards(rewards, **batch(answers, references))
    assert values["shape_answer_reward"] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert values["brevity_reward"] == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    # plain-string completions work too
    assert rewards[0].fn(completions=["square!"], assistant=["square"]) == [1.0]


def test_demo_file_imports_nothing_from_vltrain():
    code = (f"import runpy, sys; runpy.run_path({str(DEMO)!r}); "
            "assert not [m for m in sys.modules if m.startswith('vltrain')], 'vltrain imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
