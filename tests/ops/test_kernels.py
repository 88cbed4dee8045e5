"""The compiled kernels (hat._C) against the pure-PyTorch reference: bit-exact integer ops, exact fake quant under
the same rounding, LSQ's scale gradient to float tolerance; on CUDA too when a GPU is present."""
import os
import shutil

import pytest
import torch

from hat import ops
from hat.ops import reference

KERNELS = torch.ops.hat if ops.extension_status().loaded else None
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="hat._C is not loaded (HAT_USE_EXT=0 or not built)")

# (shape, axis): per tensor, weight-like per channel, other axes, odd and empty shapes
LAYOUTS = [((64, 16, 8, 8), None), ((32, 16, 3, 3), 0), ((7, 5, 3), 1), ((3, 4, 5, 1), 2), ((6, 5), -1),
           ((0, 3), None), ((0, 3), 1), ((1,), None), ((17, 1, 1), 0)]


def _inputs(shape, axis, dtype=torch.float32, device="cpu", seed=0):
    """Random values, a third of them on rounding ties ((k + 0.5) * scale), and some far out of range."""
    gen = torch.Generator().manual_seed(seed)
    channels = 1 if axis is None else shape[axis]
    scale = (torch.rand(channels, generator=gen, dtype=torch.float64) * 0.05 + 0.01).to(dtype)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).mul(3).to(dtype)
    ties = (torch.randint(-200, 200, shape, generator=gen).to(dtype) + 0.5) * reference._per_channel(scale, x, axis)
    x = torch.where(torch.rand(shape, generator=gen) < 0.33, ties, x)
    return x.to(device), scale.to(device)


