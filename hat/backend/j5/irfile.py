"""The integer program file (.hir): one versioned file, no pickle, validated before anything runs.

Layout (all integers little-endian):

    offset  size  field
    0       8     magic b"\\x89HIR\\r\\n\\x1a\\n" (a text-mode copy or another format fails here)
    8       4     format version (uint32), FORMAT_VERSION
    12      4     header length H in bytes (uint32)
    16      4     CRC-32 of the header (uint32)
    20      4     CRC-32 of the payload (uint32)
    24      H     header: UTF-8 JSON, below
    24+H    ...   payload: the tensors' raw little-endian bytes, each at its header offset

Header: {"format": "hat.j5.program", "march", "hat_version", "inputs": [value names], "outputs": [value names],
"output_names": [the model's names of the outputs, in order; empty when it returned a tensor or a tuple],
"values": {name: {"dtype", "shape", "scale", "axis", "constant"}}, "nodes": [{"op", "inputs", "output", "params",
"module"}], "tensors": {name: {"dtype", "shape", "offset", "nbytes"}}}. A node computes kernels.KERNELS[op] of its
inputs with `params` as keywords (what to compute; how is the executor's choice); a parameter {"$tensor": name} is
the tensor `name`. Version 2 files also stored how conv2d/linear/matmul summed (accumulate, splits): read, dropped.
Values are listed in the order nodes define them; dim 0 of a shape is the batch.

`load` trusts nothing in the file: every record is type-checked, every node parameter checked against its op's rule
(schema.py: types from the kernel, ranges from the march's profile), every tensor the program computes bounded by
the profile's tensor limits, and the graph run once on meta tensors (shapes only, no memory) so that each node's
output shape and dtype must be the ones the file declares. A file that loads runs on inputs of its compiled shapes.
Load does not re-run the checker's rules on the model (kernel size, channel counts, accumulator overflow): a program
written for diagnosis with HNN_MODEL_EXPORT=1 loads and runs.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Union

import numpy as np

import torch

from hat.backend.j5 import schema, schema_relations
from hat.backend.j5.checker import tensor_findings
from hat.integer.kernels import KERNELS
from hat.errors import HatError
from hat.fileio import atomic_write
from hat.integer.profile import TORCH_DTYPES, Profile, get_profile
from hat.backend.j5.program import TENSOR_REF, Node, Program, Value

MAGIC = b"\x89HIR\r\n\x1a\n"
FORMAT_VERSION = 3  # 2: segment_lookup carries its table grid; 3: no executor details (accumulate, splits)
EXECUTOR_DETAILS = {"conv2d": ("accumulate", "splits"), "linear": ("accumulate", "splits"),
                    "matmul": ("accumulate", "splits")}  # what version 2 stored of how to sum, dropped on load
OLDEST_READABLE = 2  # kernels' parameters changed since: older files are recompiled, not guessed at
FORMAT_NAME = "hat.j5.program"
_PREAMBLE = struct.Struct("<8sIIII")
_DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
           "float32": torch.float32, "float64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_VALUE_DTYPES = ("float32", "qint8", "qint16", "qint32", *_DTYPES)
_VALUE_TORCH = {**_DTYPES, **TORCH_DTYPES}  # a value's dtype name -> the dtype of its tensor
_RECOMPILE = "the file was edited or is corrupt: recompile the model (backend.compile(...).save(path))"
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an int", bool: "true or false"}
_MISSING = object()


class IRFileError(HatError, ValueError):
    """A .hir file that is not one, is corrupt, or comes from a newer hat; the message says which and what to do."""


def save(program: Program, path: Union[str, os.PathLike]) -> Path:
    """Write `program` to `path` (atomically: a crash leaves the old file or none, never half a file)."""
    from hat import __version__

    payload, table = bytearray(), {}
    for name, tensor in program.tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor '{name}' has dtype {tensor.dtype}, which a .hir file cannot hold")
        array = tensor.detach().cpu().contiguous().numpy()
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        table[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "offset": len(payload),
                       "nbytes": len(data)}
        payload += data
    header = {"format": FORMAT_NAME, "march": program.march, "hat_version": __version__,
              "inputs": program.inputs, "outputs": program.outputs, "output_names": program.output_names,
              "values": {k: vars(v) for k, v in program.values.items()},
              "nodes": [{k: v for k, v in vars(n).items() if not k.startswith("_")} for n in program.nodes],
              "tensors": table}
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(head), zlib.crc32(head), zlib.crc32(payload))
    return atomic_write(path, lambda f: f.write(preamble + head + payload))


def load(path: Union[str, os.PathLike]) -> Program:
    """Read and validate a .hir file; any problem is an IRFileError naming the file and the fix."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise IRFileError(f"{path}: no such file (write one with backend.compile(...).save(path) or "
                          f"tools/train.py --stage int_infer)") from None
    try:
        return _parse(blob)
    except IRFileError as exc:
        raise IRFileError(f"{path}: {exc}") from None


