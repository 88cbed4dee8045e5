"""Look-up tables (hat/integer/lut.py; kernels.lookup and kernels.segment_lookup): the exact int8 table, and the
segmented int16 table measured on every int16 input against f in float64."""
import pytest
import torch

from hat import backend
from hat.backend.j5 import schema_relations
from hat.integer import kernels, lut
from hat.backend.j5.irfile import IRFileError
from hat.integer.profile import J5
from hat.backend.j5.program import Node, Program, Value
from hat.quant.optable import BY_NAME, OPS, reference

# Per op: the real input and output ranges the scales come from (scale = amax / J5.scale_divisor(dtype); an input
# range "(0, 8]" is +-8 quantized, f undefined below 0), and the largest error of the int16 -> int16 table in output
# LSBs (int16 -> int8: INT8_MAX_ERROR), measured with split="minimax" (benchmarks/RESULTS.md) and rounded up.
CASES = {
    "sigmoid": (8, 1, 1.35), "tanh": (8, 1, 1.15), "silu": (8, 8, 1.15), "hardswish": (8, 8, 1.2),
    "hardsigmoid": (8, 1, 1.0), "gelu": (8, 8, 1.05), "gelu_tanh": (8, 8, 1.05), "exp": (8, 8, 1.2),
    "log": (8, 8, 3.05), "reciprocal": (8, 16, 1.35), "sqrt": (8, 8 ** 0.5, 1.2), "rsqrt": (8, 16, 3.1),
    "pow": (8, 64, 1.35), "leaky_relu": (8, 8, 1.0), "elu": (8, 8, 1.0), "softplus": (8, 8, 1.0), "mish": (8, 8, 1.1),
}
INT8_MAX_ERROR = {"reciprocal": 1.0}  # odd and saturating: the mirror of +127 is -127, the float64 f saturates at -128
INT8_MAX_ERROR_DEFAULT = 0.52  # (v + 128) >> 8 after an int16 interpolation: half an LSB and a 1/256 of one
INT16 = torch.arange(-32768, 32768, dtype=torch.int16)
INT8 = torch.arange(-128, 128, dtype=torch.int8)


def _scales(name: str, in_dtype: str, out_dtype: str) -> tuple[float, float]:
    in_amax, out_amax, _ = CASES[name]
    return in_amax / J5.scale_divisor(in_dtype), out_amax / J5.scale_divisor(out_dtype)


def _ideal(name: str, q: torch.Tensor, s_in: float, s_out: float, out_dtype: str) -> torch.Tensor:
    """f(q * s_in) / s_out in float64 before rounding, saturated; NaN -> 0 (lut.on_output_grid's rule)."""
    qmin, qmax = J5.qrange(out_dtype)
    steps = reference(BY_NAME[name], q.double() * s_in) / s_out
    return torch.nan_to_num(steps, nan=0.0, posinf=qmax, neginf=qmin).clamp(qmin, qmax)


