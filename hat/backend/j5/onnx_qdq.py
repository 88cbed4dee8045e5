"""An integer program as an ONNX graph in QuantizeLinear/DequantizeLinear (QDQ) form (FAQ 2.3 Q3).

Each integer value of the program is an int8/int16 tensor in the graph (int32 high-precision values are carried
dequantized, as float). Each op dequantizes its inputs, computes in float and quantizes to its output's scale:
the form ONNX tools (onnxruntime, TensorRT, ...) read as a quantized model. ONNX rounds half to even and computes
the requantization in float, where J5 rounds half up with an int16 multiplier and a shift: an output can differ
from the integer program by a quantization step. The integer program, not this graph, is what deploys.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from hat.backend.j5.onnx_graph import ONNX_TYPES, Graph, float_op, integer_op
from hat.backend.j5.onnx_grid_ops import GRID_LAYOUTS, GRID_TRANSLATIONS
from hat.backend.j5.program import Node, Program, pair
from hat.errors import OnnxExportError
from hat.ops.onnx import OPSET



def program_to_onnx(program: Program, model: nn.Module):
    """The ONNX ModelProto of `program`, compiled from the quantized `model` (which gives the weight scales)."""
    import onnx
    from onnx import TensorProto, helper

    graph = Graph(program, dict(model.named_modules()))
    for node, params in zip(program.nodes, program._resolved_params()):
        translate = _TRANSLATIONS.get(node.op)
        if translate is None:
            raise OnnxExportError(f"module '{node.module}': op '{node.op}' has no ONNX QDQ form here (supported: "
                                  f"{', '.join(sorted(_TRANSLATIONS))}); export the QAT model with export_to_onnx")
        translate(graph, node, params)
    for value, name in zip(program.outputs, program.output_names):  # the model's output names, when it had some
        graph.nodes.append(helper.make_node("Identity", [value], [name]))
    shape = {**{n: program.values[n].shape for n in program.inputs + program.outputs},
             **{name: program.values[v].shape for v, name in zip(program.outputs, program.output_names)}}
    inputs, outputs = ([helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", *shape[n][1:]]) for n in names]
                       for names in (program.inputs, program.output_names or program.outputs))
    onnx_graph = helper.make_graph(graph.nodes, "hat_quantized", inputs, outputs, graph.initializers)
    proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hat")
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _quantize(g: Graph, node: Node, params: dict) -> None:
    g.quantized(node.inputs[0], node.output)


def _dequantize(g: Graph, node: Node, params: dict) -> None:
    g.op("Identity", [g.dequantized(node.inputs[0])], node.output)
    g.float_values.add(node.output)


def _weighted(g: Graph, node: Node, params: dict) -> None:
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
        y = g.op("Conv", [x, w, bias], strides=pair(params["stride"]), pads=pair(params["padding"]) * 2,
                 dilations=pair(params["dilation"]), group=params["groups"])
    else:  # linear: x @ W^T + b, W stored transposed so the scale runs along axis 1
        w = g.op("DequantizeLinear", [g.const(np.ascontiguousarray(weight.T)), g.const(w_scale.astype(np.float32))],
                 axis=1)
        y = g.op("Add", [g.op("MatMul", [x, w]), bias])
    _finish(g, y, node, params)


def _sum_partials(g: Graph, node: Node, params: dict) -> None:
    """The partial accumulators of a layer split over its input channels (carried as float), summed."""
    _finish(g, g.op("Sum", [g.dequantized(v) for v in node.inputs]), node, params)


def _finish(g: Graph, y: str, node: Node, params: dict) -> None:
    """A conv/linear accumulator's relu / relu6, onto the output grid."""
    if params["relu"]:
        y = g.op("Relu", [y])
    if params.get("out_max") is not None or params.get("acc_max") is not None:
        y = g.op("Min", [y, g.const(np.float32(6.0))])  # relu6
    g.quantized(y, node.output)


def _layout(g: Graph, node: Node, params: dict) -> None:
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
        g.op("Transpose", [x], out, perm=list(args[0] if len(args) == 1 and isinstance(args[0], list) else args))
    elif method == "transpose":
        rank = len(g.program.values[x].shape)
        a, b = (int(d) % rank for d in [*args, *kwargs.values()])
        perm = list(range(rank))
        perm[a], perm[b] = perm[b], perm[a]
        g.op("Transpose", [x], out, perm=perm)
    elif method in ("unsqueeze", "squeeze") and len([*args, *kwargs.values()]) == 1:
        dims = [*args, *kwargs.values()][0]
        dims = dims if isinstance(dims, list) else [dims]
        rank = len(g.program.values[out if method == "unsqueeze" else x].shape)
        axes = [int(d) % rank for d in dims]
        if method == "squeeze":  # torch skips dims that are not 1; ONNX refuses them
            axes = [a for a in axes if g.program.values[x].shape[a] == 1]
        g.op("Squeeze" if method == "squeeze" else "Unsqueeze", [x, g.const(np.asarray(axes, dtype=np.int64))], out)
    elif method in GRID_LAYOUTS:  # flatten of any dims, roll
        GRID_LAYOUTS[method](g, node, args, kwargs)
    else:
        raise OnnxExportError(f"module '{node.module}': {method}{tuple(args)} has no ONNX form here")
    if x in g.float_values:
        g.float_values.add(out)


