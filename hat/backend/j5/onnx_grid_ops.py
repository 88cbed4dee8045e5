"""ONNX forms of the grid ops (indexing, batch expansion, flatten, roll, pad, windowed means, bilinear resize) and of
matmul: what program_to_onnx (onnx_qdq.py) adds to its core translations."""
from __future__ import annotations

from typing import Optional

import numpy as np

from hat.backend.j5.onnx_graph import ONNX_TYPES, Graph, float_op
from hat.backend.j5.program import Node


def _index(g: Graph, node: Node, params: dict) -> None:
    """Basic indexing (ints, slices, None, ...): one Slice over the indexed axes, Squeeze of the int ones, Unsqueeze
    of the None ones (exact: integers only move)."""
    x, out = node.inputs[0], node.output
    rank = len(g.program.values[x].shape)
    items = list(params["items"])
    if "..." in items:
        at = items.index("...")
        items[at:at + 1] = [[None, None, None]] * (rank - sum(i is not None and i != "..." for i in items))
    starts, ends, axes, steps, squeezed, inserted = [], [], [], [], [], []
    axis = position = 0
    for item in items:
        if item is None:
            inserted.append(position)
            position += 1
            continue
        if isinstance(item, list):
            start, stop, step = item
            step = 1 if step is None else step
            first, last = (0, _INT64_MAX) if step > 0 else (-1, -_INT64_MAX)
            starts, ends, steps = starts + [first if start is None else start], ends + [
                last if stop is None else stop], steps + [step]
            position += 1
        else:
            starts, ends, steps = starts + [item], ends + [_INT64_MAX if item == -1 else item + 1], steps + [1]
            squeezed.append(axis)
        axes.append(axis)
        axis += 1
    y = x
    if axes:
        y = g.op("Slice", [y, *(g.const(np.asarray(v, dtype=np.int64)) for v in (starts, ends, axes, steps))])
    if squeezed:
        y = g.op("Squeeze", [y, g.const(np.asarray(squeezed, dtype=np.int64))])
    if inserted:
        y = g.op("Unsqueeze", [y, g.const(np.asarray(inserted, dtype=np.int64))])
    g.op("Identity", [y], out)
    if x in g.float_values:
        g.float_values.add(out)


def _expand_batch(g: Graph, node: Node, params: dict) -> None:
    """A batch-1 tensor repeated to the batch of `like`: Expand to Shape(like)[:1] + its own other dims (exact)."""
    x, like = node.inputs[:2]
    batch = g.op("Shape", [like], start=0, end=1)
    rest = g.const(np.asarray(g.program.values[x].shape[1:], dtype=np.int64))
    g.op("Expand", [x, g.op("Concat", [batch, rest], axis=0)], node.output)
    if x in g.float_values:
        g.float_values.add(node.output)


_INT64_MAX = 2 ** 63 - 1
GRID_TRANSLATIONS = {"matmul": float_op(lambda g, xs, node, p: g.op("MatMul", xs)), "index": _index,
                      "expand_batch": _expand_batch}


# --- windows with a divisor each, bilinear resize, padding, flatten and roll (issue 16) ----------------------------
def _flatten(g: Graph, node: Node, args: list, kwargs: dict) -> None:
    """flatten(start, end) of any dims: Reshape to the output shape, the batch left free (-1) when it is kept."""
    x, out = node.inputs[0], node.output
    shape = list(g.program.values[out].shape)
    if shape[0] == g.program.values[x].shape[0]:
        shape[0] = -1
    g.op("Reshape", [x, g.const(np.asarray(shape, dtype=np.int64))], out)


def _roll(g: Graph, node: Node, args: list, kwargs: dict) -> None:
    """roll(shifts, dims), shifts in [0, size): per dim the last `shift` items (Slice) before the others (exact)."""
    y, shape = node.inputs[0], g.program.values[node.inputs[0]].shape
    shifts, dims = (v if isinstance(v, list) else [v] for v in args[:2])  # qtensor_split._roll: [shifts, dims]
    for shift, dim in zip(shifts, dims):
        size = shape[dim]
        if shift % size:
            cut = size - shift % size
            part = lambda a, b: g.op("Slice", [y, *(g.const(np.asarray([v], dtype=np.int64))  # noqa: E731
                                                    for v in (a, b, dim))])
            y = g.op("Concat", [part(cut, size), part(0, cut)], axis=dim)
    g.op("Identity", [y], node.output)