@needs_kernels
def test_extension_is_loaded_with_cuda_kernels_when_nvcc_was_present():
    """`make setup` builds the CUDA kernels whenever nvcc and a CUDA torch are there; a silent CPU-only build
    would hide a CUDA compile error."""
    status = ops.extension_status()
    nvcc = shutil.which("nvcc") or os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                               "bin", "nvcc"))
    if nvcc and torch.version.cuda and os.environ.get("HAT_BUILD_CUDA", "1") != "0":
        assert status.cuda, "nvcc is present but hat._C has no CUDA kernels: rebuild with `make setup`"


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("half_up", [True, False])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_fake_quant_forward_and_backward_equal_reference(shape, axis, half_up, dtype, device):
    x, scale = _inputs(shape, axis, dtype, device)
    for qmin, qmax in ((-128, 127), (-32768, 32767)):
        out, mask = KERNELS.fake_quant(x, scale, axis, qmin, qmax, half_up)
        ref_out, ref_mask = reference.fake_quant(x, scale, axis, qmin, qmax, half_up)
        assert torch.equal(out, ref_out) and torch.equal(mask, ref_mask)
    grad = torch.randn_like(x)
    assert torch.equal(KERNELS.fake_quant_backward(grad, mask), reference.fake_quant_backward(grad, mask))


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("half_up", [True, False])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_lsq_forward_exact_and_scale_gradient_close(shape, axis, half_up, device):
    x, scale = _inputs(shape, axis, device=device)
    grad = torch.randn_like(x)
    assert torch.equal(KERNELS.lsq_fake_quant(x, scale, axis, -128, 127, half_up),
                       reference.lsq_fake_quant(x, scale, axis, -128, 127, half_up))
    dx, dscale = KERNELS.lsq_fake_quant_backward(grad, x, scale, axis, -128, 127, half_up, 0.5)
    ref_dx, ref_dscale = reference.lsq_fake_quant_backward(grad, x, scale, axis, -128, 127, half_up, 0.5)
    assert torch.equal(dx, ref_dx) and dscale.shape == scale.shape
    # the same float terms summed in another order: within float summation error of sum |term| (|term| <= 128 |g|)
    tolerance = 1e-5 * 0.5 * 128 * float(grad.abs().sum()) + 1e-6
    assert float((dscale - ref_dscale).abs().max()) <= tolerance


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("half_up", [True, False])
@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (5, 7), (3, 1, 1, 1)])
def test_folded_weight_kernel_equals_reference(shape, half_up, dtype):
    """Range of W * f, scale and fake_quant(W, scale / f) in one pass: bit-exact with the unfused reference,
    with negative and zero factors."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    factor = torch.randn(shape[0], generator=gen, dtype=torch.float64).to(dtype)
    if shape[0] > 2:
        factor[1] = 0
    got = KERNELS.fake_quant_folded(weight, factor, 127.5, 1e-7, -128, 127, half_up)
    want = reference.fake_quant_folded(weight, factor, 127.5, 1e-7, -128, 127, half_up)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_folded_fake_quant_gradient_is_straight_through_to_the_weight():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(8, 4, 3, 3, generator=gen).requires_grad_()
    factor = torch.rand(8, generator=gen) + 0.5
    out, lo, hi, scale = ops.fake_quant_folded(weight, factor, 127.5, 1e-7, -128, 127)
    out.sum().backward()
    mask = reference.fake_quant_folded(weight.detach(), factor, 127.5, 1e-7, -128, 127, True)[1]
    assert torch.equal(weight.grad, mask.float())  # 1 inside the range; the top value (127.5 steps) saturates
    assert 0 < int((~mask).sum()) <= 8 and not lo.requires_grad
    assert torch.equal(scale, torch.maximum(lo.abs(), hi.abs()) / 127.5)


@needs_kernels
def test_differentiable_ops_match_the_reference_autograd():
    x, scale = _inputs((32, 16, 3, 3), 0)
    for kernel, python in ((lambda a, s: ops.fake_quant(a, s, 0, -128, 127),
                            lambda a, s: ops._FakeQuant.apply(a, s, 0, -128, 127, True)),
                           (lambda a, s: ops.lsq_fake_quant(a, s, 0, -128, 127, grad_factor=0.1),
                            lambda a, s: ops._LsqFakeQuant.apply(a, s, 0, -128, 127, True, 0.1))):
        grads = []
        for fn in (kernel, python):
            a, s = x.clone().requires_grad_(), scale.clone().requires_grad_()
            out = fn(a, s)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            grads.append((out.detach(), a.grad, s.grad))
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
        torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)
        if grads[1][2] is not None:
            torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-5, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("out_dtype,qrange", [(torch.int8, (-128, 127)), (torch.int16, (-32768, 32767)),
                                              (torch.int64, (-128, 127))])
@pytest.mark.parametrize("shape,axis", [((4, 8, 5, 5), 1), ((3, 7), -1), ((9, 4, 2), None), ((0, 8), 1)])
def test_requantize_is_bit_exact(shape, axis, out_dtype, qrange, acc_dtype, device):
    gen = torch.Generator().manual_seed(1)
    acc = torch.randint(-2**31, 2**31 - 1, shape, generator=gen, dtype=torch.int64).to(acc_dtype)
    acc.view(-1)[:5] = torch.tensor([0, 1, -1, 2**31 - 1, -2**31])[: acc.numel()]
    channels = 1 if axis is None else shape[axis]
    multiplier = torch.randint(-32767, 32768, (channels,), generator=gen)
    shift = torch.randint(0, 32, (channels,), generator=gen)
    shift[0] = 0
    got = KERNELS.requantize(acc.to(device), multiplier.to(device), shift.to(device), axis, *qrange, out_dtype)
    want = reference.requantize(acc, multiplier, shift, axis, *qrange, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got.cpu(), want)


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("coord_shift", [0, 3, 8])
def test_grid_sample_is_bit_exact(coord_shift, padding_mode, mode, device):
    gen = torch.Generator().manual_seed(coord_shift)
    image = torch.randint(-128, 128, (2, 3, 7, 9), generator=gen, dtype=torch.int8)
    reach = 12 << coord_shift  # offsets well past the borders, both ways
    grid = torch.randint(-reach, reach, (2, 5, 11, 2), generator=gen).clamp(-32768, 32767).to(torch.int16)
    got = KERNELS.grid_sample(image.to(device), grid.to(device), coord_shift, mode, padding_mode)
    want = reference.grid_sample(image, grid, coord_shift, mode, padding_mode)
    assert got.shape == (2, 3, 5, 11) and got.dtype == torch.int8 and torch.equal(got.cpu(), want)


@needs_kernels
def test_kernels_reject_bad_arguments_with_the_op_name():
    x, scale = _inputs((4, 3), 0)
    with pytest.raises(RuntimeError, match="hat::fake_quant: 4 scales for 3 channels on axis 1"):
        KERNELS.fake_quant(x, scale, 1, -128, 127, True)
    with pytest.raises(RuntimeError, match="hat::grid_sample: input must be int8"):
        KERNELS.grid_sample(x.view(1, 1, 4, 3), torch.zeros(1, 2, 2, 2, dtype=torch.int16), 3, "bilinear", "zeros")


def test_public_ops_take_the_reference_path_for_other_dtypes():
    """bf16 (AMP) has no kernel: the reference runs, with the same rule."""
    x, scale = _inputs((8, 4), 1)
    out = ops.fake_quant(x.bfloat16(), scale, 1, -128, 127)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference.fake_quant(x.bfloat16(), scale.bfloat16(), 1, -128, 127, True)[0])


def test_public_ops_validate_arguments():
    x, scale = _inputs((8, 4), 1)
    with pytest.raises(ValueError, match="rounding must be 'half_up' or 'half_even'"):
        ops.fake_quant(x, scale, 1, -128, 127, rounding="nearest")
    with pytest.raises(ValueError, match="coord_shift must be in \\[0, 8\\]"):
        ops.grid_sample(torch.zeros(1, 1, 2, 2, dtype=torch.int8), torch.zeros(1, 1, 1, 2, dtype=torch.int16), 9)
    with pytest.raises(ValueError, match="mode bilinear\\|nearest"):
        ops.grid_sample(torch.zeros(1, 1, 2, 2, dtype=torch.int8), torch.zeros(1, 1, 1, 2, dtype=torch.int16), 1,
                        mode="bicubic")


@needs_kernels
def test_torch_export_traces_the_kernels_and_runs_them():
    """Fake (shape-only) versions registered for every op: graph capture (torch.export, the ONNX exporter's
    front end) keeps hat:: ops as nodes, and the exported program computes what eager does."""

    class UsesEveryOp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.full((4,), 0.05))

        def forward(self, x, image, grid):
            y = ops.fake_quant(x, self.scale, 1, -128, 127) + ops.lsq_fake_quant(x, self.scale, 1, -128, 127)
            acc = image.to(torch.int32)
            return y, ops.grid_sample(image, grid, 5), ops.requantize(acc, torch.tensor([3]), torch.tensor([1]),
                                                                      None, -128, 127, torch.int8)

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 4, 3, generator=gen), torch.randint(-128, 128, (1, 2, 4, 4), generator=gen,
                                                               dtype=torch.int8),
            torch.randint(-64, 64, (1, 3, 3, 2), generator=gen, dtype=torch.int16))
    exported = torch.export.export(UsesEveryOp(), args)
    targets = {str(node.target) for node in exported.graph.nodes}
    assert {"hat.fake_quant_autograd.default", "hat.grid_sample.default", "hat.requantize.default"} <= targets
    for got, want in zip(exported.module()(*args), UsesEveryOp()(*args)):
        assert torch.equal(got, want)


@needs_kernels
def test_ops_run_under_inference_mode():
    x, scale = _inputs((8, 4), 1)
    weight, factor = torch.randn(4, 2, 3, 3), torch.rand(4) + 0.5
    with torch.inference_mode():
        want = reference.fake_quant(x, scale, 1, -128, 127, True)[0]
        assert torch.equal(ops.fake_quant(x, scale, 1, -128, 127), want)
        assert torch.equal(ops.lsq_fake_quant(x, scale, 1, -128, 127),
                           reference.lsq_fake_quant(x, scale, 1, -128, 127, True))
        out = ops.fake_quant_folded(weight, factor, 127.5, 1e-7, -128, 127)[0]
    assert torch.equal(out, reference.fake_quant_folded(weight, factor, 127.5, 1e-7, -128, 127, True)[0])


@needs_kernels
def test_folded_weight_kernel_propagates_nan_like_the_reference():
    weight, factor = torch.randn(3, 20), torch.ones(3)
    weight[0, 0], weight[1, 13] = float("nan"), float("nan")
    got = KERNELS.fake_quant_folded(weight, factor, 127.5, 1e-7, -128, 127, True)
    want = reference.fake_quant_folded(weight, factor, 127.5, 1e-7, -128, 127, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=0, atol=0)


@needs_kernels
def test_requantize_errors_name_the_multipliers_and_the_shift_range():
    acc = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="one of the multipliers, got 4; per channel, give the channel axis"):
        KERNELS.requantize(acc, torch.ones(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64), None, -128, 127,
                           torch.int8)
    for requantize in (KERNELS.requantize, reference.requantize):
        with pytest.raises((RuntimeError, ValueError), match="shifts must lie in \\[0, 62\\]"):
            requantize(acc, torch.ones(1, dtype=torch.int64), torch.tensor([63]), None, -128, 127, torch.int8)


@needs_kernels
def test_masked_gradient_never_overwrites_a_gradient_someone_else_holds():
    """The backward masks the incoming gradient in place only when it is the sole owner."""
    x, scale = _inputs((16, 8), 1)
    x.requires_grad_()
    out = ops.fake_quant(x, scale, 1, -128, 127)
    mask = reference.fake_quant(x.detach(), scale, 1, -128, 127, True)[1]
    held = torch.randn_like(x)
    kept = held.clone()
    (grad,) = torch.autograd.grad(out, x, grad_outputs=held, retain_graph=True)
    assert torch.equal(held, kept) and torch.equal(grad, torch.where(mask, held, 0.0))
    (out * 3).sum().backward()  # here the gradient is a fresh tensor nobody else holds
    assert torch.equal(x.grad, torch.where(mask, 3.0, 0.0))