def _parse(blob: bytes) -> Program:
    if len(blob) < _PREAMBLE.size or not blob.startswith(MAGIC):
        raise IRFileError(f"not a HAT integer program (.hir) file: it starts with {blob[:8]!r}, not {MAGIC!r}")
    _, version, head_len, head_crc, payload_crc = _PREAMBLE.unpack_from(blob)
    if version > FORMAT_VERSION:
        raise IRFileError(f"format version {version} is newer than this hat reads ({FORMAT_VERSION}): upgrade hat, "
                          f"or recompile the model with this version")
    if version < 1:
        raise IRFileError(f"format version {version} does not exist; the file is corrupt")
    if version < OLDEST_READABLE:
        raise IRFileError(f"format version {version} was written by an older hat whose kernels took other "
                          f"parameters: recompile the model (tools/train.py --stage int_infer, or "
                          f"backend.compile(...).save(path))")
    head = blob[_PREAMBLE.size:_PREAMBLE.size + head_len]
    payload = blob[_PREAMBLE.size + head_len:]
    if len(head) != head_len:
        raise IRFileError(f"truncated: the header needs {head_len} bytes, the file holds {len(head)}; copy it again")
    if zlib.crc32(head) != head_crc or zlib.crc32(payload) != payload_crc:
        part = "header" if zlib.crc32(head) != head_crc else "payload"
        raise IRFileError(f"corrupt: the {part} checksum does not match (the file was truncated or modified after "
                          f"it was written); copy it again or recompile")
    try:
        header = json.loads(head.decode(), parse_constant=_no_constant)
    except RecursionError:
        raise IRFileError(f"invalid header: its JSON is nested too deeply; {_RECOMPILE}") from None
    except ValueError as exc:
        raise IRFileError(f"invalid header: not valid UTF-8 JSON ({_short(exc)}); {_RECOMPILE}") from None
    try:
        return _program(header, payload, version)
    except IRFileError:
        raise
    except Exception as exc:  # a case the checks below do not name: still a refusal, never a crash
        raise IRFileError(f"invalid header ({type(exc).__name__}: {_short(exc)}); the file was not written by "
                          f"Program.save: recompile the model") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a .hir file holds")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _program(header: dict, payload: bytes, version: int = FORMAT_VERSION) -> Program:
    _expect(header, dict, "the header")
    if header.get("format") != FORMAT_NAME:
        raise IRFileError(f"header format is {header.get('format')!r}, expected {FORMAT_NAME!r}")
    march = _field(header, "march", str, "the header")
    try:
        profile = get_profile(march)
    except ValueError as exc:
        raise IRFileError(str(exc)) from None
    records = _field(header, "tensors", dict, "the header")
    tensors = {name: _tensor(name, spec, payload) for name, spec in records.items()}
    values = {name: _value(name, spec) for name, spec in _field(header, "values", dict, "the header").items()}
    for name, value in values.items():
        if value.constant:
            _check_constant(name, value, tensors)
    nodes = [_node(i, record) for i, record in enumerate(_field(header, "nodes", list, "the header"))]
    if version < 3:  # how a conv summed is the executor's choice now, not the file's
        for node in nodes:
            for key in EXECUTOR_DETAILS.get(node.op, ()):
                node.params.pop(key, None)
    inputs, outputs = (_names(header, key) for key in ("inputs", "outputs"))
    output_names = _names(header, "output_names") if "output_names" in header else []
    if output_names and (len(output_names) != len(outputs) or len(set(output_names)) != len(output_names)):
        raise IRFileError(f"output_names {_show(output_names)} must name each of the {len(outputs)} outputs once; "
                          f"{_RECOMPILE}")
    program = Program(march, inputs, outputs, values, nodes, tensors, output_names)
    _check_graph(program)
    _check_limits(program, profile)
    _dry_run(program)
    program.executors()  # weights packed for the fast executor now, not in the first run
    return program


# --- records: types, signs and sizes --------------------------------------------------------------------------------
def _expect(v, kind: type, what: str):
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise IRFileError(f"invalid header: {what} is {_show(v)}, expected {_TYPE_NAMES[kind]}; {_RECOMPILE}")
    return v


