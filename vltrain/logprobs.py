"""Log-probabilities of given target tokens, with gradients, without ever building (tokens x vocab) logits.

DPO needs log p(completion) per sequence for a policy and a reference model; GRPO needs it per token
(and logs the entropy). Both run on padded batches (B, L) and on packed rows (vltrain.data.packing: one
row holding several examples, position_ids (4, 1, L) whose row 0 restarts at 0 at every example).

How: for the duration of one call, THIS instance's `lm_head.forward` is replaced by a bound method that
takes the hidden states the model's own forward hands it, keeps the positions that have a target, and
returns fp32 log-probs of the targets (and optionally the entropy) scattered back into (B, L), so the
forward's `logits` field holds them. The model is called through its top-level forward, without
`labels`: FSDP2 unshards the root's own parameters (lm_head's weight among them) only there, and
ZeRO-3 gathers `lm_head.weight` only inside `lm_head.__call__`, which is exactly where this runs. The
previous `lm_head.forward` instance attribute (e.g. the fused_linear_ce kernel's) is put back
afterwards, so the two compose in either order, and a `copy.deepcopy` (a DPO reference) has nothing
of this left on it. Checked under 2-process ZeRO-3 and FSDP2 on CPU (tests/test_logprobs.py, slow).

Inside, tokens are taken in chunks of `chunk_size` (default: 2**26 fp32 logits elements, as fused_ce);
each chunk computes `hidden @ W.T (+ b)` in the weight dtype, then in fp32 `/ temperature`,
log_softmax and a gather, under non-reentrant `torch.utils.checkpoint`, so one chunk of logits is
alive at a time in forward and in backward (it is recomputed there). Measured on an H200 (torch 2.11,
bf16, 16,384 targets, hidden 3584, vocab 151,936, `chunked_target_logprobs` alone, forward + backward):
3.2 GiB peak extra memory and 185 ms, against 27.8 GiB and 107 ms for full logits + log_softmax;
values identical, gradients within bf16 rounding (relative 8e-4 for the hidden states, 2.7e-3 for
the weight, whose per-chunk gradients autograd sums in the weight's dtype).

The chunked torch path runs on every device. liger's fused linear cross-entropy is not used: it has no
temperature, and whether its per-token (`reduction="none"`) backward is right for arbitrary per-token
weights has not been checked on a GPU for this project.

Batches: what PadCollator / PackCollator produce; keys that are not model inputs (skip records, ids,
rewards, ...) are ignored. A batch without images or videos gets a dummy one appended
(vltrain.vision.complete_modalities, as sft_loss does), so every rank runs the vision tower; the
appended columns are cut off the result. Padded vs packed: a batch with `position_ids` and no
`attention_mask` is packed, and its examples start wherever text position (row 0) is 0; any other
batch has one sequence per row. The first token of every sequence gets no log-prob (0, not counted):
nothing, or another packed example, precedes it.

Entropy (`token_logprobs_and_entropy`, for GRPO's logs or an entropy bonus) comes from the same chunk
of logits, with gradients: one more reduction over the vocab per chunk, no extra memory held.
"""

from __future__ import annotations

import types
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vltrain.data.encode import IGNORE_INDEX
from vltrain.families import get_module
from vltrain.kernels.fused_ce import LOGITS_PER_CHUNK
from vltrain.progress import model_inputs
from vltrain.vision import complete_modalities, link_dummy_features

__all__ = ["token_logprobs", "token_logprobs_and_entropy", "sequence_logprobs", "sequence_ids",
           "chunked_target_logprobs"]


# ------------------------------------------------------------------------------- the chunked op
def _chunk_logprobs(hidden, weight, bias, targets, temperature: float, with_entropy: bool):
    logits = F.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets[:, None]).squeeze(-1)
    if not with_entropy:
        return picked
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.stack([picked, entropy], dim=-1)


def chunked_target_logprobs(hidden, weight, bias, targets, *, temperature: float = 1.0,
                            chunk_size: int | None = None, with_entropy: bool = False) -> torch.Tensor:
    """log softmax((hidden @ weight.T + bias) / temperature)[targets], one checkpointed chunk at a time.

    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) in [0, V) -> fp32 (N,), or (N, 2)
    holding (log-prob, entropy of the tempered distribution) with `with_entropy`.
    """
    chunk_size = chunk_size or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        pieces.append(checkpoint(_chunk_logprobs, hidden[rows], weight, bias, targets[rows], temperature,
                                 with_entropy, use_reentrant=False))
    if not pieces:
        return hidden.new_zeros((0, 2) if with_entropy else (0,), dtype=torch.float32)
    return torch.cat(pieces)


