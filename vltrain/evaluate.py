"""Generation-based evaluation: greedy answers vs the reference assistant reply (exact match).

The prompt is every turn before the last assistant turn; that turn's text is the reference. Replies
come from `vltrain.generation.generate` (greedy, left-padded batches of `batch_size`) and are compared
stripped. Under ZeRO-3 / FSDP every rank must call this with its own share of the conversations (see
vltrain.generation on sharded parameters); records and accuracy are then per rank.
"""

from __future__ import annotations

import dataclasses

from vltrain.data.formats import Conversation
from vltrain.data.media import MediaOptions
from vltrain.generation import GenerationSettings, generate


def prompt_and_answer(conv: Conversation) -> tuple[Conversation, str]:
    """(the conversation up to its last assistant turn, that turn's text)."""
    last = max((i for i, t in enumerate(conv.turns) if t.role == "assistant"), default=None)
    if last is None:
        raise ValueError(f"exact-match eval: sample {conv.sample_id!r} has no assistant turn to compare with")
    answer = "".join(p.value for p in conv.turns[last].parts if p.kind == "text")
    return dataclasses.replace(conv, turns=conv.turns[:last]), answer


def exact_match(prediction: str, reference: str) -> bool:
    """The one exact-match rule (the SFT recipe's held-out score, `vltrain generate`): equal once stripped."""
    return prediction.strip() == reference.strip()


def exact_match_accuracy(model, processor, conversations: list[Conversation], media: MediaOptions, *,
                         image_folder: str | None = None, system_prompt: str | None = None,
                         max_new_tokens: int = 16, show_progress: bool = True, batch_size: int = 16,
                         synced_gpus: bool | None = None) -> tuple[float, list[dict]]:
    """Fraction of conversations whose greedy reply to the prompt (all turns before the last assistant
    turn) equals that turn's text, compared stripped; returns (accuracy, per-sample records)."""
    prompts, answers = zip(*(prompt_and_answer(c) for c in conversations)) if conversations else ((), ())
    replies = generate(model, processor, list(prompts), GenerationSettings(max_new_tokens=max_new_tokens),
                       media=media, image_folder=image_folder, system_prompt=system_prompt, batch_size=batch_size,
                       show_progress=show_progress, synced_gpus=synced_gpus)
    records = []
    for conv, answer, reply in zip(conversations, answers, replies):
        text = reply.text.strip()
        records.append({"id": conv.sample_id, "answer": answer.strip(), "reply": text, "correct": exact_match(text, answer),
                        "finish_reason": reply.finish_reason})
    return sum(r["correct"] for r in records) / max(1, len(records)), records