def _field(record: dict, key: str, kind: type, where: str, default=_MISSING):
    if key not in record:
        if default is _MISSING:
            raise IRFileError(f"invalid header: {where} has no '{key}'; {_RECOMPILE}")
        return default
    return _expect(record[key], kind, f"'{key}' of {where}")


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _dims(record: dict, where: str) -> list[int]:
    shape = _field(record, "shape", list, where)
    if len(shape) > schema.MAX_RANK or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape):
        raise IRFileError(f"{where}: shape {_show(shape)} is not a list of at most {schema.MAX_RANK} sizes >= 0; "
                          f"{_RECOMPILE}")
    return shape


def _names(header: dict, key: str) -> list[str]:
    names = _field(header, key, list, "the header")
    for name in names:
        _expect(name, str, f"an entry of '{key}'")
    return names


def _tensor(name: str, spec: dict, payload: bytes) -> torch.Tensor:
    where = f"tensor '{name}'"
    _expect(spec, dict, where)
    dtype = _DTYPES.get(_field(spec, "dtype", str, where))
    if dtype is None:
        raise IRFileError(f"tensor '{name}' has unknown dtype {spec['dtype']!r}; a .hir file holds "
                          f"{', '.join(_DTYPES)}")
    shape = _dims(spec, where)
    offset, nbytes = _field(spec, "offset", int, where), _field(spec, "nbytes", int, where)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(shape)
    if numel * itemsize != nbytes or offset < 0 or offset + nbytes > len(payload):
        raise IRFileError(f"tensor '{name}': shape {shape} x {spec['dtype']} does not match its {nbytes} bytes at "
                          f"offset {offset} of a {len(payload)}-byte payload; {_RECOMPILE}")
    little = torch.empty(0, dtype=dtype).numpy().dtype.newbyteorder("<")
    flat = np.frombuffer(payload, dtype=little, count=numel, offset=offset)
    return torch.from_numpy(flat.astype(flat.dtype.newbyteorder("="))).reshape(shape)


def _value(name: str, spec: dict) -> Value:
    where = f"value '{name}'"
    _expect(spec, dict, where)
    dtype = _field(spec, "dtype", str, where)
    if dtype not in _VALUE_DTYPES:
        raise IRFileError(f"value '{name}' has unknown dtype {dtype!r}; expected one of {', '.join(_VALUE_DTYPES)}")
    scale = _field(spec, "scale", list, where, [])
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
               for s in scale):
        raise IRFileError(f"{where}: scale {_show(scale)} is not a list of positive numbers; {_RECOMPILE}")
    axis = _field(spec, "axis", int, where, 1)
    if not -schema.MAX_RANK <= axis < schema.MAX_RANK:
        raise IRFileError(f"{where}: axis {axis} is out of [-{schema.MAX_RANK}, {schema.MAX_RANK}); {_RECOMPILE}")
    return Value(dtype, _dims(spec, where), [float(s) for s in scale], axis,
                 _field(spec, "constant", bool, where, False))


def _check_constant(name: str, value: Value, tensors: dict[str, torch.Tensor]) -> None:
    tensor = tensors.get(name)
    if tensor is None:
        raise IRFileError(f"constant value '{name}' has no tensor")
    if _VALUE_TORCH[value.dtype] != tensor.dtype or list(tensor.shape) != value.shape:
        raise IRFileError(f"constant value '{name}' is declared {value.dtype} {value.shape} but its tensor is "
                          f"{_DTYPE_NAMES[tensor.dtype]} {list(tensor.shape)}; {_RECOMPILE}")


def _node(index: int, record: dict) -> Node:
    where = f"node {index}"
    _expect(record, dict, where)
    inputs = _field(record, "inputs", list, where)
    for name in inputs:
        _expect(name, str, f"an input of {where}")
    return Node(_field(record, "op", str, where), inputs, _field(record, "output", str, where),
                _field(record, "params", dict, where), _field(record, "module", str, where, ""))


# --- the graph: names, ops, parameters ------------------------------------------------------------------------------
def _where(index: int, node: Node) -> str:
    return f"node {index} ({node.op}, module '{node.module}')"


