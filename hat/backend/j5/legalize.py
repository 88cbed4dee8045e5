"""Legalization: nodes beyond one of the march's op limits rewritten into equivalent nodes within them, as the
device compiler tiles an op. Every rewrite keeps the same integer products and sums them exactly, so the program
stays bit-exact with the quantized model.

- A conv/linear with more input channels (or weights per filter) than the march takes (the first classifier layer
  of VGG: 25088, AlexNet: 9216): partial conv/linear nodes over slices of the input channels, each an int32
  accumulator (the bias in the first), added by `sum_partials`, which applies the layer's relu and requantization.
- A conv whose kernel is larger than the march takes (ViT-B/32's 32x32 patch embedding): space-to-depth by f
  (reshape, permute, reshape) and the conv with an f times smaller kernel and stride over f*f times the channels.

A node that cannot be rewritten exactly (it would overflow the accumulator anyway, a dilated or grouped case) stays
as it is, for the checker to report.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from hat.integer.kernels import accumulator_bound
from hat.integer.profile import Profile
from hat.backend.j5.program import TENSOR_REF, Node, Program, Value, pair


def legalize(program: Program, profile: Profile) -> Program:
    """`program` with each node beyond the conv limits of `profile` rewritten within them (a new Program)."""
    out = dataclasses.replace(program, values=dict(program.values), nodes=[], tensors=dict(program.tensors))
    for node in program.nodes:
        out.nodes += _space_to_depth(node, out, profile) or _split_channels(node, out, profile) or [node]
    used = {v[TENSOR_REF] for node in out.nodes for v in node.params.values() if isinstance(v, dict) and TENSOR_REF in v}
    out.tensors = {k: t for k, t in out.tensors.items() if k in used or (k in out.values and out.values[k].constant)}
    return out


def _add(program: Program, op: str, inputs: list[str], output: str, value: Value, params: dict,
         module: str) -> Node:
    program.values[output] = value
    stored = {}
    for key, v in params.items():
        if isinstance(v, torch.Tensor):
            program.tensors[f"{output}.{key}"] = v
            v = {TENSOR_REF: f"{output}.{key}"}
        stored[key] = v
    return Node(op, inputs, output, stored, module)


def _tensor(program: Program, params: dict, key: str) -> torch.Tensor:
    return program.tensors[params[key][TENSOR_REF]]


def _space_to_depth(node: Node, program: Program, profile: Profile) -> Optional[list[Node]]:
    """conv2d with a kernel side above the limit: pixel-unshuffle by the smallest f dividing both kernel sides and
    strides that brings the kernel within it (the input first padded / cropped to the rows and columns it reads)."""
    if node.op != "conv2d":
        return None
    weight = _tensor(program, node.params, "weight")
    kernel, high = list(weight.shape[2:]), profile.conv.kernel_range[1]
    stride, padding = pair(node.params["stride"]), pair(node.params["padding"])
    if max(kernel) <= high or pair(node.params["dilation"]) != [1, 1]:
        return None
    f = next((f for f in range(2, max(kernel) + 1) if all(k % f == 0 for k in kernel)
              and all(s % f == 0 for s in stride) and max(kernel) // f <= high), None)
    if f is None:
        return None
    x = program.values[node.inputs[0]]
    n, c, h, w = x.shape
    used = [(size + 2 * p - k) // s * s + k for size, p, k, s in zip((h, w), padding, kernel, stride)]
    like = dict(scale=list(x.scale), axis=x.axis)
    nodes, source, name = [], node.inputs[0], node.output
    pads = [padding[1], used[1] - w - padding[1], padding[0], used[0] - h - padding[0]]
    if any(pads):  # zero padding: 0 is the zero point of every grid
        nodes.append(_add(program, "pad", [source], f"{name}.pad", Value(x.dtype, [n, c, *used], **like),
                          {"pads": pads, "value": 0}, node.module))
        source = nodes[-1].output
    oh, ow = used[0] // f, used[1] // f
    steps = [("reshape", [-1, c, oh, f, ow, f], [n, c, oh, f, ow, f]),
             ("permute", [0, 1, 3, 5, 2, 4], [n, c, f, f, oh, ow]),
             ("reshape", [-1, c * f * f, oh, ow], [n, c * f * f, oh, ow])]
    for i, (method, args, shape) in enumerate(steps):
        nodes.append(_add(program, "layout", [source], f"{name}.s2d{i}", Value(x.dtype, shape, **like),
                          {"method": method, "args": args, "kwargs": {}}, node.module))
        source = nodes[-1].output
    o, cg = weight.shape[:2]
    unshuffled = (weight.reshape(o, cg, kernel[0] // f, f, kernel[1] // f, f).permute(0, 1, 3, 5, 2, 4)
                  .reshape(o, cg * f * f, kernel[0] // f, kernel[1] // f).contiguous())
    params = dict(node.params, weight=unshuffled, stride=[s // f for s in stride], padding=[0, 0])
    conv = _add(program, "conv2d", [source], name, program.values[name], params, node.module)
    return nodes + [conv]


def _split_channels(node: Node, program: Program, profile: Profile) -> Optional[list[Node]]:
    """conv2d (groups 1) / linear with too many input channels or weights per filter: partial accumulators over
    channel slices of at most the limits, added by sum_partials."""
    if node.op not in ("conv2d", "linear") or node.params.get("groups", 1) != 1:
        return None
    limits = profile.conv
    weight, bias = _tensor(program, node.params, "weight"), _tensor(program, node.params, "bias")
    in_c, per_channel = weight.shape[1], weight[0, 0].numel()
    max_channels = min(limits.max_in_channels, (limits.max_weight_elements_per_filter - 1) // per_channel)
    x = program.values[node.inputs[0]]
    worst = accumulator_bound(weight, x.dtype, bias)
    if in_c <= max_channels or max_channels < 1 or worst > profile.qrange(profile.accumulator_dtype)[1]:
        return None
    axis = 1 if node.op == "conv2d" else -1
    bounds = [b.tolist() for b in torch.arange(in_c).tensor_split(math.ceil(in_c / max_channels))]
    fixed = {k: node.params[k] for k in node.params if k not in ("weight", "bias")}
    nodes, parts, name = [], [], node.output
    for i, channels in enumerate(bounds):
        start, stop = channels[0], channels[-1] + 1
        items = [[None, None, None], [start, stop, None]] if axis == 1 else ["...", [start, stop, None]]
        shape = list(x.shape)
        shape[axis] = stop - start
        nodes.append(_add(program, "index", [node.inputs[0]], f"{name}.in{i}",
                          Value(x.dtype, shape, list(x.scale), x.axis), {"items": items}, node.module))
        part_weight = weight[:, start:stop].contiguous()
        params = dict(fixed, weight=part_weight, bias=bias if i == 0 else torch.zeros_like(bias), relu=False,
                      multiplier=None, shift=None, acc_max=None, out_max=None, out_dtype="qint32")
        out_shape = program.values[name].shape
        nodes.append(_add(program, node.op, [nodes[-1].output], f"{name}.part{i}", Value("qint32", out_shape),
                          params, node.module))
        parts.append(nodes[-1].output)
    keep = ("relu", "multiplier", "shift", "acc_max", "out_max", "out_dtype")
    total = Node("sum_partials", parts, name, {"axis": axis, **{k: node.params[k] for k in keep}}, node.module)
    return nodes + [total]
