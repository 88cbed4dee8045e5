"""An integer program as an ONNX graph in QuantizeLinear/DequantizeLinear (QDQ) form (FAQ 2.3 Q3).

Each integer value of the program is an int8/int16 tensor in the graph (int32 high-precision values are carried
dequantized, as float). Each op dequantizes its inputs, computes in float and quantizes to its output's scale:
the form ONNX tools (onnxruntime, TensorRT, ...) read as a quantized model. ONNX rounds half to even and computes
the requantization in float, where J5 rounds half up with an int16 multiplier and a shift: an output can differ
from the integer program by a quantization step. The integer program, not this graph, is what deploys.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from torch import nn

from hat.backend.j5.program import Node, Program
from hat.errors import OnnxExportError
from hat.ops.onnx import OPSET

ONNX_TYPES = {"qint8": 3, "qint16": 5}  # TensorProto.INT8, INT16


def program_to_onnx(program: Program, model: nn.Module):
    """The ONNX ModelProto of `program`, compiled from the quantized `model` (which gives the weight scales)."""
    import onnx
    from onnx import TensorProto, helper

    graph = _Graph(program, dict(model.named_modules()))
    for node, params in zip(program.nodes, program._resolved_params()):
        translate = _TRANSLATIONS.get(node.op)
        if translate is None:
            raise OnnxExportError(f"module '{node.module}': op '{node.op}' has no ONNX QDQ form here (supported: "
                                  f"{', '.join(sorted(_TRANSLATIONS))}); export the QAT model with export_to_onnx")
        translate(graph, node, params)
    inputs, outputs = ([helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *program.values[n].shape[1:]])
                        for n in names] for names in (program.inputs, program.outputs))
    onnx_graph = helper.make_graph(graph.nodes, "hat_quantized", inputs, outputs, graph.initializers)
    proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hat")
    onnx.checker.check_model(proto, full_check=True)
    return proto


class _Graph:
    """ONNX nodes and initializers under construction; `float_values` are the program values carried as float."""

    def __init__(self, program: Program, modules: dict[str, nn.Module]):
        from onnx import helper, numpy_helper

        self.program, self.modules, self.helper, self.numpy_helper = program, modules, helper, numpy_helper
        self.nodes, self.initializers, self.float_values = [], [], set(program.inputs)
        self.count = 0

    def const(self, array, dtype=None) -> str:
        self.count += 1
        name = f"c{self.count}"
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: Optional[str] = None, **attrs) -> str:
        self.count += 1
        output = output or f"t{self.count}"
        self.nodes.append(self.helper.make_node(op_type, inputs, [output], **attrs))
        return output

    def scale(self, value: str) -> np.ndarray:
        return np.asarray(self.program.values[value].scale, dtype=np.float32)

    def dequantized(self, value: str) -> str:
        """`value` as float: DequantizeLinear with its scale (per channel along its axis), or as it is."""
        if value in self.float_values:
            return value
        info = self.program.values[value]
        scale = self.scale(value)
        if scale.size > 1:
            return self.op("DequantizeLinear", [value, self.const(scale)], axis=info.axis)
        return self.op("DequantizeLinear", [value, self.const(scale[0])])

    def quantized(self, x: str, output: str) -> None:
        """Float `x` onto `output`'s grid (int8/int16), or kept as float for an int32 value."""
        info = self.program.values[output]
        if info.dtype not in ONNX_TYPES:
            self.op("Identity", [x], output)
            self.float_values.add(output)
            return
        zero = self.const(0, dtype=np.int8 if info.dtype == "qint8" else np.int16)
        self.op("QuantizeLinear", [x, self.const(self.scale(output)[0]), zero], output)


def _quantize(g: _Graph, node: Node, params: dict) -> None:
    g.quantized(node.inputs[0], node.output)


def _dequantize(g: _Graph, node: Node, params: dict) -> None:
    g.op("Identity", [g.dequantized(node.inputs[0])], node.output)
    g.float_values.add(node.output)