GRID_LAYOUTS = {"flatten": _flatten, "roll": _roll}


def _window_mean(g: Graph, node: Node, params: dict) -> None:
    """DQ -> the window sums as two MatMuls with 0/1 window matrices -> times the per-position ratio m / 2^n the
    program applies -> Q."""
    x = node.inputs[0]
    h, w = g.program.values[x].shape[-2:]

    def windows(bounds, size):
        positions = np.arange(size)
        bounds = bounds.numpy().astype(np.int64)
        return ((positions >= bounds[:, :1]) & (positions < bounds[:, 1:])).astype(np.float32)

    ratio = (params["multiplier"].double() / 2.0 ** params["shift"].double()).numpy().astype(np.float32)
    rows = g.op("MatMul", [g.const(windows(params["rows"], h)), g.dequantized(x)])
    sums = g.op("MatMul", [rows, g.const(np.ascontiguousarray(windows(params["cols"], w).T))])
    g.quantized(g.op("Mul", [sums, g.const(ratio)]), node.output)


def _resize_bilinear(g: Graph, node: Node, params: dict) -> None:
    """DQ -> Resize (linear, torch's coordinates) -> Q when the program's fixed-point taps are torch's coordinates
    exactly (half-pixel or align-corners, e.g. a scale factor of 2); otherwise the program's own interpolation as two
    MatMuls with its dyadic tap weights (exact in float), so the graph stays within a step of the program."""
    x = node.inputs[0]
    (h, w), (oh, ow) = (g.program.values[v].shape[-2:] for v in (x, node.output))
    one = float(1 << params["fraction_bits"])
    taps = [(params[f"{a}_index"].double() + params[f"{a}_fraction"].double() / one).numpy() for a in ("row", "col")]
    mode, values = _resize_mode(taps, (h, w), (oh, ow)), g.dequantized(x)
    if mode is not None:
        sizes = g.op("Concat", [g.op("Shape", [values], start=0, end=2),
                                g.const(np.asarray([oh, ow], dtype=np.int64))], axis=0)
        y = g.op("Resize", [values, "", "", sizes], mode="linear", coordinate_transformation_mode=mode)
    else:
        def weights(index, fraction, size):
            matrix = np.zeros((len(index), size), dtype=np.float64)
            rows = np.arange(len(index))
            index, fraction = index.numpy().astype(np.int64), fraction.numpy() / one
            np.add.at(matrix, (rows, index), 1 - fraction)
            np.add.at(matrix, (rows, np.minimum(index + 1, size - 1)), fraction)
            return matrix.astype(np.float32)

        rows = weights(params["row_index"], params["row_fraction"], h)
        cols = weights(params["col_index"], params["col_fraction"], w)
        y = g.op("MatMul", [g.op("MatMul", [g.const(rows), values]), g.const(np.ascontiguousarray(cols.T))])
    g.quantized(y, node.output)


def _resize_mode(taps: list, sizes: tuple, outs: tuple) -> Optional[str]:
    """The ONNX coordinate mode whose source coordinates equal the program's taps on both axes, or None."""
    for mode in ("pytorch_half_pixel", "align_corners"):
        exact = True
        for tap, size, out in zip(taps, sizes, outs):
            dst = np.arange(out, dtype=np.float64)
            if mode == "align_corners":
                source = dst * ((size - 1) / (out - 1) if out > 1 else 0.0)
            else:
                source = np.maximum((dst + 0.5) * size / out - 0.5, 0) if out > 1 else np.zeros(1)
            exact = exact and bool(np.array_equal(np.minimum(source, size - 1), tap))
        if exact:
            return mode
    return None


def _pad(g: Graph, node: Node, params: dict) -> None:
    """Constant padding of the integers: Pad in int32 (onnxruntime has no int16 Pad), cast back (exact)."""
    x, dtype = node.inputs[0], g.program.values[node.inputs[0]].dtype
    rank, pads = len(g.program.values[x].shape), list(params["pads"])
    before, after = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):
        before[rank - 1 - i], after[rank - 1 - i] = pads[2 * i], pads[2 * i + 1]
    padded = g.op("Pad", [g.op("Cast", [x], to=6), g.const(np.asarray(before + after, dtype=np.int64)),
                          g.const(np.int32(params["value"]))], mode="constant")
    g.op("Cast", [padded], node.output, to=ONNX_TYPES[dtype])


GRID_TRANSLATIONS.update({"window_mean": _window_mean, "resize_bilinear": _resize_bilinear, "pad": _pad})
