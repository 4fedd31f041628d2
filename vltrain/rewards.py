"""GRPO reward functions: loaded from the user's files or the built-ins, called exactly as TRL calls them.

A reward is a plain function (sync or `async def`) called with keywords only, as TRL 1.16's GRPOTrainer does:

    f(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=...) -> list[float | None]

one value per completion; None means "not applicable to this completion": it is left out of that reward's
logged mean and counts 0 in the total (TRL's nansum). So a reward should take `**kwargs` for what it does not
read, and name the columns it needs (`def accuracy_reward(completions, assistant, **kwargs)`, the upstream's
convention). What each keyword holds (N = number of completions, a prompt's G completions consecutive):
- `prompts`: N message lists, `[{"role": "user", "content": "..."}]` (earlier turns and a system turn kept),
  text only: the caller (loops/grpo.py) writes media as "<image>" / "<video>" placeholders in the text.
- `completions`: N one-message lists `[{"role": "assistant", "content": text}]` (TRL's conversational form).
  The built-ins also accept plain strings.
- `completion_ids`: N lists of int, the generated token ids (no prompt, no padding).
- `**columns`: every top-level field of the data record, each a list of N values (a prompt's value repeated
  for its G completions), by its own name; the reference answer as `assistant` (the upstream's name).
- `trainer_state`: a fresh dict per call, always with "step" (the optimizer step these completions will
  train, counted from 1, as passed to `compute_rewards`) and whatever else the loop adds ("epoch", a float,
  and the rest are listed in loops/grpo.py). Unlike TRL, a dict, not a `TrainerState` object.

`grpo.rewards` lists specs; `load_rewards` turns them into `Reward`s:
- "path/to/file.py:func_name": that function of that file;
- "path/to/file.py": the file's `REWARDS` list if it defines one, else every function defined in the file (not
  imported into it) whose name ends in "_reward", in definition order;
- "builtin:accuracy", "builtin:format": `accuracy` and `format_reward` below.
Relative paths resolve against the current directory; each file is imported once per process (a module named
`vltrain_user_rewards_<stem>_<hash>`, so two files called rewards.py do not collide). A reward's name is its
function's name (logged as rewards/<name>/mean, /std, /none_frac); two rewards with one name are an error.
`grpo.reward_weights` has one weight per loaded reward (a whole-file spec counts as its functions), default 1.0.

`compute_rewards` calls the sync rewards one after the other in the calling thread, then runs the async ones
together on one asyncio event loop (`asyncio.run`, a fresh loop per call). When the calling thread already
runs an event loop (a notebook), that loop cannot be re-entered, so the async rewards run on a fresh loop in a
helper thread and the call blocks until they finish: they must not need the caller's loop. Every output is
checked: a list (or tuple, 1-D tensor / array) of N values, each None or a finite real number (a Python or
numpy number, a one-element tensor); anything else, or an exception inside a reward, is a `RewardError`
naming the file, the function and the step.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Reward", "RewardError", "load_rewards", "compute_rewards", "total_reward", "reward_stats",
           "accuracy", "format_reward", "BUILTINS", "completion_text"]

_RESERVED = ("prompts", "completions", "completion_ids", "trainer_state")


@dataclass
class Reward:
    name: str  # the function's name (builtins: "accuracy", "format"); logged as rewards/<name>
    fn: Callable  # sync or async
    weight: float
    source: str  # the file path, or "builtin"

    def where(self) -> str:
        return f"reward '{self.name}' ({self.source})"


class RewardError(ValueError):
    """A reward raised, or returned something that is not one finite number or None per completion."""


# ---------------------------------------------------------------------------------------------------------------
# Loading


_modules: dict[Path, object] = {}  # resolved path -> imported module: each file is imported once per process


def _import_file(path: Path):
    if path in _modules:
        return _modules[path]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    name = f"vltrain_user_rewards_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"grpo.rewards: cannot import {path} as a python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec, as importlib's recipe: dataclasses and pickling look it up there
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise ValueError(f"grpo.rewards: importing {path} failed: {type(error).__name__}: "
                         f"{_one_line(error)}") from error
    _modules[path] = module
    return module


def _callable_name(fn) -> str:
    while hasattr(fn, "func") and not hasattr(fn, "__name__"):  # functools.partial
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _file_rewards(path: Path, func_name: str | None) -> list[tuple[str, Callable]]:
    module = _import_file(path)
    if func_name is not None:
        if not hasattr(module, func_name):
            defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                             and getattr(v, "__module__", None) == module.__name__)
            raise ValueError(f"grpo.rewards: {path} has no function '{func_name}' (it defines: "
                             f"{', '.join(defined) or 'none'})")
        fn = getattr(module, func_name)
        if not callable(fn):
            raise ValueError(f"grpo.rewards: '{func_name}' in {path} is a {type(fn).__name__}, not a function")
        return [(func_name, fn)]
    if hasattr(module, "REWARDS"):
        listed = module.REWARDS
        if not isinstance(listed, (list, tuple)):
            raise ValueError(f"grpo.rewards: REWARDS in {path} must be a list of functions, "
                             f"got a {type(listed).__name__}")
        for i, fn in enumerate(listed):
            if not callable(fn):
                raise ValueError(f"grpo.rewards: REWARDS[{i}] in {path} is a {type(fn).__name__}, not a function")
        found = [(_callable_name(fn), fn) for fn in listed]
        if not found:
            raise ValueError(f"grpo.rewards: REWARDS in {path} is empty")
        return found
    # vars() keeps assignment order, which for functions defined in the file is definition order
    found = [(k, v) for k, v in vars(module).items()
             if k.endswith("_reward") and inspect.isfunction(v) and v.__module__ == module.__name__]
    if not found:
        raise ValueError(f"grpo.rewards: {path} defines no REWARDS list and no function whose name ends in "
                         f"'_reward' (name one: {path}:my_function)")
    return found


def load_rewards(specs: list[str], weights: list[float] | None = None) -> list[Reward]:
    """Resolve `grpo.rewards` specs (see the module docstring) into Rewards weighted by `grpo.reward_weights`:
    one weight per loaded reward, in load order, or None for 1.0 each."""
    if isinstance(specs, str):
        specs = [specs]
    if not specs:
        raise ValueError("grpo.rewards: no reward given (e.g. grpo.rewards=[builtin:accuracy,builtin:format])")
    found: list[tuple[str, Callable, str]] = []  # name, fn, source
    for spec in specs:
        spec = str(spec).strip()
        if spec.startswith("builtin:"):
            name = spec[len("builtin:"):]
            if name not in BUILTINS:
                raise ValueError(f"grpo.rewards: unknown builtin '{name}' in '{spec}' "
                                 f"(builtins: {', '.join(sorted(BUILTINS))})")
            found.append((name, BUILTINS[name], "builtin"))
            continue
        path_text, func_name = spec, None
        head, sep, tail = spec.rpartition(":")
        if sep and head.endswith(".py"):
            path_text, func_name = head, tail.strip()
        path = Path(path_text).expanduser().resolve()
        if not path.is_file():
            what = f"function '{func_name}' of " if func_name else ""
            raise ValueError(f"grpo.rewards: {what}file {path_text} not found (resolved to {path})")
        found.extend((name, fn, str(path)) for name, fn in _file_rewards(path, func_name))
    names = [name for name, _, _ in found]
    if weights is None:
        weights = [1.0] * len(found)
    weights = list(weights)
    if len(weights) != len(found):
        raise ValueError(f"grpo.reward_weights: {len(weights)} weights for {len(found)} rewards "
                         f"({', '.join(names)}): give one per reward, in that order")
    rewards = []
    seen: dict[str, str] = {}
    for (name, fn, source), weight in zip(found, weights):
        if name in seen:
            raise ValueError(f"grpo.rewards: two rewards named '{name}' ({seen[name]} and {source}); "
                             f"each is logged by its name, rename one")
        seen[name] = source
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"grpo.reward_weights: weight {weight!r} of reward '{name}' ({source}) is not a "
                             f"number") from None
        if not math.isfinite(weight):
            raise ValueError(f"grpo.reward_weights: weight {weight} of reward '{name}' ({source}) is not finite")
        rewards.append(Reward(name=name, fn=fn, weight=weight, source=source))
    return rewards


# ---------------------------------------------------------------------------------------------------------------
# Calling


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _check_output(reward: Reward, output, num: int, step: int) -> list[float | None]:
    where = f"grpo.rewards: {reward.where()} at step {step}"
    if isinstance(output, torch.Tensor) or type(output).__module__ == "numpy":
        if getattr(output, "ndim", 1) != 1:
            raise RewardError(f"{where}: returned a {output.ndim}-D {type(output).__name__}, expected a list of "
                              f"{num} values")
        output = output.tolist()
    if not isinstance(output, (list, tuple)):
        raise RewardError(f"{where}: returned a {type(output).__name__}, expected a list of {num} values "
                          f"(one float or None per completion)")
    if len(output) != num:
        raise RewardError(f"{where}: returned {len(output)} values for {num} completions")
    values: list[float | None] = []
    for i, value in enumerate(output):
        if value is None:
            values.append(None)
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise RewardError(f"{where}: value {i} is a {type(value).__name__} ({value!r:.40}), expected a float "
                              f"or None")
        value = float(value)
        if not math.isfinite(value):
            raise RewardError(f"{where}: value {i} is {value} (return None for 'not applicable')")
        values.append(value)
    return values


async def _gather(coroutines: list):
    return await asyncio.gather(*coroutines, return_exceptions=True)


def _run_coroutines(coroutines: list) -> list:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop in this thread: the usual case (a training loop)
        return asyncio.run(_gather(coroutines))
    # A loop runs in this thread (a notebook): it cannot be re-entered, so run a fresh one in a helper thread.
    box: list = []
    thread = threading.Thread(target=lambda: box.append(asyncio.run(_gather(coroutines))),
                              name="vltrain-rewards", daemon=True)
    thread.start()
    thread.join()
    return box[0]


def compute_rewards(rewards: list[Reward], *, prompts, completions, completion_ids, columns: dict[str, list],
                    trainer_state: dict, step: int) -> dict[str, list[float | None]]:
    """Call every reward on N completions; returns name -> N values (float or None), in `rewards` order.

    `columns` maps each record field (the reference answer as "assistant") to N values. Raises RewardError
    (one line, naming file, function and step) for a reward that raises or returns a wrong value, ValueError
    for inputs of different lengths or a column named like one of TRL's keywords."""
    num = len(completions)
    clashing = sorted(set(columns) & set(_RESERVED))
    if clashing:
        raise ValueError(f"grpo.rewards: the data has a field '{clashing[0]}', which is one of the reward keywords "
                         f"({', '.join(_RESERVED)}): rename that field")
    for name, value in (("prompts", prompts), ("completion_ids", completion_ids), *columns.items()):
        if len(value) != num:
            raise ValueError(f"grpo.rewards: '{name}' has {len(value)} values for {num} completions at step {step}")
    kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    results: dict[str, list[float | None]] = {}
    pending: list[tuple[Reward, object]] = []  # async rewards' coroutines, run together below
    try:
        for reward in rewards:
            try:
                output = reward.fn(**kwargs, trainer_state={"step": step, **trainer_state})
            except Exception as error:
                raise RewardError(f"grpo.rewards: {reward.where()} raised at step {step}: "
                                  f"{type(error).__name__}: {_one_line(error)}") from error
            if inspect.isawaitable(output):  # async def, an async __call__, a partial of either
                pending.append((reward, output))
            else:
                results[reward.name] = _check_output(reward, output, num, step)
    except BaseException:
        for _, coroutine in pending:  # never started: close them so Python does not warn "never awaited"
            if inspect.iscoroutine(coroutine):
                coroutine.close()
        raise
    if pending:
        outputs = _run_coroutines([coroutine for _, coroutine in pending])
        for (reward, _), output in zip(pending, outputs):
            if isinstance(output, BaseException):
                if not isinstance(output, Exception):  # KeyboardInterrupt, SystemExit: not the reward's fault
                    raise output
                raise RewardError(f"grpo.rewards: {reward.where()} raised at step {step}: "
                                  f"{type(output).__name__}: {_one_line(output)}") from output
            results[reward.name] = _check_output(reward, output, num, step)
    return {reward.name: results[reward.name] for reward in rewards}


