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


def _rewrite(path, edit, text_edit=lambda head: head, version=None):
    """Change the JSON header with `edit(header)` (then its text with `text_edit`, the format version to `version`)
    and write it back with valid checksums: the attack of a hand-edited file, only the content is wrong."""
    blob = path.read_bytes()
    magic, written, head_len, _, payload_crc = struct.unpack_from("<8sIIII", blob)
    header = json.loads(blob[24:24 + head_len])
    edit(header)
    head = text_edit(json.dumps(header)).encode()
    path.write_bytes(struct.pack("<8sIIII", magic, version or written, len(head), zlib.crc32(head), payload_crc)
                     + head + blob[24 + head_len:])


def test_round_trip_keeps_nodes_values_and_tensors(program, tmp_path):
    path = program.save(tmp_path / "m.hir")
    loaded = backend.load(path)
    assert [(n.op, n.inputs, n.output, n.module) for n in loaded.nodes] == \
        [(n.op, n.inputs, n.output, n.module) for n in program.nodes]
    assert loaded.values == program.values and loaded.inputs == program.inputs and loaded.outputs == program.outputs
    assert program.tensors.keys() == loaded.tensors.keys()
    for k, tensor in program.tensors.items():
        assert torch.equal(tensor, loaded.tensors[k]) and tensor.dtype == loaded.tensors[k].dtype
    assert [p.name for p in tmp_path.iterdir()] == ["m.hir"]  # written through a temporary file, renamed at the end


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], "truncated|checksum"),
    (lambda b: b[:30], "truncated"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "payload checksum"),
    (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "header checksum"),
    (lambda b: b"", "not a HAT integer program"),
    (lambda b: b"PK\x03\x04" + b[4:], "not a HAT integer program"),  # a zip (torch.save) file
    (lambda b: b[:8] + struct.pack("<I", 99) + b[12:], "newer than this hat reads"),
    (lambda b: b[:8] + struct.pack("<I", 0) + b[12:], "does not exist"),
    (lambda b: b[:8] + struct.pack("<I", 1) + b[12:], "older hat.*recompile the model"),
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
    (lambda h: h.update(output_names=["a", "b"]), "must name each of the 1 outputs once"),
    (lambda h: h.update(output_names=[3]), "an entry of 'output_names'"),
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


def test_version_2_files_load_without_their_executor_details(program, tmp_path):
    """Version 2 stored how each conv summed (accumulate, splits); version 3 leaves that to the executor."""
    def as_version_2(header):
        for node in header["nodes"]:
            if node["op"] in ("conv2d", "linear"):
                node["params"].update(accumulate="float32", splits=1)

    path = program.save(tmp_path / "m.hir")
    _rewrite(path, as_version_2, version=2)
    loaded = backend.load(path)
    assert all("accumulate" not in n.params and "splits" not in n.params for n in loaded.nodes)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded.run(x), program.run(x))
    _rewrite(path, as_version_2, version=3)
    with pytest.raises(IRFileError, match="accumulate"):  # a version 3 file has no such parameter
        backend.load(path)


# --- hand-edited parameters, records and shapes (CRC recomputed): each refused with what, where and the fix --------
def _node(h, op, k=0):
    return [n for n in h["nodes"] if n["op"] == op][k]


