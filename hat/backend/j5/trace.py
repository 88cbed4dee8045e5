"""Tracing a quantized model into a Program: run it once on example inputs and record every integer op.

Every quantized op goes through `hat.quant.qtensor.apply` (one kernel call), which reports to the active Tracer;
so the program is the sequence of kernels the model ran, with the parameters it ran them with. Float code on the
model's inputs or on a DeQuantStub's output (a loss, a target, post-processing), tensor-valued control flow, and
outputs that do not come from a DeQuantStub make the trace fail with a message that says what to change.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from hat.backend.j5.program import TENSOR_REF, Node, Program, Value
from hat.integer import recording

# Tensor functions that read metadata, not values: free on a model input.
_METADATA = {"size", "dim", "__len__", "numel", "is_floating_point", "__get__", "__format__", "__repr__",
             "element_size", "stride", "is_contiguous", "get_device", "type"}


class UntraceableError(RuntimeError):
    """The model does something the integer program cannot record; the message names the module and the fix."""


class Tracer:
    def __init__(self, model: nn.Module, march: str):
        self.module_names = {id(m): name for name, m in model.named_modules()}
        self.stack: list[str] = []
        self.in_kernel = 0
        self.ids: dict[int, str] = {}  # id(QTensor or float tensor) -> value name
        self.alive: list[Any] = []  # keeps traced objects alive so their ids stay unique
        self.float_values: dict[int, str] = {}  # id -> what it is ("the model input", "the output of DeQuantStub x")
        self.program = Program(march, [], [], {}, [], {})
        self.counter = itertools.count()

    # --- where we are -------------------------------------------------------------------------------------------
    @property
    def module(self) -> str:
        return self.stack[-1] if self.stack else ""

    @contextlib.contextmanager
    def kernel(self) -> Iterator[None]:
        self.in_kernel += 1
        try:
            yield
        finally:
            self.in_kernel -= 1

    # --- values ---------------------------------------------------------------------------------------------------
    def add_input(self, x: Any, index: int) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise UntraceableError(f"example_inputs[{index}] is {type(x).__name__}, not a float tensor: the integer "
                                   f"program takes float tensors (images, features) as inputs")
        name = self._new_value(x, Value("float32", list(x.shape)))
        self.program.inputs.append(name)
        self.float_values[id(x)] = f"the model input '{name}'"

    def _new_value(self, obj: Any, value: Value) -> str:
        name = f"v{next(self.counter)}"
        self.program.values[name] = value
        self.ids[id(obj)] = name
        self.alive.append(obj)
        return name

    def _value_of(self, obj: Any, consumer: str) -> str:
        from hat.quant.qtensor import QTensor

        name = self.ids.get(id(obj))
        if name is not None:
            return name
        if isinstance(obj, QTensor):
            raise UntraceableError(f"module '{consumer}' uses a QTensor made outside the integer ops (by "
                                   f"'{obj.producer or '?'}'); build QTensors only with hat.quant ops")
        if isinstance(obj, torch.Tensor):  # a constant the model holds (a fixed grid, a table)
            name = self._new_value(obj, Value(str(obj.dtype).replace("torch.", ""), list(obj.shape), constant=True))
            self.program.tensors[name] = obj.detach().clone()
            return name
        raise UntraceableError(f"module '{consumer}': an op input is {type(obj).__name__}, not a tensor")

    def record(self, op: str, inputs: Sequence[Any], output: Any, params: dict[str, Any]) -> None:
        """One kernel call: `op`(*inputs, **params) -> output (a QTensor, or a float tensor for dequantize)."""
        from hat.quant.qtensor import QTensor

        module = self.module
        names = [self._value_of(x, module) for x in inputs]
        node_index = len(self.program.nodes)
        stored = {}
        for key, v in params.items():
            if isinstance(v, torch.Tensor):
                tensor_name = f"n{node_index}.{key}"
                self.program.tensors[tensor_name] = v.detach().clone()
                v = {TENSOR_REF: tensor_name}
            stored[key] = v
        if isinstance(output, QTensor):
            value = Value(output.dtype, list(output.shape), output.scale.detach().double().tolist(), output.axis)
        else:
            value = Value("float32", list(output.shape))
            self.float_values[id(output)] = f"the output of DeQuantStub '{module}'"
        out_name = self._new_value(output, value)
        batch = self.program.values[self.program.inputs[0]].shape[0] if self.program.inputs else None
        self.program.nodes.append(Node(op, names, out_name, _batch_free(op, stored, batch, output), module))

    def set_outputs(self, result: Any) -> None:
        from hat.quant.qtensor import QTensor

        leaves = [x for x in tree_flatten(result)[0] if isinstance(x, (torch.Tensor, QTensor))]
        if not leaves:
            raise UntraceableError(f"the model returned {type(result).__name__}, no tensor: an empty model (FAQ 2.4 "
                                   f"Q7). forward must return its result on every path (check `return` and if/else)")
        if isinstance(result, dict):
            if not all(isinstance(key, str) for key in result) or len(leaves) != len(result):
                raise UntraceableError("a model returning a dict must map string names to one tensor each (the "
                                       "program keeps the names)")
            self.program.output_names = list(result)
        for i, x in enumerate(leaves):
            name = self.ids.get(id(x))
            if isinstance(x, QTensor):
                raise UntraceableError(f"output {i} is a QTensor from '{x.producer or '?'}': end the model with a "
                                       f"DeQuantStub (self.dequant = DeQuantStub(); return self.dequant(y))")
            if name is None or self.program.values[name].constant or name in self.program.inputs:
                raise UntraceableError(f"output {i} is not computed by the quantized model (a constant or the input "
                                       f"itself): return what the DeQuantStub gives")
            self.program.outputs.append(name)


def _batch_free(op: str, params: dict, batch: Optional[int], output: Any) -> dict:
    """reshape/view shapes keep the batch dim free (-1), so the program runs any batch size: a first dim that is a
    multiple of the model's batch (the batch itself, or batch x windows as Swin folds them) follows the batch."""
    if op != "layout" or params["method"] not in ("reshape", "view"):
        return params
    if output.ndim and batch and output.shape[0] % batch == 0:
        return dict(params, args=[-1, *output.shape[1:]])
    return params


