"""The deployability check: does a quantized model compile for the march, and if not, what to change.

Three passes: the model's modules (not converted, a layer left float, a loss inside), the trace (untraceable code,
float code, an int32 output used by an op, no output), then each op of the traced program against the profile's
limits. Every finding names the module, the limit, the value and the fix; the reference toolchain's compile
failures (FAQ 2.4 Q6-Q11) are among them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from hat.integer.kernels import accumulator_bound
from hat.integer.profile import Profile, get_profile
from hat.backend.j5.legalize import legalize
from hat.backend.j5.program import TENSOR_REF, Node, Program, Value, pair
from hat.backend.j5.trace import UntraceableError, trace
from hat.errors import HatError

EXPORT_ENV = "HNN_MODEL_EXPORT"  # the reference toolchain's switch: write the IR file even when the check fails


@dataclass
class Finding:
    rule: str
    module: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.module or '<model>'}: {self.message}"


@dataclass
class Report:
    """`deployable` when there are no findings; str() is the report a user reads."""

    march: str
    findings: list[Finding] = field(default_factory=list)
    program: Optional[Program] = None

    @property
    def deployable(self) -> bool:
        return not self.findings

    def __str__(self) -> str:
        ops = f", {len(self.program.nodes)} integer ops" if self.program is not None else ""
        if self.deployable:
            return f"deployable on {self.march}{ops}: every op and limit checked"
        lines = [f"NOT deployable on {self.march}{ops}: {len(self.findings)} problem(s)"]
        return "\n".join(lines + [f"  {f}" for f in self.findings])


class ModelCheckError(HatError):
    """backend.compile of a model that is not deployable; carries the report."""

    def __init__(self, report: Report, note: str = ""):
        super().__init__(f"{report}{note}")
        self.report = report


def check_model(model: nn.Module, example_inputs: Sequence[torch.Tensor], march: str = "bayes") -> Report:
    """Deployability of a converted (quantized) model on `march`, with the traced program when tracing worked."""
    profile = get_profile(march)
    report = Report(march, list(_module_findings(model, march)))
    if report.findings:
        return report
    was_training = model.training
    try:
        report.program = trace(model.eval(), tuple(example_inputs), march, _refuse_float_module)
    except (UntraceableError, RuntimeError, TypeError, ValueError, AttributeError, IndexError) as exc:
        report.findings.append(Finding("trace", _module_in(exc), _trace_message(exc)))
        return report
    finally:
        model.train(was_training)  # the caller's model leaves as it came
    report.program = legalize(report.program, profile)
    report.findings += list(_program_findings(report.program, profile))
    return report


def compile_model(model: nn.Module, example_inputs: Sequence[torch.Tensor], march: str = "bayes") -> Program:
    """check_model, then the program; ModelCheckError with the report when the model is not deployable. With
    HNN_MODEL_EXPORT=1 the traced program is written anyway (to $HNN_MODEL_EXPORT_PATH, default
    ./hnn_model_export.hir), for diagnosis."""
    report = check_model(model, example_inputs, march)
    if report.deployable:
        return report.program
    note = ""
    if export_requested():
        if report.program is not None:
            path = report.program.save(os.environ.get(f"{EXPORT_ENV}_PATH", "hnn_model_export.hir"))
            note = f"\n(the program was written to {Path(path).resolve()} for diagnosis: {EXPORT_ENV}=1)"
        else:
            note = f"\n({EXPORT_ENV}=1: no program to write, the model did not trace)"
    raise ModelCheckError(report, note)


def export_requested() -> bool:
    """HNN_MODEL_EXPORT set (and not 0): write the program even when the check fails."""
    return os.environ.get(EXPORT_ENV, "") not in ("", "0")


# --- pass 1: the modules ---------------------------------------------------------------------------------------------
def _module_findings(model: nn.Module, march: str) -> Iterator[Finding]:
    from hat.quant.fake_quantize import FakeQuantize
    from hat.quant.float_part import FloatPart
    from hat.quant.quantized import QuantizedQuantStub

    if not isinstance(model, nn.Module):
        yield Finding("model", "", f"expected a torch nn.Module, got {type(model).__name__}")
        return
    modules = dict(model.named_modules())
    if any(isinstance(m, FakeQuantize) for m in modules.values()):
        yield Finding("convert", "", "the model still has fake quantization (a QAT model): convert it first, "
                                     "qmodel = hat.quant.convert(qat_model)")
        return
    if not any(isinstance(m, QuantizedQuantStub) for m in modules.values()):
        yield Finding("convert", "", "the model has no quantized input (no converted QuantStub): it is a float "
                                     "model. Prepare it (prepare_qat / prepare_qat_fx), calibrate, train and convert")
        return
    for name, module in modules.items():
        if isinstance(module, FloatPart):
            yield Finding("float_module", module.hat_name or name, _float_part_message(module.hat_name or name, march))
    for name, module in modules.items():
        built_for = getattr(getattr(module, "profile", None), "march", march)
        if built_for != march:
            yield Finding("march", name, f"converted for march '{built_for}' (the qconfig's march at prepare_qat), "
                                         f"checked for '{march}': its integer parameters follow '{built_for}'. "
                                         f"Prepare, train and convert with march='{march}' (quant.march), or check "
                                         f"for '{built_for}'")
            return


def _float_part_message(name: str, march: str) -> str:
    return (f"module '{name}' runs in float (quant.float_modules / qconfig None): the integer program cannot hold "
            f"it, so the model cannot be compiled for {march}. Give it a qconfig to deploy: remove '{name}' from "
            f"quant.float_modules (or its None entry in the qconfig_dict), then calibrate, train and convert again")


def _refuse_float_module(name: str, m: nn.Module) -> None:
    """Called for each module the trace enters: a loss, or a layer left float, cannot run in the program."""
    if getattr(m, "hat_constant", False):  # float code on the model's own tensors: its output is a constant
        return
    if isinstance(m, nn.modules.loss._Loss):
        raise UntraceableError(f"a loss ({type(m).__name__}) runs inside the deploy model (FAQ 2.4 Q8): compile "
                               f"only the inference part (e.g. model.deploy_model())")
    weight = getattr(m, "weight", None)
    if (isinstance(weight, torch.Tensor) and weight.is_floating_point() and type(m).__module__.startswith("torch.")
            and not isinstance(m, torch.fx.GraphModule)):  # a traced model's own attribute named `weight` is data
        raise UntraceableError(f"{type(m).__name__} has no qconfig and stayed float (FAQ 2.4 Q8): give it a qconfig "
                               f"(remove it from quant.float_modules / the qconfig_dict's None entries), then "
                               f"calibrate and convert again")


# --- pass 2: the trace -----------------------------------------------------------------------------------------------
def _module_in(exc: Exception) -> str:
    return getattr(exc, "hat_module", "")


def _trace_message(exc: Exception) -> str:
    from hat.quant.qtensor import QuantizationError

    if isinstance(exc, (UntraceableError, QuantizationError)):
        return str(exc)
    return (f"the model raised {type(exc).__name__} while tracing: {exc}. It must run on example_inputs exactly "
            f"like model(*example_inputs) does in eval mode (FAQ 2.4 Q8: the model is not traceable)")


# --- pass 3: the program against the limits -------------------------------------------------------------------------
def _program_findings(program: Program, profile: Profile) -> Iterator[Finding]:
    consumers: dict[str, list[Node]] = {}
    for node in program.nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    for name in program.inputs:
        batch = program.values[name].shape[0]
        if batch > profile.tensor.max_batch:
            yield Finding("tensor.batch", "input", f"input {name} has batch {batch}; it exceeds "
                                                   f"{profile.tensor.max_batch} on {profile.march}: compile with a "
                                                   f"smaller example batch")
    for name, value in program.values.items():
        if not value.constant:
            yield from tensor_findings(name, value, _producer(program, name), profile)
    for node in program.nodes:
        rule = _NODE_RULES.get(node.op)
        if rule is not None:
            yield from rule(node, program, profile, consumers.get(node.output, []))


def _producer(program: Program, value: str) -> str:
    return next((n.module for n in program.nodes if n.output == value), "input")


def tensor_findings(name: str, value: Value, module: str, profile: Profile) -> Iterator[Finding]:
    limits = profile.tensor
    shape = value.shape
    too_big = [d for d in shape[1:] if d > limits.max_hwc]
    if too_big:
        yield Finding("tensor.dims", module, f"tensor {name} has shape {shape}; H, W and C must be <= "
                                             f"{limits.max_hwc} on {profile.march}: split the tensor or downsample")
    itemsize = {"qint8": 1, "qint16": 2}.get(value.dtype, 4)
    nbytes = itemsize
    for d in shape:
        nbytes *= d
    if nbytes > limits.max_bytes:
        yield Finding("tensor.bytes", module, f"tensor {name} {shape} ({value.dtype}) takes {nbytes} bytes; the "
                                              f"limit is {limits.max_bytes} (1 GB): use a smaller input or batch")


def _conv_findings(node: Node, program: Program, profile: Profile, consumers: list[Node]) -> Iterator[Finding]:
    limits = profile.conv
    weight = program.tensors[node.params["weight"][TENSOR_REF]]
    is_conv = node.op == "conv2d"
    groups = node.params.get("groups", 1) if is_conv else 1
    out_c, in_c = weight.shape[0], weight.shape[1] * groups
    kernel = list(weight.shape[2:]) if is_conv else [1, 1]
    model_output = bool(consumers) and all(c.op == "dequantize" for c in consumers)
    max_out = limits.max_out_channels_model_output if model_output else limits.max_out_channels
    m, kind = node.module, "conv" if is_conv else "linear"

    def bad(rule: str, what: str, fix: str) -> Finding:
        return Finding(f"{kind}.{rule}", m, f"{what} on {profile.march}; {fix}")

    if in_c > limits.max_in_channels:
        yield bad("in_channels", f"{in_c} input channels, limit {limits.max_in_channels}",
                  "split the input channels into groups or add a 1x1 conv that reduces them")
    if out_c > max_out:
        yield bad("out_channels", f"{out_c} output channels, limit {max_out}", "split the layer into several")
    low, high = limits.kernel_range
    if any(not low <= k <= high for k in kernel):
        yield bad("kernel", f"kernel {kernel}, each side must be in [{low}, {high}]",
                  "use a smaller kernel (stack 3x3 convs) or dilation")
    per_filter = weight[0].numel()
    if per_filter >= limits.max_weight_elements_per_filter:
        yield bad("weight_size", f"C*kH*kW = {per_filter} per filter, limit < {limits.max_weight_elements_per_filter}",
                  "reduce input channels or kernel size, or use groups")
    if is_conv:
        yield from _conv_geometry(node, limits, consumers, bad)
    yield from _overflow(node, program, profile, weight)


def _conv_geometry(node: Node, limits, consumers: list[Node], bad: Callable) -> Iterator[Finding]:
    stride, padding, dilation = (pair(node.params[k]) for k in ("stride", "padding", "dilation"))
    if max(padding) > limits.max_padding:
        yield bad("padding", f"padding {padding}, limit {limits.max_padding}", "pad less (or pad with a separate op)")
    if max(dilation) > limits.max_dilation:
        yield bad("dilation", f"dilation {dilation}, limit {limits.max_dilation}", "use a smaller dilation")
    if max(dilation) > 1 and max(stride) != 1:
        yield bad("stride", f"stride {stride} with dilation {dilation}: a dilated conv needs stride 1",
                  "use stride 1 and downsample with a separate op")
    if max(stride) > limits.max_stride:
        yield bad("stride", f"stride {stride}, limit {limits.max_stride}", "use a smaller stride")
    fused_add = any(c.op == "add" for c in consumers)
    if fused_add and any(s not in limits.strides_with_fused_add for s in stride):
        allowed = " or ".join(map(str, limits.strides_with_fused_add))
        yield bad("stride", f"stride {stride} on a conv whose output feeds an add (fused shortcut); it must be "
                            f"{allowed}", "downsample before the conv, or use stride 1/2")


def _overflow(node: Node, program: Program, profile: Profile, weight: torch.Tensor) -> Iterator[Finding]:
    in_dtype = program.values[node.inputs[0]].dtype
    bias = program.tensors[node.params["bias"][TENSOR_REF]]
    worst = accumulator_bound(weight, in_dtype, bias)
    limit = profile.qrange(profile.accumulator_dtype)[1]
    if worst > limit:
        yield Finding("accumulator", node.module,
                      f"with {in_dtype} input the int32 accumulator can reach {worst} > {limit} (sum |w| x max |x| "
                      f"+ |bias|) on {profile.march}: give the input an int8 qconfig, or reduce the layer's fan-in")


def _grid_sample_findings(node: Node, program: Program, profile: Profile, consumers) -> Iterator[Finding]:
    limits = profile.grid_sample
    x, grid = (program.values[name] for name in node.inputs[:2])
    h, w = x.shape[-2:]
    m = node.module
    if x.dtype != "qint8":
        yield Finding("grid_sample.dtype", m, f"input is {x.dtype}; J5 grid_sample takes qint8: give the module "
                                              f"before it an int8 qconfig")
    if not grid.constant and grid.dtype not in ("qint8", "qint16"):
        yield Finding("grid_sample.dtype", m, f"grid is {grid.dtype}; it must be qint8 or qint16")
    if max(h, w) > limits.max_hw or h * w > limits.max_area:
        yield Finding("grid_sample.size", m, f"input {h}x{w}: H, W must be <= {limits.max_hw} and H*W <= "
                                             f"{limits.max_area} on {profile.march}; downsample first")
    if node.params["mode"] not in limits.modes or node.params["padding_mode"] not in limits.padding_modes:
        yield Finding("grid_sample.mode", m, f"mode {node.params['mode']}/{node.params['padding_mode']}; supported "
                                             f"{limits.modes} / {limits.padding_modes}")


_NODE_RULES = {"conv2d": _conv_findings, "linear": _conv_findings, "grid_sample": _grid_sample_findings}


def _matmul_findings(node: Node, program: Program, profile: Profile, consumers) -> Iterator[Finding]:
    """matmul of two activations: the worst |sum| of K products, K * max|x| * max|y| (the dtypes' ranges: both
    operands are activations, no weights to bound it by), must fit the int32 accumulator."""
    x, y = (program.values[name] for name in node.inputs[:2])
    k = x.shape[-1]
    worst = k * max(map(abs, profile.qrange(x.dtype))) * max(map(abs, profile.qrange(y.dtype)))
    limit = profile.qrange(profile.accumulator_dtype)[1]
    if worst > limit:
        small, wide = (max(map(abs, profile.qrange(d))) for d in ("qint8", "qint16"))
        yield Finding("accumulator", node.module,
                      f"matmul of {x.dtype} x {y.dtype} over K = {k}: the int32 accumulator can reach {worst} > "
                      f"{limit} (K x max|x| x max|y|) on {profile.march}. qint8 x qint8 fits K <= "
                      f"{limit // small ** 2} and qint8 x qint16 K <= {limit // (small * wide)}: give the modules "
                      f"that make its operands int8 qconfigs (qint16 x qint16 overflows from K = 2), or split K")


_NODE_RULES["matmul"] = _matmul_findings