def _lookup(g: Graph, node: Node, params: dict) -> None:
    """The exact table as a Gather on (int8 x + 128): bit-exact with the program."""
    index = g.op("Add", [g.op("Cast", [node.inputs[0]], to=6), g.const(np.int32(128))])  # 6: TensorProto.INT32
    g.op("Gather", [g.const(params["table"].numpy()), index], node.output, axis=0)


def _segment_lookup(g: Graph, node: Node, params: dict) -> None:
    """Segmented tables: f itself in float ONNX operators (the op the quantized module computes), quantized."""
    module = g.modules.get(node.module)
    op = getattr(module, "op", None)
    if op is None or op.onnx is None:
        name = getattr(op, "name", "this op")
        raise OnnxExportError(f"module '{node.module}': {name} with a {g.program.values[node.inputs[0]].dtype} "
                              f"input has no ONNX form here; give its input an int8 qconfig (an exact table, "
                              f"exported as a Gather) or export the QAT model with export_to_onnx")
    g.quantized(op.onnx(g, g.dequantized(node.inputs[0]), module.arguments), node.output)


def _prelu(g: Graph, node: Node, params: dict) -> None:
    """DQ -> PRelu -> Q, with the slopes the integer program applies (neg_multiplier / 2^neg_shift * s_out / s_in),
    shaped to broadcast along the channel axis."""
    x, rank = node.inputs[0], len(g.program.values[node.inputs[0]].shape)
    ratio = float(g.scale(node.output)[0]) / float(g.scale(x)[0])
    slope = (params["neg_multiplier"].double() / 2.0 ** params["neg_shift"].double() * ratio).numpy()
    if slope.size > 1:
        axis = params["channel_axis"] % rank
        slope = slope.reshape([-1] + [1] * (rank - 1 - axis))
    g.quantized(g.op("PRelu", [g.dequantized(x), g.const(slope.astype(np.float32))]), node.output)


def _clip(g: Graph, node: Node, params: dict) -> None:
    """relu / relu6 / hardtanh / clamp on the integers: Clip in int32 with the bounds saturated to the dtype, cast
    back (exact; onnxruntime has no int16 Clip)."""
    x, dtype = node.inputs[0], g.program.values[node.inputs[0]].dtype
    info = np.iinfo(np.int8 if dtype == "qint8" else np.int16)
    bound = lambda v, default: g.const(np.int32(min(max(default if v is None else v, info.min), info.max)))  # noqa
    clipped = g.op("Clip", [g.op("Cast", [x], to=6), bound(params["low"], info.min), bound(params["high"], info.max)])
    g.op("Cast", [clipped], node.output, to=ONNX_TYPES[dtype])


def _add_steps(g: Graph, node: Node, params: dict) -> None:
    """x + constant on x's grid (and -x): in int32, saturated, cast back (exact)."""
    x, dtype = node.inputs[0], g.program.values[node.inputs[0]].dtype
    info = np.iinfo(np.int8 if dtype == "qint8" else np.int16)
    wide = g.op("Cast", [x], to=6)  # TensorProto.INT32
    if params.get("negate"):
        wide = g.op("Neg", [wide])
    wide = g.op("Add", [wide, g.const(np.int32(params["steps"]))])
    wide = g.op("Clip", [wide, g.const(np.int32(info.min)), g.const(np.int32(info.max))])
    g.op("Cast", [wide], node.output, to=ONNX_TYPES[dtype])


def _scalar_ratio(g: Graph, node: Node, params: dict) -> float:
    """The real factor of a requantized scalar op: m / 2^n * s_out / s_in."""
    return params["multiplier"] / 2.0 ** params["shift"] * float(g.scale(node.output)[0]) / float(
        g.scale(node.inputs[0])[0])


def _resize_nearest(g: Graph, node: Node, params: dict) -> None:
    """Nearest resize of the integers (torch's floor rule): ONNX Resize, asymmetric coordinates, floor (exact)."""
    (ih, iw), (oh, ow) = (g.program.values[v].shape[-2:] for v in (node.inputs[0], node.output))
    scales = g.const(np.asarray([1.0, 1.0, oh / ih, ow / iw], dtype=np.float32))
    values = g.op("Cast", [node.inputs[0]], to=1)  # float: onnxruntime has no int16 Resize; nearest copies values
    resized = g.op("Resize", [values, "", scales], mode="nearest", coordinate_transformation_mode="asymmetric",
                   nearest_mode="floor")
    g.op("Cast", [resized], node.output, to=ONNX_TYPES[g.program.values[node.output].dtype])


