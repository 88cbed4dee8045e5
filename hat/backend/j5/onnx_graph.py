"""Building an ONNX graph from an integer program: values, constants, Q/DQ at the grid changes, and the two shapes
of op translation (float op between DQ and Q, integer op on the grid)."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from torch import nn

from hat.backend.j5.program import Node, Program

ONNX_TYPES = {"qint8": 3, "qint16": 5}  # TensorProto.INT8, INT16


class Graph:
    """ONNX nodes and initializers under construction; `float_values` are the program values carried as float."""

    def __init__(self, program: Program, modules: dict[str, nn.Module]):
        from onnx import helper, numpy_helper

        self.program, self.modules, self.helper, self.numpy_helper = program, modules, helper, numpy_helper
        self.nodes, self.initializers, self.float_values = [], [], set(program.inputs)
        self.count = 0
        for name, value in program.values.items():  # tensors the model holds (a parameter its QuantStub quantizes)
            if value.constant and name in program.tensors:
                self.initializers.append(numpy_helper.from_array(program.tensors[name].detach().numpy(), name))
                if program.tensors[name].is_floating_point():
                    self.float_values.add(name)

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


def float_op(compute: Callable[[Graph, list[str], Node, dict], str]) -> Callable[[Graph, Node, dict], None]:
    """An op computed on the dequantized inputs, its result quantized to the output's grid."""
    def translate(g: Graph, node: Node, params: dict) -> None:
        g.quantized(compute(g, [g.dequantized(v) for v in node.inputs], node, params), node.output)
    return translate


def integer_op(op_type: str, **attrs_of: Callable[[dict], object]) -> Callable[[Graph, Node, dict], None]:
    """An op that moves or selects integers without arithmetic (same grid in and out)."""
    def translate(g: Graph, node: Node, params: dict) -> None:
        g.op(op_type, list(node.inputs), node.output, **{k: f(params) for k, f in attrs_of.items()})
    return translate
