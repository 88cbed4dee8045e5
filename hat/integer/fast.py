"""The fast executor: each node's weights prepacked once, conv2d / linear as int8 GEMMs, bit-exact with the reference.

`prepare(op, params)` returns a callable of the node's runtime inputs. conv2d and linear on int8 CPU inputs run as
int8 x int8 -> int32 GEMMs (torch._int_mm: exact integer sums; im2col rows in channels-last order, 1x1 convs
without im2col), grouped convs one GEMM per group; depthwise convs in int32 (hat::depthwise_conv2d); int16 inputs
as the reference's exact float convs. One fused pass (hat::gemm_epilogue) then adds the bias, saturates to int32,
applies relu and requantizes. The add of two activations is one fused pass too (hat::add_requantize), max pooling a
running maximum over taps. Convs return channels-last tensors, which the next conv reads without a copy.

Everything else runs the reference kernel (hat.integer.kernels), which defines the arithmetic: other ops, other
devices, no compiled hat._C, a layer whose int32 sums could overflow, and machines whose int8 GEMM fails the
exactness probe (`int8_gemm_is_exact`: a GEMM built on 16-bit intermediate sums saturates). Tests hold the two
bit-exact.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from hat.integer import kernels
from hat.integer.profile import TORCH_DTYPES, dtype_name, qrange
from hat.ops import extension_status

INT32_MIN, INT32_MAX = qrange("qint32")
MAX_GEMM_GROUPS = 64  # more groups run the float conv: that many tiny GEMMs cost more than they save


class Executor(Protocol):
    params: dict  # the node's parameters, as the reference kernel takes them

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...

    def path(self, *inputs: torch.Tensor) -> str:
        """How these inputs are computed: "int8 GEMM", "depthwise", "exact float", "fused add", "tap maximum" or
        "reference"."""


def prepare(op: str, params: dict) -> Executor:
    """The fastest exact executor of one node: a callable of its runtime inputs, weights prepacked."""
    if op in FAST_EXECUTORS and extension_status().loaded:
        weight = params.get("weight")
        if weight is None or (weight.device.type == "cpu" and weight.dtype == torch.int8):
            return FAST_EXECUTORS[op](op, params)
    return _Reference(op, params)


class _Reference:
    """The reference kernel with the node's parameters bound."""

    def __init__(self, op: str, params: dict):
        self.kernel, self.params = kernels.KERNELS[op], params

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.kernel(*inputs, **self.params)

    def path(self, *inputs: torch.Tensor) -> str:
        return "reference"


@lru_cache(maxsize=None)
def int8_gemm_is_exact() -> bool:
    """Whether torch._int_mm sums int8 products exactly in int32 on this machine, probed at the patterns that break
    GEMMs built on saturating 16-bit pair sums (u8 x s8 + u8 x s8 beyond 32767), up to sums just below 2^31."""
    generator = torch.Generator().manual_seed(0)
    cases = [(torch.full((16, k), a, dtype=torch.int8), torch.full((k, 8), b, dtype=torch.int8))
             for k in (64, 131071) for a, b in ((127, -128), (-128, -128), (127, 127), (-128, 127))]
    cases.append((torch.randint(-128, 128, (33, 300), generator=generator, dtype=torch.int8),
                  torch.randint(-128, 128, (300, 17), generator=generator, dtype=torch.int8)))
    try:
        return all(torch.equal(torch._int_mm(x, w).long(), x.long() @ w.long()) for x, w in cases)
    except RuntimeError:  # no int8 GEMM in this build of torch
        return False


