"""Generation-based evaluation: greedy answers vs the reference assistant reply (exact match)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from vltrain.data.encode import process_conversation
from vltrain.data.formats import Conversation
from vltrain.data.media import MediaOptions


def _prompt_and_answer(conv: Conversation) -> tuple[Conversation, str]:
    last = max(i for i, t in enumerate(conv.turns) if t.role == "assistant")
    answer = "".join(p.value for p in conv.turns[last].parts if p.kind == "text")
    return Conversation(conv.sample_id, conv.turns[:last]), answer


@torch.no_grad()
def exact_match_accuracy(model, processor, conversations: list[Conversation], media: MediaOptions, *,
                         image_folder: str | None = None, system_prompt: str | None = None,
                         max_new_tokens: int = 16, show_progress: bool = True) -> tuple[float, list[dict]]:
    """Fraction of conversations whose greedy reply to the prompt (all turns before the last assistant
    turn) equals that turn's text, compared stripped; returns (accuracy, per-sample records)."""
    model.eval()
    device = next(model.parameters()).device
    records = []
    for conv in tqdm(conversations, desc="exact-match eval", disable=not show_progress):
        prompt, answer = _prompt_and_answer(conv)
        inputs = process_conversation(prompt, processor, media, image_folder=image_folder, system_prompt=system_prompt,
                                      add_generation_prompt=True).to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        reply = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        records.append({"id": conv.sample_id, "answer": answer.strip(), "reply": reply,
                        "correct": reply == answer.strip()})
    model.train()
    return sum(r["correct"] for r in records) / max(1, len(records)), records
