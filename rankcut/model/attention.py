"""Self-attention with its projections as plain ``nn.Linear`` modules, so they can be observed and factorised.

``nn.MultiheadAttention`` keeps its query/key/value projection as one bare parameter (``in_proj_weight``)
and calls ``out_proj`` functionally, so no forward hook ever sees either output and no pair can replace
them. ``SplitAttention`` computes exactly the same function for self-attention (query, key and value the
same tensor) with ``qkv`` (E -> 3E) and ``out_proj`` (E -> E) as modules called on the tokens. Both are
then ordinary linear targets: a pair on ``out_proj`` is the usual one (its output is a plain linear
output), and a pair on ``qkv`` is a joint low-rank of the stacked query/key/value output, exact at full
rank. Per-head structures (a low rank of each head's ``W_q W_k^T`` or ``W_v W_o``) are not built.

The attention product is computed with explicit matrix products rather than
``scaled_dot_product_attention``: ``torch.utils.flop_counter`` counts neither that nor the fused
``nn.MultiheadAttention`` path on CPU, and MACs must be counted exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from rankcut.errors import RankcutError


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention``'s self-attention with ``qkv`` and ``out_proj`` as ``nn.Linear`` modules."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False):
        super().__init__()
        self.num_heads, self.dropout, self.batch_first = num_heads, dropout, batch_first
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not (query is key is value):
            raise RankcutError("SplitAttention computes self-attention only (query, key and value the same tensor)")
        x = query if self.batch_first else query.transpose(0, 1)  # (N, L, E)
        n, length, embed = x.shape
        heads = self.qkv(x).reshape(n, length, 3, self.num_heads, embed // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = heads[0], heads[1], heads[2]  # (N, H, L, d)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        scores = scores + _additive_mask(attn_mask, key_padding_mask, is_causal, n, self.num_heads, length, scores.dtype,
                                         scores.device)
        weights = scores.softmax(-1)
        attended = nn.functional.dropout(weights, self.dropout, self.training) @ v
        out = self.out_proj(attended.transpose(1, 2).reshape(n, length, embed))
        out = out if self.batch_first else out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


def _additive_mask(attn_mask, key_padding_mask, is_causal, n, heads, length, dtype, device) -> torch.Tensor:
    """``nn.MultiheadAttention``'s masks as one additive float mask broadcastable to (N, H, L, L).

    Boolean masks mark positions *not* to attend to (True = masked), as in ``nn.MultiheadAttention``.
    """
    def additive(mask):
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float("-inf"))
        return mask.to(dtype)

    total = torch.zeros((), dtype=dtype, device=device)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    if attn_mask is not None:
        total = total + (additive(attn_mask).reshape(n, heads, length, length) if attn_mask.dim() == 3
                         else additive(attn_mask))
    if key_padding_mask is not None:
        total = total + additive(key_padding_mask)[:, None, None, :]
    return total


def splittable(module: nn.Module) -> str | None:
    """Why ``module`` (an ``nn.MultiheadAttention``) cannot become a ``SplitAttention``, or None if it can."""
    if not module._qkv_same_embed_dim:
        return "its key/value widths differ from the query's (separate q/k/v weights)"
    if module.bias_k is not None or module.add_zero_attn:
        return "it adds learned key/value biases or zero attention (add_bias_kv, add_zero_attn)"
    return None


def split(module: nn.MultiheadAttention) -> SplitAttention:
    """A ``SplitAttention`` computing what ``module`` computes on self-attention, with its weights."""
    reason = splittable(module)
    if reason:
        raise RankcutError(f"cannot split this attention: {reason}")
    weight = module.in_proj_weight
    bias = module.in_proj_bias is not None
    new = SplitAttention(module.embed_dim, module.num_heads, module.dropout, bias, module.batch_first)
    new = new.to(weight.device, weight.dtype)
    with torch.no_grad():
        new.qkv.weight.copy_(weight)
        new.out_proj.weight.copy_(module.out_proj.weight)
        if bias:
            new.qkv.bias.copy_(module.in_proj_bias)
            new.out_proj.bias.copy_(module.out_proj.bias)
    return new.train(module.training)


def self_attention_layers(model: nn.Module, run) -> list[str]:
    """The ``nn.MultiheadAttention`` modules that ``run()`` calls as splittable self-attention, by name."""
    found: dict[str, bool] = {}
    handles = []

    def check(name):
        def hook(module, args, kwargs):
            q, k, v = (list(args) + [kwargs.get(a) for a in ("query", "key", "value")[len(args):]])[:3]
            ok = q is k is v and splittable(module) is None
            found[name] = found.get(name, True) and ok
        return hook

    try:
        for name, m in model.named_modules():
            if isinstance(m, nn.MultiheadAttention):
                handles.append(m.register_forward_pre_hook(check(name), with_kwargs=True))
        run()
    finally:
        for h in handles:
            h.remove()
    return [name for name, ok in found.items() if ok]