def _weighted(g: _Graph, node: Node, params: dict) -> None:
    """conv2d / linear: DQ(input), DQ(int8 weight, per channel), DQ(int32 bias on the accumulator's grid), float op,
    relu/relu6, Q."""
    module = g.modules.get(node.module)
    if module is None or not hasattr(module, "weight_scale"):
        raise OnnxExportError(f"module '{node.module}': the weight scale of this {node.op} is not in the model given")
    x = g.dequantized(node.inputs[0])
    w_scale = module.weight_scale.double().numpy()
    acc_scale = (g.scale(node.inputs[0]).astype(np.float64) * w_scale).astype(np.float32)
    weight = params["weight"].numpy()
    bias = g.op("DequantizeLinear", [g.const(params["bias"].numpy().astype(np.int32)), g.const(acc_scale)], axis=0)
    if node.op == "conv2d":
        w = g.op("DequantizeLinear", [g.const(weight), g.const(w_scale.astype(np.float32))], axis=0)
        y = g.op("Conv", [x, w, bias], strides=_pair(params["stride"]), pads=_pair(params["padding"]) * 2,
                 dilations=_pair(params["dilation"]), group=params["groups"])
    else:  # linear: x @ W^T + b, W stored transposed so the scale runs along axis 1
        w = g.op("DequantizeLinear", [g.const(np.ascontiguousarray(weight.T)), g.const(w_scale.astype(np.float32))],
                 axis=1)
        y = g.op("Add", [g.op("MatMul", [x, w]), bias])
    if params["relu"]:
        y = g.op("Relu", [y])
    if params.get("out_max") is not None or params.get("acc_max") is not None:
        y = g.op("Min", [y, g.const(np.float32(6.0))])  # relu6
    g.quantized(y, node.output)


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * 2


def _float_op(compute: Callable[[_Graph, list[str], Node, dict], str]) -> Callable[[_Graph, Node, dict], None]:
    """An op computed on the dequantized inputs, its result quantized to the output's grid."""
    def translate(g: _Graph, node: Node, params: dict) -> None:
        g.quantized(compute(g, [g.dequantized(v) for v in node.inputs], node, params), node.output)
    return translate


def _integer_op(op_type: str, **attrs_of: Callable[[dict], object]) -> Callable[[_Graph, Node, dict], None]:
    """An op that moves or selects integers without arithmetic (same grid in and out)."""
    def translate(g: _Graph, node: Node, params: dict) -> None:
        g.op(op_type, list(node.inputs), node.output, **{k: f(params) for k, f in attrs_of.items()})
    return translate


def _layout(g: _Graph, node: Node, params: dict) -> None:
    method, args, kwargs = params["method"], list(params.get("args") or []), params.get("kwargs") or {}
    x, out = node.inputs[0], node.output
    if method == "contiguous":
        g.op("Identity", [x], out)
    elif method in ("reshape", "view"):
        shape = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        g.op("Reshape", [x, g.const(np.asarray([-1, *shape[1:]], dtype=np.int64))], out)
    elif method == "flatten" and [*args, *kwargs.values()] in ([1], [1, -1]):
        g.op("Flatten", [x], out, axis=1)
    elif method == "permute":
        g.op("Transpose", [x], out, perm=list(args[0] if len(args) == 1 else args))
    else:
        raise OnnxExportError(f"module '{node.module}': {method}{tuple(args)} has no ONNX form here")
    if x in g.float_values:
        g.float_values.add(out)


def _lookup(g: _Graph, node: Node, params: dict) -> None:
    """The exact table as a Gather on (int8 x + 128): bit-exact with the program."""
    index = g.op("Add", [g.op("Cast", [node.inputs[0]], to=6), g.const(np.int32(128))])  # 6: TensorProto.INT32
    g.op("Gather", [g.const(params["table"].numpy()), index], node.output, axis=0)


def _segment_lookup(g: _Graph, node: Node, params: dict) -> None:
    """Segmented tables: f itself in float ONNX operators (the op the quantized module computes), quantized."""
    module = g.modules.get(node.module)
    op = getattr(module, "op", None)
    if op is None or op.onnx is None:
        name = getattr(op, "name", "this op")
        raise OnnxExportError(f"module '{node.module}': {name} with a {g.program.values[node.inputs[0]].dtype} "
                              f"input has no ONNX form here; give its input an int8 qconfig (an exact table, "
                              f"exported as a Gather) or export the QAT model with export_to_onnx")
    g.quantized(op.onnx(g, g.dequantized(node.inputs[0]), module.arguments), node.output)


def _prelu(g: _Graph, node: Node, params: dict) -> None:
    """DQ -> PRelu -> Q, with the slopes the integer program applies (neg_multiplier / 2^neg_shift * s_out / s_in),
    shaped to broadcast along the channel axis."""
    x, rank = node.inputs[0], len(g.program.values[node.inputs[0]].shape)
    ratio = float(g.scale(node.output)[0]) / float(g.scale(x)[0])
    slope = (params["neg_multiplier"].double() / 2.0 ** params["neg_shift"].double() * ratio).numpy()
    if slope.size > 1:
        axis = params["channel_axis"] % rank
        slope = slope.reshape([-1] + [1] * (rank - 1 - axis))
    g.quantized(g.op("PRelu", [g.dequantized(x), g.const(slope.astype(np.float32))]), node.output)