class _GemmLayer(_Reference):
    """conv2d / linear with its weight prepacked and its epilogue constants computed once."""

    def __init__(self, op: str, params: dict):
        super().__init__(op, params)
        weight = params["weight"]
        out_channels = weight.shape[0]
        self.epilogue = _epilogue_constants(out_channels, *(params[k] for k in (
            "bias", "relu", "multiplier", "shift", "acc_max", "out_max", "out_dtype")))
        self.groups = groups = int(params.get("groups", 1))
        gemm_shaped = groups == 1 or (groups <= MAX_GEMM_GROUPS and weight.shape[1] > 1)  # not depthwise
        # _int_mm sums in int32 and wraps: exact only while no sum of int8 products (bias aside) can leave int32
        self.gemm = gemm_shaped and kernels.accumulator_bound(weight, "qint8") <= INT32_MAX and int8_gemm_is_exact()
        # [groups, K, O / groups] as transposed views of [O / groups, K] rows: _int_mm's fastest operand layout
        rows = weight.reshape(out_channels, -1) if weight.ndim == 2 else weight.permute(0, 2, 3, 1)
        rows = rows.reshape(groups, out_channels // groups, -1).contiguous()
        self.matrices = [rows[g].t() for g in range(groups)] if self.gemm else []

    def path(self, x: torch.Tensor) -> str:
        if x.device.type != "cpu":
            return "reference"
        return "int8 GEMM" if self.gemm and x.dtype == torch.int8 else "exact float"

    def finish(self, acc: torch.Tensor) -> torch.Tensor:
        """[rows, O] accumulator -> [rows, O] outputs: bias, int32 saturation, relu, requantization."""
        return torch.ops.hat.gemm_epilogue(acc, *self.epilogue)

    def gemm_sums(self, rows: torch.Tensor, group_width: int) -> torch.Tensor:
        """int8 rows [M, groups * K] (group-major within K) -> exact int32 sums [M, O]."""
        if self.groups == 1:
            return torch._int_mm(rows, self.matrices[0])
        return torch.cat([torch._int_mm(part.contiguous(), m) for part, m in
                          zip(rows.split(group_width, dim=1), self.matrices)], dim=1)


class _Conv2d(_GemmLayer):
    def __init__(self, op: str, params: dict):
        super().__init__(op, params)
        weight = params["weight"]
        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation = (_pair(params[k]) for k in ("stride", "padding", "dilation"))
        self.float_weight = weight.float()
        self.plans: dict[torch.dtype, dict] = {}  # accumulate_plan per input dtype
        # one filter per channel: hat::depthwise_conv2d sums in int32 where the bound allows it (int8 and int16)
        depthwise = self.groups > 1 and weight.shape[1] == 1 and weight.shape[0] == self.groups
        self.depthwise_dtypes = {TORCH_DTYPES[d] for d in ("qint8", "qint16")
                                 if depthwise and kernels.accumulator_bound(weight, d) <= INT32_MAX}
        self.depthwise_weight = weight[:, 0].permute(1, 2, 0).to(torch.int32).contiguous() if depthwise else None

    def path(self, x: torch.Tensor) -> str:
        return "depthwise" if x.device.type == "cpu" and x.dtype in self.depthwise_dtypes else super().path(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return kernels.conv2d(x, **self.params)
        n = x.shape[0]
        if x.dtype in self.depthwise_dtypes:
            out = torch.ops.hat.depthwise_conv2d(x.contiguous(memory_format=torch.channels_last),
                                                 self.depthwise_weight, self.stride, self.padding, self.dilation,
                                                 *self.epilogue)
            height, width = _conv_size(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation)
            return out.view(n, height, width, out.shape[1]).permute(0, 3, 1, 2)
        if self.gemm and x.dtype == torch.int8:
            rows, height, width = self._im2col(x)
            acc = self.gemm_sums(rows, rows.shape[1] // self.groups)
        else:  # int16 inputs, channel multipliers, many groups: the reference's exact float sums
            acc = self._float_sums(x)
            height, width = acc.shape[2:]
            acc = acc.permute(0, 2, 3, 1).reshape(-1, acc.shape[1])
        out = self.finish(acc)
        return out.view(n, height, width, out.shape[1]).permute(0, 3, 1, 2)

    def _float_sums(self, x: torch.Tensor) -> torch.Tensor:
        """The reference's exact float sums; one float32 conv, when exact, hands its float32 integers on as they are."""
        p = self.params
        plan = self.plans.get(x.dtype) or self.plans.setdefault(
            x.dtype, kernels.accumulate_plan(p["weight"], dtype_name(x.dtype), self.groups))
        if plan == {"accumulate": "float32", "splits": 1}:
            return F.conv2d(x.float(), self.float_weight, None, self.stride, self.padding, self.dilation, self.groups)
        return kernels.conv_sums(x, p["weight"], self.stride, self.padding, self.dilation, self.groups, plan)

    def _im2col(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """int8 [N, C, H, W] -> rows [N * H_out * W_out, kh * kw * C] (per group: its channels at each tap,
        groups outermost), the zero padding being the zero point of every grid."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        if self.groups == 1 and (kh, kw, sh, sw, ph, pw) != (1, 1, 1, 1, 0, 0):  # hat::im2col copies channel runs
            height, width = _conv_size(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation)
            rows = torch.ops.hat.im2col(x.contiguous(memory_format=torch.channels_last), self.kernel_size,
                                        self.stride, self.padding, self.dilation)
            return rows, height, width
        nhwc = x.permute(0, 2, 3, 1)
        if ph or pw:
            nhwc = F.pad(nhwc, (0, 0, pw, pw, ph, ph))
        n, h, w, c = nhwc.shape
        height, width = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if (kh, kw, sh, sw) == (1, 1, 1, 1) and nhwc.is_contiguous():
            return nhwc.reshape(-1, c), height, width
        s_n, s_h, s_w, s_c = nhwc.stride()
        windows = nhwc.as_strided((n, height, width, kh, kw, c), (s_n, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c))
        if self.groups > 1:  # group-major: [..., groups, kh, kw, C / groups]
            windows = windows.unflatten(-1, (self.groups, -1)).permute(0, 1, 2, 5, 3, 4, 6)
        return windows.reshape(n * height * width, -1), height, width


class _Linear(_GemmLayer):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return kernels.linear(x, **self.params)
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if self.gemm and x.dtype == torch.int8:
            acc = self.gemm_sums(rows, rows.shape[1])
        else:
            acc = kernels.linear_sums(rows, self.params["weight"])
        return self.finish(acc).reshape(*x.shape[:-1], -1)


class _Add(_Reference):
    """The J5 add in one fused pass (hat::add_requantize) when x and y share shape and layout, else the reference."""

    def __init__(self, op: str, params: dict):
        super().__init__(op, params)
        qmin, qmax = qrange(params["out_dtype"])
        self.args = tuple(int(params[k]) for k in ("x_shift", "x_sign", "y_multiplier", "multiplier", "shift")) + \
            (qmin, qmax, TORCH_DTYPES[params["out_dtype"]])

    def _fused(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.shape == y.shape and x.stride() == y.stride()
                and x.dtype in _ACTIVATIONS and y.dtype in _ACTIVATIONS and _dense(x))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.ops.hat.add_requantize(x, y, *self.args) if self._fused(x, y) else super().__call__(x, y)

    def path(self, x: torch.Tensor, y: torch.Tensor) -> str:
        return "fused add" if self._fused(x, y) else "reference"


class _MaxPool2d(_Reference):
    """max_pool2d as the running maximum of its kernel taps over channels-last data: each tap a strided view of the
    input padded with the dtype's minimum (never a window's maximum), one vectorized pass per tap."""

    def __init__(self, op: str, params: dict):
        super().__init__(op, params)
        self.kernel_size = _pair(params["kernel_size"])
        self.stride = _pair(params["stride"] or params["kernel_size"])
        self.padding, self.dilation = _pair(params["padding"]), _pair(params["dilation"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.ndim != 4:
            return super().__call__(x)
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        out_h, out_w = (_pool_size(size, k, s, p, d, self.params["ceil_mode"])
                        for size, k, s, p, d in ((h, kh, sh, ph, dh), (w, kw, sw, pw, dw)))
        below, right = (max(0, (o - 1) * s + d * (k - 1) + 1 - p - size)
                        for o, s, d, k, p, size in ((out_h, sh, dh, kh, ph, h), (out_w, sw, dw, kw, pw, w)))
        padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, right, ph, below), value=torch.iinfo(x.dtype).min)
        s_n, s_h, s_w, s_c = padded.stride()
        out = None
        for i in range(kh):
            for j in range(kw):
                tap = padded.as_strided((n, out_h, out_w, c), (s_n, s_h * sh, s_w * sw, s_c),
                                        padded.storage_offset() + i * dh * s_h + j * dw * s_w)
                out = tap.clone(memory_format=torch.contiguous_format) if out is None else \
                    torch.maximum(out, tap, out=out)
        return out.permute(0, 3, 1, 2)

    def path(self, x: torch.Tensor) -> str:
        return "tap maximum" if x.device.type == "cpu" and x.ndim == 4 else "reference"


_ACTIVATIONS = (torch.int8, torch.int16)


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _pool_size(size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> int:
    """PyTorch's pooling output size (a ceil_mode window must start inside the input or its left padding)."""
    out = (size + 2 * padding - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)) // stride + 1
    return out - 1 if ceil_mode and (out - 1) * stride >= size + padding else out


def _conv_size(size, kernel, stride, padding, dilation) -> tuple[int, int]:
    return tuple((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in zip(size, kernel, stride, padding,
                                                                                    dilation))


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),) * 2


EPILOGUE_RUN = 1024  # elements per call of the epilogue's inner loop: the constants repeat to about this length


def _epilogue_constants(channels: int, bias, relu: bool, multiplier, shift, acc_max, out_max, out_dtype: str):
    """hat::gemm_epilogue's arguments after the accumulator, as the reference's _finish defines them: int32
    per-channel bias, multiplier, shift and upper bound, repeated to ~EPILOGUE_RUN elements."""
    repeats = max(1, EPILOGUE_RUN // max(channels, 1))

    def per_channel(v, default: int) -> torch.Tensor:
        values = torch.full((channels,), default) if v is None else torch.as_tensor(v).long().reshape(-1)
        return values.expand(channels).repeat(repeats).to(torch.int32)

    lower = 0 if relu else INT32_MIN
    if multiplier is None:  # the int32 accumulator itself (a high-precision output), relu6 as acc_max
        return (per_channel(bias, 0), per_channel(None, 1), per_channel(None, 0), per_channel(acc_max, INT32_MAX),
                lower, INT32_MIN, torch.int32)
    qmin, qmax = qrange(out_dtype)
    upper = qmax if out_max is None else min(int(out_max), qmax)
    return (per_channel(bias, 0), per_channel(multiplier, 1), per_channel(shift, 0), per_channel(None, upper),
            lower, qmin, TORCH_DTYPES[out_dtype])


FAST_EXECUTORS: dict[str, Callable[[str, dict], Executor]] = {"conv2d": _Conv2d, "linear": _Linear, "add": _Add,
                                                              "max_pool2d": _MaxPool2d}
