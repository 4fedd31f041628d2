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

`compute_rewards` calls the sync rewards one after the other, then runs the async ones together on one asyncio
event loop (`asyncio.run`, a fresh loop per call). When the calling thread already runs an event loop (a
notebook), that loop cannot be re-entered, so the async rewards run on a fresh loop in a helper thread and the
call blocks until they finish: they must not need the caller's loop. Every output is checked: a list (or tuple,
1-D tensor / array) of N values, each None or a finite real number (a Python or numpy number, a one-element
tensor); anything else, or an exception inside a reward, is a `RewardError` naming the file, the function and
the step.

A per-call time limit (`grpo.reward_timeout` seconds, `load_rewards(..., timeout=)`; None or 0: none) turns a
reward that hangs into a `RewardError` naming file, function, step and the limit, which ends the run:
- a sync reward from a user's file then runs in a worker thread (a daemon, so the process can still exit) that
  the caller waits for. Python cannot kill a thread: a hung call keeps running, its result is thrown away,
  and whatever it holds (a socket, a lock, a GPU tensor) stays held until the process exits. Code that needs
  the main thread (`signal.alarm`, signal handlers) cannot run in that thread: set the limit to 0 for such a
  reward, which is then called in the calling thread. The built-ins always run in the calling thread.
- an async reward's task is cancelled at the limit. One that blocks its event loop (a sync `time.sleep`
  inside `async def`) cannot be cancelled: the loop runs in a daemon helper thread, which the caller stops
  waiting for after the longest limit (plus one second), naming every async reward that had not finished.

Reward files are code the user chose to run: importing one runs it, with the training process's rights.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import inspect
import logging
import math
import numbers
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Reward", "RewardError", "load_rewards", "check_reward_fields", "compute_rewards", "total_reward",
           "reward_stats", "accuracy", "format_reward", "BUILTINS", "completion_text"]

log = logging.getLogger(__name__)
_RESERVED = ("prompts", "completions", "completion_ids", "trainer_state")
_ALWAYS = (*_RESERVED, "assistant")  # the keywords every call passes (the reference answer may be None)


@dataclass
class Reward:
    name: str  # the function's name (builtins: "accuracy", "format"); logged as rewards/<name>
    fn: Callable  # sync or async
    weight: float
    source: str  # the file path, or "builtin"
    timeout: float | None = None  # seconds one call may take (None: no limit); see the module docstring

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


