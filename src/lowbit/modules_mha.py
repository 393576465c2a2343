"""``nn.MultiheadAttention`` with its projections as four ``nn.Linear`` children, so that lowbit
can quantize them.

PyTorch's ``nn.MultiheadAttention`` keeps the q / k / v projection as one parameter
(``in_proj_weight``) that ``F.multi_head_attention_forward`` reads directly: no quantized module
can stand in for it, so torch.ao's dynamic quantization leaves it float.
:class:`MultiheadAttentionLinears` is the same attention (the same weights, masks, dropout,
``need_weights`` / ``is_causal`` / ``batch_first`` semantics and outputs, up to float rounding)
with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as ordinary ``nn.Linear`` children.
lowbit swaps it in (:func:`expand_attention`) before planning, so the four projections are then
quantized, calibrated, reported, saved and loaded like any other Linear, in every mode.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit._qmodule import carry_hooks

__all__ = ["MultiheadAttentionLinears", "expand_attention", "mha_unsupported_reason"]


def mha_unsupported_reason(module: nn.Module) -> str | None:
    """Why an ``nn.MultiheadAttention`` cannot be re-expressed with Linear children, else None.

    Example:
        >>> mha_unsupported_reason(nn.MultiheadAttention(8, 2)) is None
        True
        >>> mha_unsupported_reason(nn.MultiheadAttention(8, 2, add_bias_kv=True))[:40]
        'MultiheadAttention with add_bias_kv=True'
    """
    if type(module) is not nn.MultiheadAttention:
        return f"{type(module).__name__} subclasses nn.MultiheadAttention; its forward may differ"
    if module.bias_k is not None or module.bias_v is not None:
        return "MultiheadAttention with add_bias_kv=True (extra key / value rows) stays float"
    if module.add_zero_attn:
        return "MultiheadAttention with add_zero_attn=True stays float"
    return None


class MultiheadAttentionLinears(nn.Module):
    """``nn.MultiheadAttention`` (same constructor arguments and ``forward``) whose projections
    are the ``nn.Linear`` children ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``, which
    lowbit quantizes like any Linear. ``in_proj_weight`` / ``in_proj_bias`` are None, so
    PyTorch's fused transformer fast paths (which read them) step aside.

    Example:
        >>> mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
        >>> lin = MultiheadAttentionLinears.from_float(mha)
        >>> x = torch.randn(2, 5, 16)
        >>> (y, w), (yf, wf) = lin(x, x, x), mha(x, x, x)
        >>> bool(torch.allclose(y, yf, atol=1e-5)), bool(torch.allclose(w, wf, atol=1e-6))
        (True, True)
    """

    in_proj_weight = None
    in_proj_bias = None
    bias_k = bias_v = None
    add_zero_attn = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None,
                 batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"MultiheadAttentionLinears: embed_dim={embed_dim} must be a positive "
                             f"multiple of num_heads={num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.head_dim = embed_dim // num_heads
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> MultiheadAttentionLinears:
        """The same attention as ``mha`` (its weights copied; training flag, device and dtype
        kept).

        Example:
            >>> type(MultiheadAttentionLinears.from_float(nn.MultiheadAttention(8, 2)).q_proj)
            <class 'torch.nn.modules.linear.Linear'>
        """
        reason = mha_unsupported_reason(mha)
        if reason is not None:
            raise ValueError(f"MultiheadAttentionLinears.from_float: {reason}")
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.out_proj.bias is not None,
                  mha.kdim, mha.vdim, mha.batch_first).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                weights = mha.in_proj_weight.chunk(3)
            else:
                weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases,
                                  strict=True):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)  # type: ignore[union-attr]
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)  # type: ignore[union-attr]
        return new.train(mha.training)

    def config(self) -> dict[str, Any]:
        """The constructor arguments (what a saved model records to rebuild this module)."""
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads,
                "dropout": self.dropout, "bias": self.out_proj.bias is not None,
                "kdim": self.kdim, "vdim": self.vdim, "batch_first": self.batch_first}

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward``: ``(attn_output, attn_weights or None)``."""
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:  # (L, E): one sequence
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed = query.shape
        src_len = key.shape[0]
        if embed != self.embed_dim:
            raise ValueError(f"MultiheadAttentionLinears: expected query with embed_dim "
                             f"{self.embed_dim}, got shape {tuple(query.shape)}")
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
            target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                               "Transformer module method `generate_square_subsequent_mask` to "
                               "create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention builds the causal mask
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                          other_name="", target_type=query.dtype,
                                          check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        heads, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(tgt_len, bsz * heads, hd).transpose(0, 1)
        k = self.k_proj(key).reshape(src_len, bsz * heads, hd).transpose(0, 1)
        v = self.v_proj(value).reshape(src_len, bsz * heads, hd).transpose(0, 1)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)  # (1, L, S)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            kpm = kpm.reshape(bsz * heads, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q * math.sqrt(1.0 / hd)
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))
            else:
                scores = torch.bmm(scores, k.transpose(-2, -1))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tgt_len * bsz, embed)
            out = self.out_proj(out).view(tgt_len, bsz, embed)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
        else:
            if attn_mask is not None:
                attn_mask = (attn_mask.unsqueeze(0) if attn_mask.size(0) == 1
                             else attn_mask.view(bsz, heads, -1, src_len))
            q4, k4, v4 = (t.view(bsz, heads, -1, hd) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, embed)
            out = self.out_proj(out).view(tgt_len, bsz, embed)
            weights = None
            if not batched:
                out = out.squeeze(1)
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")


def expand_attention(model: nn.Module) -> list[str]:
    """Replace, in place, every ``nn.MultiheadAttention`` of ``model`` that can be re-expressed
    (see :func:`mha_unsupported_reason`) with its :class:`MultiheadAttentionLinears`; the names
    replaced. A ``nn.TransformerEncoderLayer`` whose ``self_attn`` was replaced no longer takes
    PyTorch's fused path (it reads ``in_proj_weight``; see
    ``lowbit.traverse.disable_fused_fast_paths``).

    Example:
        >>> enc = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
        >>> expand_attention(enc), type(enc.self_attn).__name__
        (['self_attn'], 'MultiheadAttentionLinears')
    """
    done = []
    for name, module in list(model.named_modules()):
        if (name and isinstance(module, nn.MultiheadAttention)
                and mha_unsupported_reason(module) is None):
            model.set_submodule(name, carry_hooks(module, MultiheadAttentionLinears.from_float(
                module)))  # the user's hooks move with it
            done.append(name)
    return done
