"""The fast executor (int8 GEMMs, fused epilogue) against the reference kernels: bit-exact on random layers of every
shape kind, int8 and int16 inputs, accumulators at the int32 limits, and where its GEMM may not be trusted."""
import zlib

import pytest
import torch

from hat.integer import fast, kernels
from hat.integer.profile import TORCH_DTYPES, qrange
from hat.ops import extension_status

pytestmark = pytest.mark.skipif(not extension_status().loaded, reason="the fast executor needs hat._C")

# (in channels, out channels, kernel, stride, padding, dilation, groups)
CONVS = [(3, 8, 3, 1, 1, 1, 1), (8, 16, 3, 2, 1, 1, 1), (16, 16, 1, 1, 0, 1, 1), (16, 24, 1, 2, 0, 1, 1),
         (8, 8, 3, 1, 1, 1, 8), (8, 16, 3, 2, 1, 1, 8), (8, 12, 3, 1, 2, 2, 2), (12, 12, 5, 1, 2, 1, 4),
         (5, 7, (1, 3), (2, 1), (0, 1), 1, 1), (4, 6, (3, 2), 1, (1, 0), (2, 1), 1), (6, 6, 7, 3, 3, 1, 1),
         (64, 5, 3, 1, 1, 3, 1), (8, 8, 3, 2, 2, 2, 8), (16, 16, (5, 3), 1, (2, 1), 1, 16)]
EPILOGUES = ["requantize_int8", "requantize_int16_relu_capped", "int32_accumulator", "int32_relu6"]


def _epilogue(kind: str, out: int, generator: torch.Generator) -> dict:
    multiplier = torch.randint(1, 2 ** 15, (out,), generator=generator)
    shift = torch.randint(8, 24, (out,), generator=generator)
    return {"requantize_int8": dict(relu=False, multiplier=multiplier, shift=shift, acc_max=None, out_max=None,
                                    out_dtype="qint8"),
            "requantize_int16_relu_capped": dict(relu=True, multiplier=multiplier[:1], shift=shift[:1], acc_max=None,
                                                 out_max=9000, out_dtype="qint16"),
            "int32_accumulator": dict(relu=False, multiplier=None, shift=None, acc_max=None, out_max=None,
                                      out_dtype="qint32"),
            "int32_relu6": dict(relu=True, multiplier=None, shift=None, out_max=None, out_dtype="qint32",
                                acc_max=torch.randint(0, 2 ** 16, (out,), generator=generator))}[kind]


def _ints(shape, dtype: str, generator: torch.Generator) -> torch.Tensor:
    low, high = qrange(dtype)
    return torch.randint(low, high + 1, shape, generator=generator).to(TORCH_DTYPES[dtype])


def _assert_same(reference: torch.Tensor, got: torch.Tensor) -> None:
    assert got.dtype == reference.dtype and got.shape == reference.shape
    assert torch.equal(got, reference), f"{int((got.long() != reference.long()).sum())} elements differ"