def _segmented(name: str, out_dtype: str, **options) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The table of op `name` (int16 input), its outputs on every int16 input and the error there in output LSBs."""
    s_in, s_out = _scales(name, "qint16", out_dtype)
    op = BY_NAME[name]
    params = lut.segment_table(lambda x: reference(op, x), s_in, "qint16", s_out, out_dtype, odd=op.odd,
                               profile=J5, **options)
    y = kernels.segment_lookup(INT16, **params)
    return params, y, (y.double() - _ideal(name, INT16, s_in, s_out, out_dtype)).abs()


def test_every_op_has_a_case():
    assert set(CASES) == {op.name for op in OPS}


# --- int8 input: the exact table -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [op.name for op in OPS])
@pytest.mark.parametrize("out_dtype", ["qint8", "qint16"])
def test_exact_table_is_f_rounded_half_up_on_every_int8_input(name, out_dtype):
    s_in, s_out = _scales(name, "qint8", out_dtype)
    table = lut.exact_table(lambda x: reference(BY_NAME[name], x), s_in, "qint8", s_out, out_dtype, J5)
    qmin, qmax = J5.qrange(out_dtype)
    expected = torch.floor(_ideal(name, INT8, s_in, s_out, out_dtype) + 0.5).clamp(qmin, qmax)
    assert table.shape == (256,) and torch.equal(table.long(), expected.long())
    y = kernels.lookup(INT8, table=table, out_dtype=out_dtype)
    assert y.dtype == (torch.int8 if out_dtype == "qint8" else torch.int16)
    assert torch.equal(y.long(), expected.long())


def test_half_up_on_ties():
    table = lut.exact_table(lambda x: x, 0.5, "qint8", 1.0, "qint8", J5)  # q * 0.5: ties at every odd q
    assert table[128 + 1] == 1 and table[128 - 1] == 0 and table[128 + 3] == 2 and table[128 - 3] == -1


# --- int16 input: the segmented table ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_segmented_int16_output_error_on_every_int16_input(name):
    _, y, error = _segmented(name, "qint16")
    assert y.dtype == torch.int16
    assert float(error.max()) <= CASES[name][2], f"{name}: max {float(error.max()):.2f} LSB"
    assert float(error.mean()) < 0.4


@pytest.mark.parametrize("name", list(CASES))
def test_segmented_int8_output_error_on_every_int16_input(name):
    _, y, error = _segmented(name, "qint8")
    assert y.dtype == torch.int8
    assert float(error.max()) <= INT8_MAX_ERROR.get(name, INT8_MAX_ERROR_DEFAULT), f"{name}: {float(error.max())}"
    assert float(error.mean()) < 0.3


@pytest.mark.parametrize("name", [op.name for op in OPS if op.odd])
@pytest.mark.parametrize("out_dtype", ["qint8", "qint16"])
def test_odd_ops_are_exactly_antisymmetric(name, out_dtype):
    params, y, _ = _segmented(name, out_dtype)
    assert params["odd"] and int(params["points"][0]) >= 0  # the tables cover x >= 0 only
    positive = y[32768 + 1:].long()  # q = 1 .. 32767
    assert torch.equal(y[1:32768].long().flip(0), -positive)  # q = -1 .. -32767


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "exp"])
@pytest.mark.parametrize("out_dtype", ["qint8", "qint16"])
def test_monotone_ops_stay_monotone(name, out_dtype):
    _, y, _ = _segmented(name, out_dtype)
    assert bool((y[1:].long() >= y[:-1].long()).all())


def test_tables_and_outputs_are_deterministic():
    first, y1, _ = _segmented("gelu", "qint16")
    second, y2, _ = _segmented("gelu", "qint16")
    assert first.keys() == second.keys()
    assert all(torch.equal(v, second[k]) if isinstance(v, torch.Tensor) else v == second[k] for k, v in first.items())
    assert torch.equal(y1, y2) and torch.equal(y1, kernels.segment_lookup(INT16, **first))


def test_parameters_are_small_int_tensors_of_the_profiles_shape():
    params, _, _ = _segmented("silu", "qint8")
    count, entries = J5.lut_tables, J5.lut_table_entries
    shapes = {"points": (count + 1,), "tables": (count, entries), "index_multiplier": (count,),
              "index_shift": (count,), "index_bits": (count,), "line_multiplier": (2,), "line_shift": (2,),
              "line_offset": (2,)}
    assert {k: tuple(v.shape) for k, v in params.items() if isinstance(v, torch.Tensor)} == shapes
    assert params["line_offset"].dtype == torch.int32
    assert all(v.dtype == torch.int16 for k, v in params.items() if isinstance(v, torch.Tensor) and k != "line_offset")
    assert (params["odd"], params["out_dtype"]) == (False, "qint8")
    assert bool((params["points"].diff() > 0).all())


def test_flat_ends_are_exact_lines():
    """sigmoid saturates: the tables stop where the output stops changing; beyond, lines of slope 0 are exact."""
    params, y, _ = _segmented("sigmoid", "qint8")
    assert params["line_multiplier"].tolist() == [0, 0]
    d0, d6 = params["points"][0], params["points"][-1]
    assert -32768 < d0 and d6 < 32767
    assert bool((y[INT16 < d0] == 0).all()) and bool((y[INT16 > d6] == 127).all())


def test_a_large_tensor_gives_what_each_of_its_elements_gives():
    """Above 65536 elements the kernel computes every int16 input once and indexes: the same integers."""
    params, every, _ = _segmented("tanh", "qint8")
    x = torch.randint(-32768, 32768, (1, 64, 56, 56), generator=torch.Generator().manual_seed(0), dtype=torch.int16)
    y = kernels.segment_lookup(x, **params)
    assert y.shape == x.shape and y.dtype == torch.int8
    assert torch.equal(y, every[x.long() + 32768])
    assert torch.equal(kernels.segment_lookup(x[0, 0], **params), y[0, 0])


@pytest.mark.parametrize("shape", [(1, 64, 56, 56), (3,), (), (2, 0, 5)])
@pytest.mark.parametrize("out_dtype", ["qint8", "qint16"])
def test_meta_tensors_give_the_shape_and_dtype(shape, out_dtype):
    params, _, _ = _segmented("tanh", out_dtype)
    meta = torch.device("meta")
    on_meta = {k: v.to(meta) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    y = kernels.segment_lookup(torch.empty(shape, dtype=torch.int16, device=meta), **on_meta)
    assert y.device == meta and tuple(y.shape) == shape
    assert y.dtype == (torch.int8 if out_dtype == "qint8" else torch.int16)


# --- dividing points and input ranges -----------------------------------------------------------------------------
# split -> op -> largest int16-output error in LSBs (measured; "curvature" leaves exp's flat end in one wide table)
SPLIT_MAX_ERROR = {"evenly": {"sigmoid": 1.55, "tanh": 1.7, "silu": 1.3, "gelu": 1.35, "exp": 4.2},
                   "curvature": {"sigmoid": 3.15, "tanh": 5.05, "silu": 2.4, "gelu": 2.9, "exp": 10.85}}


@pytest.mark.parametrize("split", list(SPLIT_MAX_ERROR))
@pytest.mark.parametrize("name", ["sigmoid", "tanh", "silu", "gelu", "exp"])
def test_evenly_and_curvature_are_valid_tables(split, name):
    params, _, error = _segmented(name, "qint16", split=split)
    _, _, error8 = _segmented(name, "qint8", split=split)
    assert schema_relations.relations("bayes")["segment_lookup"](params) is None
    assert float(error.max()) <= SPLIT_MAX_ERROR[split][name] and float(error8.max()) <= INT8_MAX_ERROR_DEFAULT
    if split == "evenly":
        widths = params["points"].diff()
        assert int(widths.max() - widths.min()) <= 1


def test_curvature_puts_the_points_where_f_bends():
    params, _, _ = _segmented("gelu", "qint16", split="curvature")
    s_in, _ = _scales("gelu", "qint16", "qint16")
    inner = params["points"][1:-1].double() * s_in
    assert bool((inner.abs() < 2).all())  # gelu bends within +-2; beyond it is nearly 0 or x


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split 'cubic'"):
        lut.segment_table(torch.sigmoid, 8 / 32767.5, "qint16", 1 / 127.5, "qint8", split="cubic", profile=J5)


@pytest.mark.parametrize("name, input_range", [("silu", (-2.0, 3.0)), ("tanh", (-1.0, 1.0))])
def test_input_range_narrows_the_tables(name, input_range):
    s_in, _ = _scales(name, "qint16", "qint16")
    params, _, error = _segmented(name, "qint16", input_range=input_range)
    full, _, full_error = _segmented(name, "qint16")
    points = params["points"].double() * s_in
    low = 0.0 if BY_NAME[name].odd else input_range[0]
    assert low - s_in <= float(points[0]) and float(points[-1]) <= input_range[1] + s_in
    assert float(points[-1] - points[0]) < float(full["points"][-1].long() - full["points"][0].long()) * s_in
    inside = (INT16.double() * s_in >= input_range[0]) & (INT16.double() * s_in <= input_range[1])
    assert float(error[inside].max()) <= float(full_error.max())  # finer tables where it matters
    ends = torch.tensor([-32768, int(params["points"][0]) - 1, int(params["points"][-1]) + 1, 32767]) + 32768
    assert float(error[ends].max()) <= 2  # outside the range: the chord of f, from the table's end to the input's end


def test_empty_input_range_is_refused():
    with pytest.raises(ValueError, match="holds no input integer"):
        lut.segment_table(torch.sigmoid, 8 / 32767.5, "qint16", 1 / 127.5, "qint8", input_range=(1e-6, 2e-6),
                          profile=J5)


def test_int8_input_works_too():
    """The caller uses exact_table for int8 inputs; a segmented table of an int8 input is still close."""
    s_in, s_out = 8 / 127.5, 1 / 32767.5
    params = lut.segment_table(torch.sigmoid, s_in, "qint8", s_out, "qint16", profile=J5)
    y = kernels.segment_lookup(INT8, **params)
    ideal = torch.sigmoid(INT8.double() * s_in) / s_out
    assert y.dtype == torch.int16 and float((y.double() - ideal).abs().max()) <= 1.05


# --- the program file: a segment_lookup node loads, runs, and a hand-edited one is refused ----------------------
def _program(params: dict, s_in: float, s_out: float) -> Program:
    tensors = {"n0.scale": torch.tensor([s_in]), "n2.scale": torch.tensor([s_out])}
    node_params = {}
    for key, value in params.items():
        if isinstance(value, torch.Tensor):
            tensors[f"n1.{key}"] = value
            value = {"$tensor": f"n1.{key}"}
        node_params[key] = value
    values = {"x": Value("float32", [1, 8]), "q": Value("qint16", [1, 8], [s_in]),
              "y": Value(params["out_dtype"], [1, 8], [s_out]), "out": Value("float32", [1, 8])}
    nodes = [Node("quantize", ["x"], "q", {"scale": {"$tensor": "n0.scale"}, "dtype": "qint16"}),
             Node("segment_lookup", ["q"], "y", node_params, "act"),
             Node("dequantize", ["y"], "out", {"scale": {"$tensor": "n2.scale"}})]
    return Program("bayes", ["x"], ["out"], values, nodes, tensors)


def _sigmoid_program(**edits) -> Program:
    s_in, s_out = 8 / 32767.5, 1 / 32767.5
    params = lut.segment_table(torch.sigmoid, s_in, "qint16", s_out, "qint16", profile=J5)
    return _program({**params, **edits}, s_in, s_out)


def test_program_with_a_segmented_table_round_trips(tmp_path):
    program = _sigmoid_program()
    loaded = backend.load(program.save(tmp_path / "m.hir"))
    x = torch.linspace(-8, 8, 8).reshape(1, 8)
    assert torch.equal(loaded.run(x), program.run(x))
    assert float((loaded.run(x) - torch.sigmoid(x)).abs().max()) < 2 / 32767.5


@pytest.mark.parametrize("edits, message", [
    ({"tables": torch.zeros(6, 32, dtype=torch.int16)}, r"'tables' has shape \[6, 32\]; a segmented table takes"),
    ({"points": torch.tensor([0, 1, 2, 3, 3, 5, 6], dtype=torch.int16)}, r"dividing points rise strictly"),
    ({"index_multiplier": torch.full((6,), 100, dtype=torch.int16)}, r"index map of table 0 .* does not end"),
    ({"index_shift": torch.full((6,), 40, dtype=torch.int16)}, r"'index_shift' refers to .*\[0, 31\]"),
    ({"index_bits": torch.full((6,), 16, dtype=torch.int16)}, r"'index_bits' refers to .*\[0, 15\]"),
    ({"index_multiplier": torch.zeros(6, dtype=torch.int16)}, r"'index_multiplier' refers to .*\[1, 32767\]"),
    ({"tables": torch.zeros(6, 64, dtype=torch.int32)}, r"'tables' refers to .* of dtype int32; expected .*int16"),
    ({"line_offset": torch.zeros(3, dtype=torch.int32)}, r"'line_offset' has shape \[3\]"),
    ({"out_dtype": "qint32"}, r"'out_dtype' is 'qint32', expected one of 'qint8', 'qint16'"),
    ({"odd": 1}, r"'odd' is 1, expected true or false"),
])
def test_hand_edited_segment_parameters_are_refused(tmp_path, edits, message):
    path = _sigmoid_program(**edits).save(tmp_path / "m.hir")
    with pytest.raises(IRFileError, match=message):
        backend.load(path)


def test_a_float_input_is_refused(tmp_path):
    program = _sigmoid_program()
    program.nodes = program.nodes[1:]  # the table applied to the float input itself
    program.nodes[0].inputs = ["x"]
    del program.values["q"]
    with pytest.raises(IRFileError, match="this op takes int8 or int16"):
        backend.load(program.save(tmp_path / "m.hir"))