def total_reward(values: dict[str, list], rewards: list[Reward]) -> torch.Tensor:
    """(N,) fp32: sum over rewards of weight * value, a None counting 0 for that reward (TRL's nansum). A
    completion for which every reward is None gets 0.0 (as in TRL, which also warns; the loop may warn)."""
    assert rewards, "no rewards"
    num = len(values[rewards[0].name])
    total = torch.zeros(num, dtype=torch.float32)
    for reward in rewards:
        column = values[reward.name]
        assert len(column) == num, f"{reward.name}: {len(column)} values, expected {num}"
        total += reward.weight * torch.tensor([0.0 if v is None else v for v in column], dtype=torch.float32)
    return total


def reward_stats(values: dict[str, list]) -> dict[str, float]:
    """Per reward: rewards/<name>/mean and /std over its non-None values (std with Bessel's correction, as TRL
    logs it; nan with fewer than 2 values, mean nan with none) and /none_frac (share of None values)."""
    stats = {}
    for name, column in values.items():
        present = torch.tensor([v for v in column if v is not None], dtype=torch.float64)
        count = present.numel()
        stats[f"rewards/{name}/mean"] = present.mean().item() if count else math.nan
        stats[f"rewards/{name}/std"] = present.std().item() if count >= 2 else math.nan
        stats[f"rewards/{name}/none_frac"] = (len(column) - count) / len(column) if column else math.nan
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Built-ins