@pytest.mark.parametrize("in_dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("layer", CONVS, ids=str)
def test_conv2d_is_bit_exact_with_the_reference(layer, epilogue, in_dtype):
    c, o, k, stride, padding, dilation, groups = layer
    generator = torch.Generator().manual_seed(zlib.crc32(repr((layer, epilogue, in_dtype)).encode()))
    kernel = (k, k) if isinstance(k, int) else k
    params = dict(weight=_ints((o, c // groups, *kernel), "qint8", generator),
                  bias=torch.randint(-2 ** 20, 2 ** 20, (o,), generator=generator), stride=stride, padding=padding,
                  dilation=dilation, groups=groups, **_epilogue(epilogue, o, generator))
    execute = fast.prepare("conv2d", params)
    gemm = (groups == 1 or c > groups) and in_dtype == "qint8" and fast.int8_gemm_is_exact()
    assert execute.path(_ints((1, c, 5, 5), in_dtype, generator)) == (
        "depthwise" if groups == c == o else "int8 GEMM" if gemm else "exact float")
    for batch, height, width in ((1, 9, 11), (3, 13, 8)):
        x = _ints((batch, c, height, width), in_dtype, generator)
        for layout in (torch.contiguous_format, torch.channels_last):
            _assert_same(kernels.conv2d(x, **params), execute(x.contiguous(memory_format=layout)))


@pytest.mark.parametrize("in_dtype", ["qint8", "qint16"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_linear_is_bit_exact_with_the_reference(epilogue, in_dtype):
    generator = torch.Generator().manual_seed(7)
    params = dict(weight=_ints((10, 37), "qint8", generator), bias=torch.randint(-5000, 5000, (10,)),
                  **_epilogue(epilogue, 10, generator))
    execute = fast.prepare("linear", params)
    for shape in ((1, 37), (6, 37), (2, 3, 37)):
        x = _ints(shape, in_dtype, generator)
        _assert_same(kernels.linear(x, **params), execute(x))


@pytest.mark.parametrize("dtypes", [("qint8", "qint8", "qint8"), ("qint16", "qint8", "qint16"),
                                    ("qint8", "qint16", "qint8")])
def test_add_is_bit_exact_with_the_reference(dtypes):
    generator = torch.Generator().manual_seed(11)
    params = dict(x_shift=5, x_sign=-1, y_multiplier=-23000, multiplier=17000, shift=19, out_dtype=dtypes[2])
    execute = fast.prepare("add", params)
    x, y = _ints((2, 6, 5, 7), dtypes[0], generator), _ints((2, 6, 5, 7), dtypes[1], generator)
    for layout in (torch.contiguous_format, torch.channels_last):
        a, b = x.contiguous(memory_format=layout), y.contiguous(memory_format=layout)
        assert execute.path(a, b) == "fused add"
        _assert_same(kernels.add(x, y, **params), execute(a, b))
    mixed = y.contiguous(memory_format=torch.channels_last)  # layouts differ, or broadcasting: the reference
    assert execute.path(x, mixed) == "reference" and execute.path(x, y[:1]) == "reference"
    _assert_same(kernels.add(x, y, **params), execute(x, mixed))
    _assert_same(kernels.add(x, y[:1], **params), execute(x, y[:1]))


@pytest.mark.parametrize("pool", [dict(kernel_size=3, stride=2, padding=1, dilation=1, ceil_mode=False),
                                  dict(kernel_size=2, stride=None, padding=0, dilation=1, ceil_mode=False),
                                  dict(kernel_size=3, stride=2, padding=0, dilation=1, ceil_mode=True),
                                  dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1),
                                       ceil_mode=True)], ids=str)
@pytest.mark.parametrize("dtype", ["qint8", "qint16"])
def test_max_pool2d_is_bit_exact_with_the_reference(pool, dtype):
    generator = torch.Generator().manual_seed(5)
    execute = fast.prepare("max_pool2d", pool)
    for shape in ((2, 70, 9, 12), (1, 3, 8, 7)):  # 64+ channels: torch's own int8 channels-last pool refuses them
        x = _ints(shape, dtype, generator)
        for layout in (torch.contiguous_format, torch.channels_last):
            _assert_same(kernels.max_pool2d(x, **pool), execute(x.contiguous(memory_format=layout)))


def _worst_case_linear(k: int, bias: int) -> tuple[dict, torch.Tensor]:
    """Every product at its largest (-128 x -128): the sum is k * 2^14."""
    params = dict(weight=torch.full((3, k), -128, dtype=torch.int8), bias=torch.full((3,), bias), relu=False,
                  multiplier=None, shift=None, acc_max=None, out_max=None, out_dtype="qint32")
    return params, torch.full((2, k), -128, dtype=torch.int8)


def test_accumulators_at_the_int32_limit_saturate_like_the_reference():
    params, x = _worst_case_linear(131071, 0)  # 131071 * 2^14 = 2^31 - 16384: the largest exact int32 GEMM
    execute = fast.prepare("linear", params)
    assert execute.gemm == fast.int8_gemm_is_exact()
    _assert_same(kernels.linear(x, **params), execute(x))
    params, x = _worst_case_linear(131071, 10 ** 6)  # the bias carries it past 2^31 - 1: saturated
    out = fast.prepare("linear", params)(x)
    _assert_same(kernels.linear(x, **params), out)
    assert int(out.max()) == qrange("qint32")[1]


def test_a_layer_whose_sums_could_overflow_int32_is_not_run_as_an_int32_gemm():
    params, x = _worst_case_linear(131073, 0)  # 131073 * 2^14 > 2^31 - 1: int32 would wrap
    assert kernels.accumulator_bound(params["weight"], "qint8") == 131073 * 2 ** 14  # |-128| taken in int64
    assert kernels.accumulate_plan(params["weight"], "qint8")["accumulate"] == "float64"  # 8 chunks: 2^28 each
    execute = fast.prepare("linear", params)
    assert not execute.gemm
    _assert_same(kernels.linear(x, **params), execute(x))


def test_without_an_exact_int8_gemm_the_float_path_stays_exact(monkeypatch):
    """A CPU whose int8 GEMM saturates 16-bit pair sums fails the probe: every layer then sums in exact floats."""
    monkeypatch.setattr(fast, "int8_gemm_is_exact", lambda: False)
    generator = torch.Generator().manual_seed(3)
    params = dict(weight=_ints((16, 8, 3, 3), "qint8", generator), bias=torch.zeros(16, dtype=torch.long),
                  stride=1, padding=1, dilation=1, groups=1, **_epilogue("requantize_int8", 16, generator))
    execute = fast.prepare("conv2d", params)
    assert not execute.gemm
    x = torch.full((2, 8, 6, 6), 127, dtype=torch.int8)
    _assert_same(kernels.conv2d(x, **params), execute(x))


def test_ops_without_a_fast_path_run_the_reference_kernel():
    execute = fast.prepare("clip", {"low": 0, "high": 6})
    x = torch.tensor([-3, 2, 9], dtype=torch.int8)
    assert torch.equal(execute(x), kernels.clip(x, low=0, high=6))


def test_a_program_profile_accounts_for_every_node_and_its_work():
    from hat import backend, quant
    from tests.backend.conftest import calibrate_and_convert

    torch.manual_seed(0)
    model = torch.nn.Sequential(quant.QuantStub(), torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4), quant.DeQuantStub())
    qmodel = calibrate_and_convert(model, [torch.randn(4, 3, 6, 6)])
    program = backend.compile(qmodel, example_inputs=(torch.randn(2, 3, 6, 6),))
    report = program.profile(torch.randn(5, 3, 6, 6), runs=2)
    assert [n.output for n in report.nodes] == [n.output for n in program.nodes] and report.batch == 5
    by_op = {n.op: n for n in report.nodes}
    assert by_op["conv2d"].macs == 5 * 8 * 6 * 6 * (3 * 3 * 3) and by_op["linear"].macs == 5 * 4 * 288
    assert by_op["conv2d"].path == ("int8 GEMM" if fast.int8_gemm_is_exact() else "exact float")
    assert by_op["quantize"].path == "reference" and by_op["quantize"].macs == 0
    assert by_op["conv2d"].bytes >= 8 * 27 + 5 * 3 * 36 + 5 * 8 * 36  # weights, input, output
    assert all(n.ms >= 0 for n in report.nodes)
    assert str(report).splitlines()[0].startswith("integer program, batch 5")
