"""The .hir file: a round trip keeps everything; a corrupt, foreign, newer or inconsistent file is refused."""
import json
import struct
import zlib

import pytest
import torch

from hat import backend
from hat.backend.j5 import irfile
from hat.backend.j5.irfile import IRFileError
from hat.models import create_model


@pytest.fixture(scope="module")
def program():
    from tests.backend.conftest import calibrate_and_convert

    torch.manual_seed(0)
    qmodel = calibrate_and_convert(create_model("convnet_small").deploy_model(), [torch.randn(4, 1, 8, 8)])
    return backend.compile(qmodel, example_inputs=(torch.randn(2, 1, 8, 8),))


def _rewrite(path, edit):
    """Change the JSON header with `edit(header)` and write it back with valid checksums: only the schema is wrong."""
    blob = path.read_bytes()
    magic, version, head_len, _, payload_crc = struct.unpack_from("<8sIIII", blob)
    header = json.loads(blob[24:24 + head_len])
    edit(header)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<8sIIII", magic, version, len(head), zlib.crc32(head), payload_crc) + head
                     + blob[24 + head_len:])


def test_round_trip_keeps_nodes_values_and_tensors(program, tmp_path):
    path = program.save(tmp_path / "m.hir")
    loaded = backend.load(path)
    assert [(n.op, n.inputs, n.output, n.module) for n in loaded.nodes] == \
        [(n.op, n.inputs, n.output, n.module) for n in program.nodes]
    assert loaded.values == program.values and loaded.inputs == program.inputs and loaded.outputs == program.outputs
    assert program.tensors.keys() == loaded.tensors.keys()
    for k, tensor in program.tensors.items():
        assert torch.equal(tensor, loaded.tensors[k]) and tensor.dtype == loaded.tensors[k].dtype
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, renamed at the end


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], "truncated|checksum"),
    (lambda b: b[:30], "truncated"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "payload checksum"),
    (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "header checksum"),
    (lambda b: b"", "not a HAT integer program"),
    (lambda b: b"PK\x03\x04" + b[4:], "not a HAT integer program"),  # a zip (torch.save) file
    (lambda b: b[:8] + struct.pack("<I", 99) + b[12:], "newer than this hat reads"),
    (lambda b: b[:8] + struct.pack("<I", 0) + b[12:], "does not exist"),
])
def test_damaged_files_are_refused_with_the_reason(program, tmp_path, damage, message):
    path = program.save(tmp_path / "m.hir")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(IRFileError, match=message) as info:
        backend.load(path)
    assert str(path) in str(info.value)


def _first_conv(h):
    return next(n for n in h["nodes"] if n["op"] == "conv2d")


@pytest.mark.parametrize("edit, message", [
    (lambda h: h.update(format="onnx"), "expected 'hat.j5.program'"),
    (lambda h: h.update(march="nash"), "unknown march 'nash'"),
    (lambda h: h["nodes"][1].update(op="softmax"), "unknown op"),
    (lambda h: h["nodes"][1].update(inputs=["v99"]), "before it is defined"),
    (lambda h: _first_conv(h)["params"].update(weight={"$tensor": "nope"}), "missing tensor"),
    (lambda h: _first_conv(h)["params"].update(speed=3), "do not fit the op"),
    (lambda h: _first_conv(h)["params"].pop("bias"), "do not fit the op"),
    (lambda h: next(iter(h["tensors"].values())).update(shape=[999]), "does not match its"),
    (lambda h: next(iter(h["tensors"].values())).update(dtype="complex64"), "unknown dtype"),
    (lambda h: h.update(outputs=[]), "outputs"),
    (lambda h: h.pop("nodes"), "invalid header"),
])
def test_inconsistent_headers_are_refused(program, tmp_path, edit, message):
    path = program.save(tmp_path / "m.hir")
    _rewrite(path, edit)
    with pytest.raises(IRFileError, match=message):
        backend.load(path)


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(IRFileError, match="no such file.*compile"):
        backend.load(tmp_path / "none.hir")


def test_header_is_documented_json_with_format_version(program, tmp_path):
    blob = program.save(tmp_path / "m.hir").read_bytes()
    assert blob[:8] == irfile.MAGIC
    version, head_len = struct.unpack_from("<II", blob, 8)
    header = json.loads(blob[24:24 + head_len])
    assert version == irfile.FORMAT_VERSION and header["format"] == "hat.j5.program" and header["march"] == "bayes"
    assert {"op", "inputs", "output", "params", "module"} == set(header["nodes"][0])
