"""Fused linear cross-entropy: the LM loss computed from hidden states without full logits.

Patches, on one model instance:
- the top-level `forward` (ForConditionalGeneration): with `labels` it runs the inner `self.model`,
  keeps the hidden states of supervised positions only, and asks `self.lm_head` for the summed
  cross-entropy; `logits` is None. Without `labels` (or with `logits_to_keep`) it is the stock forward,
  so generation is unchanged.
- `lm_head.forward`: accepts an optional `ce_targets`; given it, returns the fp32 sum of the
  cross-entropy instead of logits. The loss goes through `lm_head.__call__`, so the weight is gathered
  by ZeRO-3 / unsharded by FSDP exactly when the stock `lm_head(hidden)` call would be.

The loss follows the HF contract: labels are shifted inside (or `shift_labels` is taken as given),
-100 is ignored, the result is sum / `num_items_in_batch` when that kwarg is passed, else the mean over
supervised tokens. MoE families add `router_aux_loss_coef * aux_loss` as their stock forward does.

On CUDA the op is liger's `LigerFusedLinearCrossEntropyLoss` (fp32 accumulation). Elsewhere it is a
chunked torch loop: logits for a chunk of tokens are computed under `torch.utils.checkpoint`, so only
one chunk of logits is alive in forward or backward. The chunk matmul runs in the weight dtype and the
softmax in fp32, as the stock path does.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vltrain.data.encode import IGNORE_INDEX

LOGITS_PER_CHUNK = 2**26  # fp32 logits elements alive at once in the torch fallback (256 MiB)


def _liger_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _ce_sum_chunk(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_linear_cross_entropy_sum(hidden, weight, bias, targets, chunk_size: int | None = None):
    """Sum over rows of CE(hidden @ weight.T + bias, targets), one checkpointed chunk at a time.

    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) with no ignored entries -> fp32 scalar.
    """
    chunk_size = chunk_size or max(1, LOGITS_PER_CHUNK // weight.shape[0])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        total = total + checkpoint(_ce_sum_chunk, hidden[rows], weight, bias, targets[rows], use_reentrant=False)
    return total


def linear_cross_entropy_sum(hidden, weight, bias, targets):
    """Summed fp32 cross-entropy of `hidden @ weight.T (+ bias)` against `targets` (N,), -100 ignored."""
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    if targets.numel() == 0:  # keeps the graph connected so every rank runs the same backward
        zero = hidden.sum() * 0.0 + weight.sum() * 0.0
        return zero.float()
    if _liger_available(hidden.device):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum", accum_dtype=torch.float32)
        return loss_fn(weight, hidden, targets, bias).float()
    return chunked_linear_cross_entropy_sum(hidden, weight, bias, targets)


def _lm_head_forward(self, input, ce_targets=None):
    if ce_targets is None:
        return F.linear(input, self.weight, self.bias)
    return linear_cross_entropy_sum(input, self.weight, self.bias, ce_targets)


def _output_class(model):
    """The stock forward's output class: the family's own MoE output, else the multimodal one."""
    from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast

    module = sys.modules[type(model).__module__]
    name = type(model).__name__.replace("ForConditionalGeneration", "CausalLMOutputWithPast")
    return getattr(module, name, MultimodalCausalLMOutputWithPast)


def _fused_ce_forward(self, stock_forward, *args, **kwargs):
    names = [p for p in inspect.signature(stock_forward).parameters if p != "self"]
    kwargs.update(zip(names, args))  # positional arguments, by the stock signature's order
    labels = kwargs.pop("labels", None)
    if labels is None or kwargs.get("logits_to_keep"):
        return stock_forward(self, labels=labels, **kwargs)

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    return_dict = kwargs.pop("return_dict", True)
    kwargs.pop("logits_to_keep", None)
    text_config = self.config.text_config
    moe = "output_router_logits" in names
    if moe and kwargs.get("output_router_logits") is None:
        kwargs["output_router_logits"] = text_config.output_router_logits

    outputs = self.model(**kwargs)
    hidden = outputs[0]
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    loss_sum = self.lm_head(hidden.reshape(-1, hidden.shape[-1]), ce_targets=targets)
    if num_items_in_batch is None:
        loss = loss_sum / (targets != IGNORE_INDEX).sum()
    else:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device)
        loss = loss_sum / num_items_in_batch

    output_class = _output_class(self)
    fields = {f.name for f in dataclasses.fields(output_class)} - {"loss", "logits"}
    # cache, hidden_states, attentions, image/video outputs, router_logits: as the stock forward passes on
    passed = {k: v for k, v in outputs.items() if k in fields}
    if moe:
        aux_loss = None
        if kwargs["output_router_logits"]:
            load_balancing_loss_func = sys.modules[type(self).__module__].load_balancing_loss_func
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, text_config.num_experts, text_config.num_experts_per_tok,
                kwargs.get("attention_mask"),
            )
            loss = loss + text_config.router_aux_loss_coef * aux_loss.to(loss.device)
        passed["aux_loss"] = aux_loss
    result = output_class(loss=loss, logits=None, **passed)
    return result if return_dict else result.to_tuple()


def patch_fused_linear_ce(model) -> list[str]:
    """Patch `model.forward` and `model.lm_head.forward` on this instance; [] if already patched."""
    lm_head = model.lm_head
    if not isinstance(lm_head, torch.nn.Linear):
        raise ValueError(f"fused_linear_ce needs lm_head to be an nn.Linear, got {type(lm_head).__name__}")
    if "forward" in model.__dict__:
        if getattr(model.forward, "_vltrain_fused_ce", False):
            return []
        raise ValueError(f"{type(model).__name__}.forward is already replaced on this instance by something else")
    stock_forward = type(model).forward

    @functools.wraps(stock_forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, **kwargs):
        return _fused_ce_forward(self, stock_forward, *args, **kwargs)

    forward._vltrain_fused_ce = True
    # Bound methods on the instance: nothing changes for the class, and deepcopy rebinds them.
    lm_head.forward = types.MethodType(_lm_head_forward, lm_head)
    model.forward = types.MethodType(forward, model)
    return [f"fused_linear_ce: {type(model).__name__}.forward", "fused_linear_ce: lm_head.forward"]
