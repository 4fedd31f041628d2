"""Rewards for the GRPO demo on the synthetic shapes data (vltrain/synthetic.py): questions "What colour is the
shape?" / "What shape is in the image?", reference answers one word ("red", "circle").

A user-style reward file: plain python, no vltrain import. Use it with

    grpo.rewards: [recipes/rewards/shapes_rewards.py]

which picks both functions below by their "_reward" suffix, in this order (weights: `grpo.reward_weights:
[1.0, 0.2]`, one per function). Each is called as TRL calls rewards, with keywords only:
`completions` (one `[{"role": "assistant", "content": text}]` per completion; a plain string works too),
`assistant` (the reference answer: a string or an assistant message), and more that `**kwargs` takes.
"""

import string


def _text(value):
    """The text of a string, a message dict, or a list of messages (the last one)."""
    if isinstance(value, (list, tuple)):
        value = value[-1] if value else ""
    if isinstance(value, dict):
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


def shape_answer_reward(completions, assistant, **kwargs):
    """1.0 when the completion's first word (casefolded, punctuation stripped) is the reference answer."""
    scores = []
    for completion, reference in zip(completions, assistant):
        words = _text(completion).split()
        first = words[0].strip(string.punctuation).casefold() if words else ""
        scores.append(1.0 if first and first == _text(reference).strip().casefold() else 0.0)
    return scores


def brevity_reward(completions, **kwargs):
    """1.0 when the completion has at most 3 words, else 0.0."""
    return [1.0 if len(_text(completion).split()) <= 3 else 0.0 for completion in completions]