def _scattered_logprobs(head, hidden, request: dict) -> torch.Tensor:
    """hidden (B, L, H) -> fp32 (B, L) [or (B, L, 2)]: values at positions with a target, 0 elsewhere."""
    targets = request["targets"]
    assert hidden.shape[:-1] == targets.shape, (hidden.shape, targets.shape)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).to(hidden.device)
    keep = (flat_targets != IGNORE_INDEX).nonzero().squeeze(-1)
    values = chunked_target_logprobs(
        flat_hidden[keep], head.weight, head.bias, flat_targets[keep], temperature=request["temperature"],
        chunk_size=request["chunk_size"], with_entropy=request["with_entropy"],
    )
    tail = values.shape[1:]
    out = torch.zeros(flat_targets.shape[0], *tail, dtype=torch.float32, device=hidden.device)
    out = out.index_put((keep,), values)
    if keep.numel() == 0:  # keeps the graph connected, so every rank runs the same backward
        out = out + (flat_hidden.sum() * 0.0 + head.weight.sum() * 0.0).float()
    return out.reshape(*targets.shape, *tail)


def _resolve_head(base) -> torch.nn.Linear:
    """The nn.Linear computing the logits (through a peft `modules_to_save` wrapper if lm_head has one)."""
    head = base.lm_head
    wrapped = getattr(head, "modules_to_save", None)
    if wrapped is not None and getattr(head, "active_adapter", None) in wrapped:
        head = wrapped[head.active_adapter]
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"token log-probs need lm_head to be an nn.Linear, got {type(head).__name__}")
    return head


@contextmanager
def _logprob_head(head: torch.nn.Linear, request: dict):
    """While active, `head(...)` returns target log-probs (see module docstring) for exactly one call."""
    missing = object()
    previous = head.__dict__.get("forward", missing)
    current = head.forward  # the class's, or an instance patch such as fused_ce's (kept for other calls)

    def forward(self, input, *args, **kwargs):
        if request.get("done") or args or kwargs:
            return current(input, *args, **kwargs)
        request["done"] = True
        return _scattered_logprobs(self, input, request)

    head.forward = types.MethodType(forward, head)
    try:
        yield
    finally:
        if previous is missing:
            del head.forward
        else:
            head.forward = previous


# ------------------------------------------------------------------------------- batches
def _check_batch(batch: dict) -> None:
    labels, ids = batch.get("labels"), batch.get("input_ids")
    if labels is None or ids is None:
        raise ValueError(f"batch needs 'input_ids' and 'labels' for log-probs; it has {sorted(batch)}")
    if labels.shape != ids.shape or labels.dim() != 2:
        raise ValueError(f"batch 'labels' {tuple(labels.shape)} must match 'input_ids' {tuple(ids.shape)} (B, L)")


def _check_options(temperature: float, chunk_size: int | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for the default), got {chunk_size}")


def _forward_logprobs(model, batch: dict, temperature: float, chunk_size: int | None, with_entropy: bool):
    _check_batch(batch)
    _check_options(temperature, chunk_size)
    length = batch["input_ids"].shape[1]
    unwrapped = getattr(model, "module", model)  # DDP / DeepSpeed engine
    batch = dict(batch, labels=_predictable_labels(batch))
    batch, added = complete_modalities(unwrapped, batch)
    inputs = model_inputs(batch, labels=False)  # labels would make the forward compute a loss
    # position t's hidden state predicts labels[t + 1] (HF's shift)
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    request = dict(targets=targets, temperature=float(temperature), chunk_size=chunk_size, with_entropy=with_entropy)
    head = _resolve_head(get_module(unwrapped, ""))
    with _logprob_head(head, request), (link_dummy_features(unwrapped) if added else nullcontext()):
        values = model(**inputs).logits
    if not request.get("done"):
        raise RuntimeError(f"{type(unwrapped).__name__}.forward never called lm_head; cannot compute log-probs")
    values = values[:, :length]
    # shift back: out[:, t] = log p(labels[:, t] | tokens < t); out[:, 0] = 0
    return F.pad(values[:, :-1], (0, 0, 1, 0) if with_entropy else (1, 0))