def _clip(g: _Graph, node: Node, params: dict) -> None:
    """relu / relu6 / hardtanh / clamp on the integers: Clip in int32 with the bounds saturated to the dtype, cast
    back (exact; onnxruntime has no int16 Clip)."""
    x, dtype = node.inputs[0], g.program.values[node.inputs[0]].dtype
    info = np.iinfo(np.int8 if dtype == "qint8" else np.int16)
    bound = lambda v, default: g.const(np.int32(min(max(default if v is None else v, info.min), info.max)))  # noqa
    clipped = g.op("Clip", [g.op("Cast", [x], to=6), bound(params["low"], info.min), bound(params["high"], info.max)])
    g.op("Cast", [clipped], node.output, to=ONNX_TYPES[dtype])


def _add_steps(g: _Graph, node: Node, params: dict) -> None:
    """x + constant on x's grid (and -x): in int32, saturated, cast back (exact)."""
    x, dtype = node.inputs[0], g.program.values[node.inputs[0]].dtype
    info = np.iinfo(np.int8 if dtype == "qint8" else np.int16)
    wide = g.op("Cast", [x], to=6)  # TensorProto.INT32
    if params.get("negate"):
        wide = g.op("Neg", [wide])
    wide = g.op("Add", [wide, g.const(np.int32(params["steps"]))])
    wide = g.op("Clip", [wide, g.const(np.int32(info.min)), g.const(np.int32(info.max))])
    g.op("Cast", [wide], node.output, to=ONNX_TYPES[dtype])


def _scalar_ratio(g: _Graph, node: Node, params: dict) -> float:
    """The real factor of a requantized scalar op: m / 2^n * s_out / s_in."""
    return params["multiplier"] / 2.0 ** params["shift"] * float(g.scale(node.output)[0]) / float(
        g.scale(node.inputs[0])[0])


def _resize_nearest(g: _Graph, node: Node, params: dict) -> None:
    """Nearest resize of the integers (torch's floor rule): ONNX Resize, asymmetric coordinates, floor (exact)."""
    (ih, iw), (oh, ow) = (g.program.values[v].shape[-2:] for v in (node.inputs[0], node.output))
    scales = g.const(np.asarray([1.0, 1.0, oh / ih, ow / iw], dtype=np.float32))
    values = g.op("Cast", [node.inputs[0]], to=1)  # float: onnxruntime has no int16 Resize; nearest copies values
    resized = g.op("Resize", [values, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric",
                   nearest_mode="floor")
    g.op("Cast", [resized], node.output, to=ONNX_TYPES[g.program.values[node.output].dtype])


_TRANSLATIONS = {
    "quantize": _quantize, "dequantize": _dequantize, "conv2d": _weighted, "linear": _weighted,
    "add": _float_op(lambda g, xs, node, p: g.op("Add", [g.op("Mul", [xs[0], g.const(np.float32(p["x_sign"]))]),
                                                         xs[1]])),
    "mul": _float_op(lambda g, xs, node, p: g.op("Mul", xs)),
    "cat": _float_op(lambda g, xs, node, p: g.op("Concat", xs, axis=p["dim"])),
    "global_avg_pool": _float_op(lambda g, xs, node, p: g.op("GlobalAveragePool", xs)),
    "mean": _float_op(lambda g, xs, node, p: g.op("ReduceMean", [xs[0], g.const(np.asarray(p["dims"], np.int64))],
                                                  keepdims=int(p["keepdim"]))),
    "extremum": _float_op(lambda g, xs, node, p: g.op("Min" if p["minimum"] else "Max", xs)),
    "avg_pool2d": _float_op(lambda g, xs, node, p: g.op("AveragePool", xs, kernel_shape=_pair(p["kernel_size"]),
                                                        strides=_pair(p["stride"] or p["kernel_size"]),
                                                        pads=_pair(p["padding"]) * 2, count_include_pad=1)),
    "max_pool2d": _integer_op("MaxPool", kernel_shape=lambda p: _pair(p["kernel_size"]),
                              strides=lambda p: _pair(p["stride"] or p["kernel_size"]),
                              pads=lambda p: _pair(p["padding"]) * 2, dilations=lambda p: _pair(p["dilation"]),
                              ceil_mode=lambda p: int(p["ceil_mode"])),
    "identity": _integer_op("Identity"), "concat": _integer_op("Concat", axis=lambda p: p["dim"]),
    "layout": _layout, "lookup": _lookup, "segment_lookup": _segment_lookup,
    "prelu": _prelu, "clip": _clip, "add_steps": _add_steps, "resize_nearest": _resize_nearest,
    "add_scalar": _float_op(lambda g, xs, node, p: g.op("Add", [xs[0], g.const(np.float32(
        p["constant"] / 2.0 ** p["x_shift"] * float(g.scale(node.inputs[0])[0])))])),
    "mul_scalar": _float_op(lambda g, xs, node, p: g.op("Mul", [xs[0], g.const(np.float32(
        p["sign"] * _scalar_ratio(g, node, p)))])),
    "softmax_lut": _float_op(lambda g, xs, node, p: g.op("LogSoftmax" if p["log"] else "Softmax", xs,
                                                         axis=p["dim"])),
}