def completion_text(value) -> str | None:
    """The text of a completion or reference given as a string, a message dict {"content": ...}, or a list of
    messages (the last one's content); typed content parts contribute their "text". None stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            return ""
        return completion_text(value[-1])
    if isinstance(value, dict):
        content = value.get("content", value.get("text"))
        if isinstance(content, (list, tuple)):  # [{"type": "text", "text": ...}, {"type": "image"}, ...]
            return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
        return "" if content is None else str(content)
    return str(value)


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _extract_answer(text: str) -> str:
    """The last <answer>...</answer> block's content, or the whole text when there is none."""
    found = _ANSWER.findall(text)
    return found[-1] if found else text


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".").strip()


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _math_verify():
    """(parse, verify) from math_verify when it is installed, else None (looked up per call, so installing it
    mid-process, or a stand-in in tests, takes effect)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    return parse, verify


def _answers_match(prediction: str, reference: str, checker) -> bool:
    if checker is not None:
        parse, verify = checker
        try:
            if verify(parse(reference), parse(prediction)):  # math_verify's order: verify(gold, answer)
                return True
        except Exception:  # a parse failure or timeout is "no symbolic match": the string checks still run
            pass
    pred, ref = _normalise(prediction), _normalise(reference)
    if not pred:
        return False
    if pred == ref:
        return True
    pred_num, ref_num = _as_number(pred), _as_number(ref)
    return pred_num is not None and ref_num is not None and pred_num == ref_num


def accuracy(completions, assistant, **kwargs) -> list[float | None]:
    """1.0 when the completion's answer equals the reference, else 0.0; None where the reference is None.

    The answer is the last <answer>...</answer> block (multi-line) if there is one, else the whole text; the
    same for the reference (`assistant`: a string, an assistant message or a message list). Equal means:
    math_verify's `verify` when it is installed (symbolic: "1/2" == "0.5", LaTeX), or the normalised texts
    are equal (stripped, casefolded, whitespace collapsed, trailing '.' removed), or both parse as the same
    number ("3.0" == "3", "1,000" == "1000"). An empty answer never matches."""
    checker = _math_verify()
    scores: list[float | None] = []
    for completion, reference in zip(completions, assistant, strict=True):
        reference = completion_text(reference)
        if reference is None:
            scores.append(None)
            continue
        prediction = _extract_answer(completion_text(completion) or "")
        scores.append(1.0 if _answers_match(prediction, _extract_answer(reference), checker) else 0.0)
    return scores


_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"  # any text, across lines, that opens or closes no tag
_FORMAT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL)


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion is exactly one `<think>...</think>` then one `<answer>...</answer>` (whitespace
    around and between them, multi-line content), else 0.0. Registered as the builtin "format". The completion
    text is scored as generated: where a chat template opens `<think>` in the generation prompt, the opening
    tag is not in the completion and this reward is 0."""
    return [1.0 if _FORMAT.fullmatch(completion_text(c) or "") else 0.0 for c in completions]


BUILTINS: dict[str, Callable] = {"accuracy": accuracy, "format": format_reward}