def _check_graph(program: Program) -> None:
    """Every name defined once and before use, every op known, every node's parameters those its kernel takes,
    each within its rule (schema.py)."""
    defined = {n for n, v in program.values.items() if v.constant}
    for name in program.inputs:
        value = program.values.get(name)
        if value is None:
            raise IRFileError(f"input '{name}' is not among the values")
        if value.constant or value.dtype != "float32" or name in defined:
            what = "listed twice" if name in defined else f"a {value.dtype}{' constant' * value.constant} value"
            raise IRFileError(f"input '{name}' is {what}; a program input is a float32 value, listed once; "
                              f"{_RECOMPILE}")
        defined.add(name)
    for i, node in enumerate(program.nodes):
        where = _where(i, node)
        kernel = KERNELS.get(node.op)
        if kernel is None:
            raise IRFileError(f"{where}: unknown op; this hat knows {', '.join(sorted(KERNELS))}")
        missing = [name for name in node.inputs if name not in defined]
        if missing or node.output not in program.values:
            raise IRFileError(f"{where}: uses {missing or node.output} before it is defined")
        if node.output in defined:
            raise IRFileError(f"{where}: its output '{node.output}' is already defined (an input, a constant or "
                              f"another node's output); {_RECOMPILE}")
        try:
            inspect.signature(kernel).bind(*node.inputs, **node.params)
        except TypeError as exc:
            raise IRFileError(f"{where}: its parameters do not fit the op ({exc})") from None
        try:
            schema.check_params(program.march, node.op, node.params, program.tensors, len(node.inputs))
        except schema.ParamError as exc:
            raise IRFileError(f"{where}: {exc}; {_RECOMPILE}") from None
        defined.add(node.output)
    if not program.outputs or any(name not in defined or name in program.inputs or program.values[name].constant
                                  for name in program.outputs):
        raise IRFileError(f"outputs {program.outputs} are not all computed by the nodes")


def _check_limits(program: Program, profile: Profile) -> None:
    """Every value the program computes within the march's tensor limits (the checker's rules): bounded memory."""
    for name in program.inputs:
        shape = program.values[name].shape
        if shape and shape[0] > profile.tensor.max_batch:
            raise IRFileError(f"input '{name}' declares batch {shape[0]}; the limit on {profile.march} is "
                              f"{profile.tensor.max_batch}; {_RECOMPILE}")
    producers = {node.output: node.module for node in program.nodes}
    for name, value in program.values.items():
        if not value.constant:
            finding = next(tensor_findings(name, value, producers.get(name, "input"), profile), None)
            if finding is not None:
                raise IRFileError(f"value '{name}' {value.shape} exceeds the {profile.march} tensor limits "
                                  f"([{finding.rule}] {finding.message}); {_RECOMPILE}")


def _dry_run(program: Program) -> None:
    """Run the graph once on meta tensors of the declared input shapes (no data, no memory): every kernel must
    accept its inputs and parameters and give exactly the declared shape and dtype, which the limits bound."""
    meta = torch.device("meta")
    env = {name: torch.empty(program.values[name].shape, dtype=torch.float32, device=meta) for name in program.inputs}
    env.update({name: program.tensors[name].to(meta) for name, v in program.values.items() if v.constant})
    for i, node in enumerate(program.nodes):
        where = _where(i, node)
        args = [env[name] for name in node.inputs]
        problem = schema_relations.check_inputs(node.op, args)
        if problem:
            raise IRFileError(f"{where}: {problem}; {_RECOMPILE}")
        params = {k: _resolve(program, node.op, k, v, meta) for k, v in node.params.items()}
        try:
            out = KERNELS[node.op](*args, **params)
        except Exception as exc:
            raise IRFileError(f"{where}: the op fails on its declared inputs "
                              f"({', '.join(_describe(a) for a in args)}) with these parameters "
                              f"({type(exc).__name__}: {_short(exc)}); {_RECOMPILE}") from None
        declared = program.values[node.output]
        if not isinstance(out, torch.Tensor) or list(out.shape) != declared.shape or \
                out.dtype != _VALUE_TORCH[declared.dtype]:
            got = _describe(out) if isinstance(out, torch.Tensor) else type(out).__name__
            raise IRFileError(f"{where}: computes {got} for value '{node.output}', but the file declares "
                              f"{declared.dtype} {declared.shape}; {_RECOMPILE}")
        env[node.output] = out


def _resolve(program: Program, op: str, key: str, v, meta: torch.device):
    if not (isinstance(v, dict) and TENSOR_REF in v):
        return v
    tensor = program.tensors[v[TENSOR_REF]]
    return tensor if schema.by_value(program.march, op, key) else tensor.to(meta)


def _describe(t: torch.Tensor) -> str:
    return f"{_DTYPE_NAMES.get(t.dtype, str(t.dtype))} {list(t.shape)}"
