"""The integer program: a list of J5 integer ops over named values, with its integer tensors; runs without the model.

`Program.run(x)` quantizes the float input, runs each node and dequantizes the outputs. Each node runs the fast
executor (hat.integer.fast: weights packed at load or the first run, int8 GEMMs), or with `reference=True` the
reference kernel (hat.integer.kernels, which defines the arithmetic); both are bit-exact with the quantized model.
Saving and loading live in irfile.py, timing per node in timing.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from pathlib import Path

import torch

from hat.integer import fast
from hat.integer.kernels import KERNELS, dequantize
from hat.errors import HatError
from hat.quant.compare import Recorded

TENSOR_REF = "$tensor"  # a node parameter {"$tensor": name} refers to Program.tensors[name]


class ProgramInputError(HatError, ValueError):
    """Input of the wrong count, dtype or shape for an integer program (a ValueError too, for older callers)."""


def pair(value: Any) -> list[int]:
    """A node's size parameter (stride, padding, kernel: one int or one per spatial dim) as [h, w]."""
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * 2


@dataclass
class Value:
    """What flows between nodes: its dtype (float32 at the model boundary, else qint8/qint16/qint32), the
    shape seen when compiling (dim 0 is the batch) and, for integers, the scale (per channel for qint32)."""

    dtype: str
    shape: list[int]
    scale: list[float] = field(default_factory=list)
    axis: int = 1
    constant: bool = False  # held in Program.tensors under the value's name


@dataclass
class Node:
    op: str  # a name in KERNELS
    inputs: list[str]
    output: str
    params: dict[str, Any]  # JSON values; tensors as {"$tensor": name}
    module: str = ""  # where it came from in the model, for messages


@dataclass
class Program:
    march: str
    inputs: list[str]
    outputs: list[str]
    values: dict[str, Value]
    nodes: list[Node]
    tensors: dict[str, torch.Tensor]
    output_names: list[str] = field(default_factory=list)  # the model's names when it returned a dict, in order
    _resolved: Optional[list[dict[str, Any]]] = field(default=None, init=False, repr=False, compare=False)
    _executors: Optional[list[fast.Executor]] = field(default=None, init=False, repr=False, compare=False)

    def run(self, *inputs: torch.Tensor, reference: bool = False
            ) -> Union[torch.Tensor, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
        """Float inputs (shapes as compiled, any batch) -> float outputs, bit-exact with the quantized model and in
        its form: a dict with the model's output names when the model returned one, else a tensor or a tuple.
        reference=True runs the reference kernels instead of the fast executor (same integers, slower)."""
        return self._outputs(self._execute(inputs, reference))

    __call__ = run

    def module_outputs(self, *inputs: torch.Tensor) -> dict[str, Recorded]:
        """Each model module's output in the program (its last node's value), dequantized, with the node's op and
        the value's scale: the program's side of a per-layer comparison with the models (hat.quant.compare)."""
        env = self._execute(inputs, reference=False)
        last = {node.module: node for node in self.nodes if node.module}
        found = {}
        for module, node in last.items():
            value, data = self.values[node.output], env[node.output]
            if data.is_floating_point():
                found[module] = Recorded(node.op, data.double())
            else:
                scale = torch.tensor(value.scale, dtype=torch.float64)
                found[module] = Recorded(node.op, dequantize(data, scale=scale, axis=value.axis).double(), scale,
                                         value.axis)
        return found

    def _execute(self, inputs: tuple, reference: bool) -> dict[str, torch.Tensor]:
        """Every value of one run, by name."""
        env = self._bind(inputs)
        if reference:
            for node, params in zip(self.nodes, self._resolved_params()):
                env[node.output] = KERNELS[node.op](*(env[name] for name in node.inputs), **params)
        else:
            for node, execute in zip(self.nodes, self.executors()):
                env[node.output] = execute(*(env[name] for name in node.inputs))
        return env

    def executors(self) -> list[fast.Executor]:
        """Each node's fast executor, its weights packed (built once: at load, or at the first run)."""
        if self._executors is None:
            self._executors = [fast.prepare(node.op, params)
                               for node, params in zip(self.nodes, self._resolved_params())]
        return self._executors

    def profile(self, *inputs: torch.Tensor, runs: int = 5):
        """Time per node (median of `runs`), MACs, bytes and executor path: where the time goes (timing.py)."""
        from hat.backend.j5.timing import profile

        return profile(self, *inputs, runs=runs)

    def _outputs(self, env: dict[str, torch.Tensor]):
        outputs = tuple(env[name] for name in self.outputs)
        if self.output_names:
            return dict(zip(self.output_names, outputs))
        return outputs[0] if len(outputs) == 1 else outputs

    def _bind(self, inputs: tuple) -> dict[str, torch.Tensor]:
        if len(inputs) != len(self.inputs):
            raise ProgramInputError(f"the program takes {len(self.inputs)} input(s), got {len(inputs)}")
        env = {name: t for name, t in self.tensors.items() if name in self.values and self.values[name].constant}
        for name, x in zip(self.inputs, inputs):
            expected = self.values[name].shape
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise ProgramInputError(f"input '{name}' must be a float tensor, got {type(x).__name__}"
                                        f"{'' if not isinstance(x, torch.Tensor) else ' of ' + str(x.dtype)}")
            if list(x.shape[1:]) != expected[1:]:
                raise ProgramInputError(f"input '{name}' has shape {list(x.shape)}; the program was compiled for "
                                        f"[N, {', '.join(map(str, expected[1:]))}]: recompile with an example of "
                                        f"that shape")
            env[name] = x.float()
        return env

    def _resolved_params(self) -> list[dict[str, Any]]:
        """Each node's parameters with tensor references replaced by the tensors (computed once)."""
        if self._resolved is None:
            self._resolved = [{k: self.tensors[v[TENSOR_REF]] if isinstance(v, dict) and TENSOR_REF in v else v
                               for k, v in node.params.items()} for node in self.nodes]
        return self._resolved

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the program as one .hir file (format: hat/backend/j5/irfile.py); backend.load reads it."""
        from hat.backend.j5.irfile import save

        return save(self, path)

    def summary(self) -> str:
        """One line per node: op, module, output dtype and shape."""
        lines = [f"integer program for march '{self.march}': {len(self.nodes)} ops, "
                 f"{sum(t.numel() for t in self.tensors.values())} stored integers"]
        for node in self.nodes:
            value = self.values[node.output]
            lines.append(f"  {node.output:<6} {node.op:<16} {value.dtype:<8} {str(value.shape):<20} {node.module}")
        return "\n".join(lines)
