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
"values": {name: {"dtype", "shape", "scale", "axis", "constant"}}, "nodes": [{"op", "inputs", "output", "params",
"module"}], "tensors": {name: {"dtype", "shape", "offset", "nbytes"}}}. A node runs kernels.KERNELS[op] on its
inputs with `params` as keywords; a parameter {"$tensor": name} is the tensor `name`. Values are listed in the
order nodes define them; dim 0 of a shape is the batch.
"""
from __future__ import annotations

import inspect
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Union

import numpy as np

import torch

from hat.backend.j5.kernels import KERNELS
from hat.errors import HatError
from hat.backend.j5.profile import get_profile
from hat.backend.j5.program import TENSOR_REF, Node, Program, Value

MAGIC = b"\x89HIR\r\n\x1a\n"
FORMAT_VERSION = 1
FORMAT_NAME = "hat.j5.program"
_PREAMBLE = struct.Struct("<8sIIII")
_DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
           "float32": torch.float32, "float64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_VALUE_DTYPES = ("float32", "qint8", "qint16", "qint32", *_DTYPES)


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
              "inputs": program.inputs, "outputs": program.outputs,
              "values": {k: vars(v) for k, v in program.values.items()},
              "nodes": [{k: v for k, v in vars(n).items() if not k.startswith("_")} for n in program.nodes],
              "tensors": table}
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(head), zlib.crc32(head), zlib.crc32(payload)))
        f.write(head)
        f.write(payload)
    os.replace(tmp, path)
    return path


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
    head = blob[_PREAMBLE.size:_PREAMBLE.size + head_len]
    payload = blob[_PREAMBLE.size + head_len:]
    if len(head) != head_len:
        raise IRFileError(f"truncated: the header needs {head_len} bytes, the file holds {len(head)}; copy it again")
    if zlib.crc32(head) != head_crc or zlib.crc32(payload) != payload_crc:
        part = "header" if zlib.crc32(head) != head_crc else "payload"
        raise IRFileError(f"corrupt: the {part} checksum does not match (the file was truncated or modified after "
                          f"it was written); copy it again or recompile")
    try:
        header = json.loads(head.decode())
        return _program(header, payload)
    except IRFileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IRFileError(f"invalid header ({type(exc).__name__}: {exc}); the file was not written by "
                          f"Program.save") from None


def _program(header: dict, payload: bytes) -> Program:
    if header.get("format") != FORMAT_NAME:
        raise IRFileError(f"header format is {header.get('format')!r}, expected {FORMAT_NAME!r}")
    try:
        get_profile(header["march"])
    except ValueError as exc:
        raise IRFileError(str(exc)) from None
    tensors = {name: _tensor(name, spec, payload) for name, spec in header["tensors"].items()}
    values = {name: _value(name, spec) for name, spec in header["values"].items()}
    for name, value in values.items():
        if value.constant and name not in tensors:
            raise IRFileError(f"constant value '{name}' has no tensor")
    nodes = [Node(n["op"], list(n["inputs"]), n["output"], dict(n["params"]), str(n.get("module", "")))
             for n in header["nodes"]]
    program = Program(header["march"], list(header["inputs"]), list(header["outputs"]), values, nodes, tensors)
    _check_graph(program)
    return program


def _tensor(name: str, spec: dict, payload: bytes) -> torch.Tensor:
    dtype = _DTYPES.get(spec["dtype"])
    if dtype is None:
        raise IRFileError(f"tensor '{name}' has unknown dtype {spec['dtype']!r}")
    shape, offset, nbytes = [int(d) for d in spec["shape"]], int(spec["offset"]), int(spec["nbytes"])
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if min(shape, default=0) < 0 or numel * itemsize != nbytes or offset < 0 or offset + nbytes > len(payload):
        raise IRFileError(f"tensor '{name}': shape {shape} x {spec['dtype']} does not match its {nbytes} bytes at "
                          f"offset {offset} of a {len(payload)}-byte payload")
    little = torch.empty(0, dtype=dtype).numpy().dtype.newbyteorder("<")
    flat = np.frombuffer(payload, dtype=little, count=numel, offset=offset)
    return torch.from_numpy(flat.astype(flat.dtype.newbyteorder("="))).reshape(shape)


def _value(name: str, spec: dict) -> Value:
    value = Value(str(spec["dtype"]), [int(d) for d in spec["shape"]], [float(s) for s in spec.get("scale", [])],
                  int(spec.get("axis", 1)), bool(spec.get("constant", False)))
    if value.dtype not in _VALUE_DTYPES:
        raise IRFileError(f"value '{name}' has unknown dtype {value.dtype!r}")
    return value


def _check_graph(program: Program) -> None:
    """Every name defined before use, every op known, every node's parameters those its kernel takes."""
    defined = set(program.inputs) | {n for n, v in program.values.items() if v.constant}
    for name in program.inputs:
        if name not in program.values:
            raise IRFileError(f"input '{name}' is not among the values")
    for i, node in enumerate(program.nodes):
        where = f"node {i} ({node.op}, module '{node.module}')"
        kernel = KERNELS.get(node.op)
        if kernel is None:
            raise IRFileError(f"{where}: unknown op; this hat knows {', '.join(sorted(KERNELS))}")
        missing = [name for name in node.inputs if name not in defined]
        if missing or node.output not in program.values:
            raise IRFileError(f"{where}: uses {missing or node.output} before it is defined")
        for key, v in node.params.items():
            if isinstance(v, dict) and TENSOR_REF in v and v[TENSOR_REF] not in program.tensors:
                raise IRFileError(f"{where}: parameter '{key}' refers to a missing tensor {v!r}")
        try:
            inspect.signature(kernel).bind(*node.inputs, **node.params)
        except TypeError as exc:
            raise IRFileError(f"{where}: its parameters do not fit the op ({exc})") from None
        defined.add(node.output)
    if not program.outputs or any(name not in defined for name in program.outputs):
        raise IRFileError(f"outputs {program.outputs} are not all computed by the nodes")
