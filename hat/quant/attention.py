"""Attention on J5: matmul of two activations, scaled_dot_product_attention and nn.MultiheadAttention.

float:     `FloatFunctional.matmul(x, y)` (torch.matmul). prepare_qat_fx rewrites `a @ b`, `torch.matmul`, `torch.bmm`,
           `a.matmul(b)`, `a.bmm(b)`, plain-matmul `torch.einsum` equations, `F.scaled_dot_product_attention` and
           `nn.MultiheadAttention` calls into it (hat/quant/fx_attention.py).
QAT:       torch.matmul of the dequantized inputs, output fake-quantized with an observed scale.
quantized: one kernel, `kernels.matmul`: the integer products summed exactly (int8 x int8 in float32 below 2^24, in
           chunks of K added in int64, or float64), saturated to int32 (the device's accumulator), then ONE
           requantization by s_x * s_y / s_out (int16 multiplier, round-half-up shift) to the observed output scale.
           The checker refuses a matmul whose worst sum K * max|x| * max|y| can overflow int32: qint8 x qint8 fits
           K <= 131071, qint8 x qint16 K <= 511, qint16 x qint16 only K = 1, so give the modules that make the two
           operands int8 qconfigs (the matmul's own output may be qint16).

Attention = matmul(q, k^T) * scale -> softmax(dim=-1) (hat.quant.softmax: exp table, int32 sum, mantissa table) ->
matmul(., v). The `* scale` is free: a QTensor times a number keeps its integers and scales its scale. A float
additive mask is an add (FloatFunctional) before the softmax; boolean masks and is_causal are refused, naming the
line: an integer softmax over saturated scores cannot give a masked position exactly zero weight. Dropout on the
attention weights is not applied (as everywhere in a quantized model).

nn.MultiheadAttention is rewritten in the graph (no eager replacement module): its packed in-projection becomes one
nn.Linear(E, 3E) holding the module's very in_proj_weight / in_proj_bias (QAT trains them), q, k and v are slices of
its output (so they share one output scale), heads are split by reshape + permute, and the module's own out_proj
finishes. Separate q/k/v weights (kdim/vdim != embed_dim) give three Linears holding q/k/v_proj_weight, with bias
copies (slices of in_proj_bias). key_padding_mask, is_causal, add_bias_kv and add_zero_attn are refused; the
attention weights (need_weights=True) may be returned by the call but not used.

A learned token expanded to the batch (`self.class_token.expand(x.shape[0], -1, -1)`, ViT) gets its QuantStub on the
parameter and `expand_batch` after it, so the program stays free of the example's batch size.
"""
from __future__ import annotations

from typing import Any

from hat.quant.qtensor import QTensor, apply


def expand_batch(x: Any, like: Any) -> Any:
    """`x` (batch 1: a learned token, quantized by its QuantStub) repeated along dim 0 to `like`'s batch size: the
    integers do not change (kernel `expand_batch`). A float `x` (the float model) is expanded as it is."""
    if not isinstance(x, QTensor):
        return x.expand(like.shape[0], *x.shape[1:])
    x = x._plain_op()
    if x.is_quantized:
        return apply("expand_batch", [x, like], {}, x.scale, x.dtype, x.producer)
    return x.with_data(x.data.expand(like.shape[0], *x.shape[1:]))