def _max_pool(g: Graph, node: Node, params: dict) -> None:
    """MaxPool on the integers (exact); ONNX has no int16 MaxPool, so int16 goes through float and back."""
    attrs = dict(kernel_shape=pair(params["kernel_size"]), strides=pair(params["stride"] or params["kernel_size"]),
                 pads=pair(params["padding"]) * 2, dilations=pair(params["dilation"]),
                 ceil_mode=int(params["ceil_mode"]))
    x, dtype = node.inputs[0], g.program.values[node.inputs[0]].dtype
    if dtype == "qint8":
        g.op("MaxPool", [x], node.output, **attrs)
        return
    pooled = g.op("MaxPool", [g.op("Cast", [x], to=1)], **attrs)  # 1: FLOAT; int16 values are exact in float32
    g.op("Cast", [pooled], node.output, to=ONNX_TYPES[dtype])


_TRANSLATIONS = {
    "quantize": _quantize, "dequantize": _dequantize, "conv2d": _weighted, "linear": _weighted,
    "sum_partials": _sum_partials,
    "add": float_op(lambda g, xs, node, p: g.op("Add", [g.op("Mul", [xs[0], g.const(np.float32(p["x_sign"]))]),
                                                         xs[1]])),
    "mul": float_op(lambda g, xs, node, p: g.op("Mul", xs)),
    "cat": float_op(lambda g, xs, node, p: g.op("Concat", xs, axis=p["dim"])),
    "global_avg_pool": float_op(lambda g, xs, node, p: g.op("GlobalAveragePool", xs)),
    "mean": float_op(lambda g, xs, node, p: g.op("ReduceMean", [xs[0], g.const(np.asarray(p["dims"], np.int64))],
                                                  keepdims=int(p["keepdim"]))),
    "extremum": float_op(lambda g, xs, node, p: g.op("Min" if p["minimum"] else "Max", xs)),
    "avg_pool2d": float_op(lambda g, xs, node, p: g.op("AveragePool", xs, kernel_shape=pair(p["kernel_size"]),
                                                        strides=pair(p["stride"] or p["kernel_size"]),
                                                        pads=pair(p["padding"]) * 2, count_include_pad=1)),
    "max_pool2d": _max_pool,
    "identity": integer_op("Identity"), "concat": integer_op("Concat", axis=lambda p: p["dim"]),
    "layout": _layout, "lookup": _lookup, "segment_lookup": _segment_lookup,
    "prelu": _prelu, "clip": _clip, "add_steps": _add_steps, "resize_nearest": _resize_nearest,
    "add_scalar": float_op(lambda g, xs, node, p: g.op("Add", [xs[0], g.const(np.float32(
        p["constant"] / 2.0 ** p["x_shift"] * float(g.scale(node.inputs[0])[0])))])),
    "mul_scalar": float_op(lambda g, xs, node, p: g.op("Mul", [xs[0], g.const(np.float32(
        p["sign"] * _scalar_ratio(g, node, p)))])),
    "softmax_lut": float_op(lambda g, xs, node, p: g.op("LogSoftmax" if p["log"] else "Softmax", xs,
                                                         axis=p["dim"])),
}
_TRANSLATIONS.update(GRID_TRANSLATIONS)


def _layer_norm(g: Graph, xs: list[str], node: Node, p: dict) -> str:
    """layer_norm (LayerNorm / GroupNorm) in float ONNX operators: the groups' mean and variance (ReduceMean), eps
    as the program holds it, then the affine the program applies (multiplier / 2^shift * 2^y_bits * s_out, bias /
    2^shift * s_out)."""
    x, start, groups = xs[0], p["start_dim"], p["groups"]
    s_in, s_out = float(g.scale(node.inputs[0])[0]), float(g.scale(node.output)[0])
    eps = p["eps"] * s_in ** 2 / 2.0 ** (2 * p["mean_bits"])
    grouped = g.op("Reshape", [x, g.const(np.asarray([0] * start + [groups, -1], dtype=np.int64))])
    last = g.const(np.asarray([-1], dtype=np.int64))
    d = g.op("Sub", [grouped, g.op("ReduceMean", [grouped, last], keepdims=1)])
    variance = g.op("ReduceMean", [g.op("Mul", [d, d]), last], keepdims=1)
    y = g.op("Div", [d, g.op("Sqrt", [g.op("Add", [variance, g.const(np.float32(eps))])])])
    y = g.op("Reshape", [y, g.op("Shape", [x])])
    shift = 2.0 ** p["shift"].double()
    gamma = (p["multiplier"].double() / shift * 2.0 ** p["y_bits"] * s_out).numpy().astype(np.float32)
    beta = (p["bias"].double() / shift * s_out).numpy().astype(np.float32)
    return g.op("Add", [g.op("Mul", [y, g.const(gamma)]), g.const(beta)])


_TRANSLATIONS["layer_norm"] = float_op(_layer_norm)