def token_logprobs(model, batch: dict, *, temperature: float = 1.0, chunk_size: int | None = None) -> torch.Tensor:
    """Per-token log-probs of `batch["labels"]`, with gradients: fp32 (B, L).

    out[b, t] = log softmax(logits[b, t - 1] / temperature)[labels[b, t]] where labels[b, t] != -100,
    else 0 (so out[:, 0] == 0, and 0 at the first token of every packed example: it is not predicted
    from the example before it). `batch`: a padded (B, L) or packed (1, L) batch from the collators;
    `chunk_size`: tokens per chunk of logits (default: 2**26 / vocab).
    """
    return _forward_logprobs(model, batch, temperature, chunk_size, with_entropy=False)


def token_logprobs_and_entropy(model, batch: dict, *, temperature: float = 1.0,
                               chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (B, L), entropy (B, L)), both fp32 with gradients, aligned as in `token_logprobs`.

    entropy[b, t] is that of the tempered next-token distribution the log-prob at [b, t] is drawn
    from (0 where labels[b, t] == -100). It costs one extra pass over each chunk's vocab, no memory.
    """
    both = _forward_logprobs(model, batch, temperature, chunk_size, with_entropy=True)
    return both[..., 0], both[..., 1]


def sequence_ids(batch: dict) -> tuple[torch.Tensor, int]:
    """(sequence index of every position (B, L) long, number of sequences S).

    Padded batches (an `attention_mask`, or no `position_ids`): row b is sequence b. Packed rows
    (`position_ids` (4, B, L) or (B, L) and no `attention_mask`): a sequence starts at every row start
    and wherever text position (row 0) is 0, numbered in order of appearance.
    """
    ids = batch["input_ids"]
    rows, length = ids.shape
    positions = batch.get("position_ids")
    if positions is None or batch.get("attention_mask") is not None:
        return torch.arange(rows, device=ids.device)[:, None].expand(rows, length), rows
    if positions.dim() == 3:
        if positions.shape[0] != 4:
            raise ValueError(f"packed batch 'position_ids' {tuple(positions.shape)} needs 4 rows (text, T, H, W)")
        positions = positions[0]
    if positions.shape != ids.shape:
        raise ValueError(f"batch 'position_ids' text row {tuple(positions.shape)} must match 'input_ids' "
                         f"{tuple(ids.shape)}")
    starts = positions == 0
    starts[:, 0] = True
    seq = starts.reshape(-1).long().cumsum(0).reshape(rows, length) - 1
    return seq.to(ids.device), int(seq[-1, -1]) + 1


def _predictable_labels(batch: dict) -> torch.Tensor:
    """`labels` with -100 where a sequence starts: nothing (or another packed example) precedes it."""
    seq, _ = sequence_ids(batch)
    starts = torch.ones_like(seq, dtype=torch.bool)
    starts[:, 1:] = seq[:, 1:] != seq[:, :-1]
    return batch["labels"].masked_fill(starts.to(batch["labels"].device), IGNORE_INDEX)


def sequence_logprobs(model, batch: dict, *, temperature: float = 1.0,
                      chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target log-probs per sequence fp32 (S,), supervised tokens per sequence long (S,)).

    S = B for padded rows; for packed rows S = the number of packed examples, in order of appearance
    (see `sequence_ids`). Same options as `token_logprobs`; a sequence without targets gives (0, 0).
    """
    seq, num_sequences = sequence_ids(batch)
    logp = token_logprobs(model, batch, temperature=temperature, chunk_size=chunk_size)
    seq = seq.to(logp.device).reshape(-1)
    supervised = (_predictable_labels(batch) != IGNORE_INDEX).to(logp.device).reshape(-1)
    logp_sum = logp.new_zeros(num_sequences).index_add(0, seq, logp.reshape(-1))
    num_tokens = torch.zeros(num_sequences, dtype=torch.long, device=logp.device).index_add(0, seq, supervised.long())
    return logp_sum, num_tokens