class _FloatWatch(TorchFunctionMode):
    """Fails the trace when float code runs on the model input or a DeQuantStub's output."""

    def __init__(self, tracer: Tracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        name = getattr(func, "__name__", str(func))
        if not tracer.in_kernel and name not in _METADATA:
            for x in tree_flatten((args, kwargs))[0]:
                what = tracer.float_values.get(id(x)) if isinstance(x, torch.Tensor) else None
                if what is not None:
                    raise UntraceableError(_float_code_message(name, what, tracer.module))
        return func(*args, **kwargs)


def _float_code_message(func: str, what: str, module: str) -> str:
    where = f"in module '{module}'" if module else "in the model's forward"
    if func == "__bool__":
        return (f"{where}: control flow (if/while/assert) on the value of {what}: a compiled program has one path "
                f"(FAQ 2.4 Q10). Remove the data-dependent branch from the deploy model")
    return (f"{where}: float op '{func}' on {what}. The integer program runs only quantized ops; a loss, a target "
            f"or post-processing must stay out of the deploy model (FAQ 2.4 Q8): return the DeQuantStub's output "
            f"and compute the rest outside, or quantize the op (QuantStub before it)")


def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor], march: str,
          on_module: Optional[Callable[[str, nn.Module], None]] = None) -> Program:
    """Run the quantized `model` once on `example_inputs` and return the integer program it executed;
    `on_module(name, module)` sees every module call (the checker refuses losses and float layers there)."""
    tracer = Tracer(model, march)
    for i, x in enumerate(example_inputs):
        tracer.add_input(x, i)

    def enter(module, args):
        tracer.stack.append(tracer.module_names.get(id(module), tracer.module))
        if on_module is not None:
            on_module(tracer.module, module)

    def leave(module, args, output):
        tracer.stack.pop()

    hooks = [nn.modules.module.register_module_forward_pre_hook(enter),
             nn.modules.module.register_module_forward_hook(leave)]
    try:
        with torch.no_grad(), recording.recording(tracer), _FloatWatch(tracer):
            result = model(*example_inputs)
        tracer.set_outputs(result)
    except Exception as exc:
        exc.hat_module = tracer.module  # the innermost module running when it failed, for the report
        raise
    finally:
        for hook in hooks:
            hook.remove()
    return tracer.program