def _retype_weight(h, dtype="int32", itemsize=4):
    """The first conv's weight as another dtype, its shape and nbytes made consistent with the same bytes."""
    record = h["tensors"][_first_conv(h)["params"]["weight"]["$tensor"]]
    record.update(dtype=dtype, shape=[record["nbytes"] // itemsize])


_NESTED = 100_000


@pytest.mark.parametrize("edit, message", [
    (lambda h: _first_conv(h)["params"].update(stride="ab"),
     r"node 1 \(conv2d, module 'backbone.0.0'\): parameter 'stride' is 'ab', expected an int or a list of 1-2 ints in "
     r"\[1, 256\]; the file was edited or is corrupt: recompile"),
    (lambda h: _first_conv(h)["params"].update(padding=[-1, -1]), r"parameter 'padding' is \[-1, -1\].*\[0, 256\]"),
    (lambda h: _first_conv(h)["params"].update(padding=[200000, 200000]), r"'padding' is \[200000, 200000\]"),
    (lambda h: _first_conv(h)["params"].update(dilation=[True, 1]), r"'dilation' is \[True, 1\]"),
    (lambda h: _first_conv(h)["params"].update(out_dtype="qint7"), r"'out_dtype' is 'qint7', expected one of"),
    (lambda h: _node(h, "quantize")["params"].update(dtype="qint32"), r"'dtype' is 'qint32', expected one of "
                                                                      r"'qint8', 'qint16'"),
    (lambda h: _node(h, "global_avg_pool")["params"].update(shift=200), r"global_avg_pool.*'shift' is 200.*\[0, 31\]"),
    (lambda h: _node(h, "global_avg_pool")["params"].update(multiplier=40000), r"'multiplier' is 40000.*32767"),
    (lambda h: _first_conv(h)["params"].update(shift=_first_conv(h)["params"]["weight"]),
     r"'shift' refers to tensor 'n1.weight' with values in .*expected .*\[0, 31\]"),
    (lambda h: _first_conv(h)["params"].update(groups=2.5), r"'groups' is 2.5, expected an int"),
    (lambda h: _node(h, "layout")["params"].update(method="__class__"), r"'method' is '__class__', expected one of"),
    (lambda h: _node(h, "layout")["params"].update(args=[1, -1, 2, 3]), r"node 5 \(layout.*the op fails on its "
                                                                        r"declared inputs \(int8 \[2, 64, 1, 1\]\)"),
    (_retype_weight, r"'weight' refers to tensor 'n1.weight' of dtype int32; expected .*dtype int8"),
    (lambda h: h["values"]["v2"].update(shape=[2, 16, 9, 9]),
     r"node 1 \(conv2d.*computes int8 \[2, 16, 8, 8\] for value 'v2', but the file declares qint8 \[2, 16, 9, 9\]"),
    (lambda h: h["values"]["v2"].update(dtype="qint16"), r"computes int8 .* declares qint16"),
    (lambda h: h["values"]["v0"].update(shape=[10 ** 9, 1, 8, 8]), r"input 'v0' declares batch 1000000000; the "
                                                                    r"limit on bayes is 4096"),
    (lambda h: [v.update(shape=[2, *v["shape"][1:3], 70000]) for v in h["values"].values() if len(v["shape"]) == 4],
     r"exceeds the bayes tensor limits"),
    (lambda h: h["values"]["v3"].update(scale=["x"]), r"value 'v3': scale \['x'\] is not a list of positive"),
    (lambda h: h["values"]["v3"].update(axis=True), r"'axis' of value 'v3' is True, expected an int"),
    (lambda h: next(iter(h["tensors"].values())).update(shape=[-1]), r"sizes >= 0"),
    (lambda h: next(iter(h["tensors"].values())).update(offset="0"), r"'offset' of tensor 'n0.scale' is '0'"),
    (lambda h: h["nodes"][2].update(output="v2"), r"output 'v2' is already defined"),
    (lambda h: h["nodes"].__setitem__(0, ["quantize"]), r"node 0 is \['quantize'\], expected an object"),
    (lambda h: _first_conv(h)["params"].update(groups={"$tensor": "n1.bias"}), r"'groups' is \{'\$tensor'"),
])
def test_hand_edited_parameters_are_refused(program, tmp_path, edit, message):
    path = program.save(tmp_path / "m.hir")
    _rewrite(path, edit)
    with pytest.raises(IRFileError, match=message) as info:
        backend.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text_edit, message", [
    (lambda head: head.replace('"ceil"', "[" * _NESTED + "]" * _NESTED), "nested too deeply"),
    (lambda head: head.replace('"ceil"', "NaN"), "NaN is not a number"),
    (lambda head: head.replace('"ceil"', "1" * 5000), "not valid UTF-8 JSON"),
])
def test_hostile_json_is_refused(program, tmp_path, text_edit, message):
    path = program.save(tmp_path / "m.hir")
    _rewrite(path, lambda h: _first_conv(h)["params"].update(stride="ceil"), text_edit)
    with pytest.raises(IRFileError, match=message):
        backend.load(path)


def test_every_kernel_has_a_bounded_parameter_schema():
    from hat.integer.kernels import KERNELS
    from hat.backend.j5.schema import op_schema, unbounded

    assert set(op_schema("bayes")) == set(KERNELS)
    assert unbounded("bayes") == []  # a new kernel parameter needs a rule (range, choices or dtypes) in schema.py


def test_program_input_error_is_a_hat_error_and_a_value_error():
    from hat.backend import ProgramInputError
    from hat.errors import HatError

    assert issubclass(ProgramInputError, HatError) and issubclass(ProgramInputError, ValueError)


class _TwoHeads(torch.nn.Module):
    """A deploy model returning a dict: the program keeps the names and their order."""

    def __init__(self):
        super().__init__()
        from hat.quant import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.score, self.box = torch.nn.Conv2d(4, 2, 1), torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv(self.quant(x)))
        return {"score": self.dequant(self.score(y)), "box": self.dequant(self.box(y))}


def test_a_dict_output_model_compiles_to_named_outputs_that_survive_the_file(tmp_path):
    from tests.backend.conftest import calibrate_and_convert

    torch.manual_seed(0)
    qmodel = calibrate_and_convert(_TwoHeads(), [torch.randn(4, 1, 6, 6)])
    x = torch.randn(3, 1, 6, 6)
    loaded = backend.load(backend.compile(qmodel, example_inputs=(x,)).save(tmp_path / "two.hir"))
    assert loaded.output_names == ["score", "box"]
    got, expected = loaded.run(x), qmodel(x)
    assert list(got) == ["score", "box"] and all(torch.equal(got[k], expected[k]) for k in expected)