def load_rewards(specs: list[str], weights: list[float] | None = None, *, timeout: float | None = None) -> list[Reward]:
    """Resolve `grpo.rewards` specs (see the module docstring) into Rewards weighted by `grpo.reward_weights`:
    one weight per loaded reward, in load order, or None for 1.0 each. `timeout` (`grpo.reward_timeout`): the
    seconds one call of each reward may take (None or 0: no limit)."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, numbers.Real)
                                or not timeout >= 0):
        raise ValueError(f"grpo.reward_timeout must be a number of seconds >= 0 (0: no limit), got {timeout!r}")
    timeout = float(timeout) if timeout else None
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
        reward = Reward(name=name, fn=fn, weight=weight, source=source, timeout=timeout)
        _check_signature(reward, None)
        rewards.append(reward)
    return rewards


def _check_signature(reward: Reward, fields: set[str] | None, where: str = "") -> None:
    """ValueError when `reward.fn` cannot take the keywords it will be called with: the TRL keywords plus the
    data `fields` (None: not known yet, only the always-passed keywords are checked)."""
    try:
        signature = inspect.signature(reward.fn)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read, its call tells
        return
    params = signature.parameters.values()
    positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if positional_only:
        raise ValueError(f"grpo.rewards: {reward.where()} takes '{positional_only[0]}' positionally only; rewards are "
                         f"called with keywords (prompts=, completions=, ...)")
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    passed = set(_ALWAYS) | (fields or set())
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        unused = sorted(passed - named)
        if unused:
            raise ValueError(f"grpo.rewards: {reward.where()} has no **kwargs but is called with every keyword, "
                             f"{', '.join(unused)} among them: add **kwargs to its signature")
    if fields is None:
        return
    required = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.default is p.empty and p.name not in passed]
    if required:
        have = ", ".join(sorted(passed - set(_RESERVED)))
        raise ValueError(f"grpo.rewards: {reward.where()} needs the data field '{required[0]}', which no record of "
                         f"{where or 'the data'} has (the fields it gets: {have}); add it to the records or give the "
                         f"parameter a default")


def check_reward_fields(rewards: list[Reward], fields, where: str = "") -> None:
    """Before the model loads: ValueError (one line, naming the reward, its file and the field) when a reward
    needs a data field that no record has, or has no **kwargs for the fields it would get. `fields`: the
    records' extra top-level keys (`Conversation.extra`); `where`: the data file, for the message."""
    for reward in rewards:
        _check_signature(reward, set(fields), where)


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
        what = "None" if output is None else f"a {type(output).__name__}"
        raise RewardError(f"{where}: returned {what}, expected a list of {num} values "
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


def _timeout_message(reward: Reward, step: int, what: str = "did not return") -> str:
    return (f"grpo.rewards: {reward.where()} {what} within {reward.timeout:g} s at step {step} "
            f"(grpo.reward_timeout; a hung call cannot be stopped and keeps running in a background thread)")


def _call(reward: Reward, kwargs: dict):
    """`reward.fn(**kwargs)`: in the calling thread, or for a user's reward with a time limit in a daemon worker
    thread waited for `reward.timeout` seconds (returns _TIMED_OUT when it has not returned by then)."""
    if reward.timeout is None or reward.source == "builtin" or inspect.iscoroutinefunction(reward.fn):
        return reward.fn(**kwargs)  # an async function only builds its coroutine here: limited when it runs
    box: dict = {}

    def target():
        try:
            box["output"] = reward.fn(**kwargs)
        except BaseException as error:  # noqa: BLE001 -- handed to the calling thread, which raises it
            box["error"] = error

    thread = threading.Thread(target=target, name=f"vltrain-reward-{reward.name}", daemon=True)
    thread.start()
    thread.join(reward.timeout)
    if thread.is_alive():
        return _TIMED_OUT
    if "error" in box:
        raise box["error"]
    return box["output"]


_TIMED_OUT = object()  # what a reward "returned" when it ran past its time limit


async def _gather(awaitables: list, timeouts: list[float | None], finished: set[int]) -> list:
    """Each awaitable's result or exception (or _TIMED_OUT past its limit: cancelled), run together; `finished`
    collects the indices that ended, so a caller that stops waiting can name the others."""
    async def one(i: int, awaitable, timeout: float | None):
        task = asyncio.ensure_future(awaitable)
        try:
            if timeout is None:
                return await task
            # asyncio.wait, not wait_for: a TimeoutError raised by the reward itself stays the reward's error
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                return _TIMED_OUT
            return task.result()
        finally:
            finished.add(i)

    return await asyncio.gather(*(one(i, a, t) for i, (a, t) in enumerate(zip(awaitables, timeouts))),
                                return_exceptions=True)


def _run_coroutines(awaitables: list, timeouts: list[float | None]) -> tuple[list | None, set[int]]:
    """(results in order, or None when the event loop itself did not finish in time; the finished indices)."""
    finished: set[int] = set()
    limits = [t for t in timeouts if t is not None]
    try:
        asyncio.get_running_loop()
        in_loop = True  # a loop runs in this thread (a notebook): it cannot be re-entered
    except RuntimeError:
        in_loop = False  # the usual case (a training loop)
    if not in_loop and not limits:
        return asyncio.run(_gather(awaitables, timeouts, finished)), finished
    # A fresh loop in a daemon helper thread: re-entry is avoided, and with limits a reward that blocks the loop
    # (a sync sleep in an async def, a task that ignores its cancellation) cannot block the caller past them.
    box: list = []
    thread = threading.Thread(target=lambda: box.append(asyncio.run(_gather(awaitables, timeouts, finished))),
                              name="vltrain-rewards", daemon=True)
    thread.start()
    thread.join(max(limits) + 1.0 if limits else None)
    return (box[0] if box else None), finished


def compute_rewards(rewards: list[Reward], *, prompts, completions, completion_ids, columns: dict[str, list],
                    trainer_state: dict, step: int) -> dict[str, list[float | None]]:
    """Call every reward on N completions; returns name -> N values (float or None), in `rewards` order.

    `columns` maps each record field (the reference answer as "assistant") to N values. Raises RewardError
    (one line, naming file, function and step) for a reward that raises, returns a wrong value or runs past its
    `timeout`, ValueError for inputs of different lengths or a column named like one of TRL's keywords."""
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
                output = _call(reward, {**kwargs, "trainer_state": {"step": step, **trainer_state}})
            except Exception as error:
                raise RewardError(f"grpo.rewards: {reward.where()} raised at step {step}: "
                                  f"{type(error).__name__}: {_one_line(error)}") from error
            if output is _TIMED_OUT:
                raise RewardError(_timeout_message(reward, step))
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
        outputs, finished = _run_coroutines([coroutine for _, coroutine in pending],
                                            [reward.timeout for reward, _ in pending])
        if outputs is None:  # the event loop is blocked: by one of the rewards that had not finished
            stuck = [reward for i, (reward, _) in enumerate(pending) if i not in finished] or [r for r, _ in pending]
            raise RewardError(_timeout_message(stuck[0], step, "blocked its event loop (no await) and did not return")
                              + (f"; also unfinished: {', '.join(r.where() for r in stuck[1:])}" if stuck[1:] else ""))
        for (reward, _), output in zip(pending, outputs):
            if output is _TIMED_OUT:
                raise RewardError(_timeout_message(reward, step))
            if isinstance(output, BaseException):
                if not isinstance(output, Exception):  # KeyboardInterrupt, SystemExit: not the reward's fault
                    raise output
                raise RewardError(f"grpo.rewards: {reward.where()} raised at step {step}: "
                                  f"{type(output).__name__}: {_one_line(output)}") from output
            results[reward.name] = _check_output(reward, output, num, step)
    unscored = sum(all(results[r.name][i] is None for r in rewards) for i in range(num))
    if unscored and not _warned_unscored:
        _warned_unscored.append(step)
        log.warning("grpo.rewards: every reward returned None for %d of %d completions at step %d: they get a total "
                    "reward of 0 (said once per process)", unscored, num, step)
    return {reward.name: results[reward.name] for reward in rewards}


_warned_unscored: list[int] = []  # the step of the first all-None completion (TRL warns about those too)


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
