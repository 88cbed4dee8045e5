"""hat.quant.functional: the reference toolchain's grid_sample (absolute-offset grid) on float, QAT and quantized
tensors, and norm_grid, the conversion to torch's normalized grid (FAQ 2.3 Q8)."""
import pytest
import torch
import torch.nn.functional as F

from hat.quant import QTensor, QuantizationError, functional
from hat.quant.qtensor import quantize
from hat.integer.profile import J5


def faq_norm_grid(x, grid):
    """FAQ 2.3 Q8's code, as the FAQ writes it."""
    n, h, w = grid.size(0), grid.size(1), grid.size(2)
    base_coord_y = torch.arange(h, dtype=grid.dtype, device=grid.device).unsqueeze(-1).unsqueeze(0).expand(n, h, w)
    base_coord_x = torch.arange(w, dtype=grid.dtype, device=grid.device).unsqueeze(0).unsqueeze(0).expand(n, h, w)
    absolute_grid_x = grid[:, :, :, 0] + base_coord_x
    absolute_grid_y = grid[:, :, :, 1] + base_coord_y
    norm_grid_x = absolute_grid_x * 2 / (x.size(3) - 1) - 1
    norm_grid_y = absolute_grid_y * 2 / (x.size(2) - 1) - 1
    return torch.stack((norm_grid_x, norm_grid_y), dim=-1)


def _case(seed=0, size=(2, 3, 12, 10), out_hw=(6, 8)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, generator=gen)
    grid = torch.rand(size[0], *out_hw, 2, generator=gen) * 6 - 2  # offsets in pixels, some leaving the image
    return x, grid


def test_faq_2_3_q8_norm_grid_is_the_faq_conversion():
    x, grid = _case()
    torch.testing.assert_close(functional.norm_grid(x, grid), faq_norm_grid(x, grid))


def test_zero_offsets_sample_the_input_itself_on_every_path():
    x, _ = _case(size=(1, 2, 6, 7), out_hw=(6, 7))
    zero = torch.zeros(1, 6, 7, 2)
    torch.testing.assert_close(functional.grid_sample(x, zero), x)
    q = quantize(x, x.abs().max() / 127.5, "qint8", profile=J5)
    assert torch.equal(functional.grid_sample(q, zero).data, q.data)
    qat = QTensor(q.dequantize(), q.scale, "qint8", profile=J5)
    torch.testing.assert_close(functional.grid_sample(qat, zero).data, qat.data)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_integer_and_float_paths_sample_the_same_output(mode, padding_mode):
    """The int8/int16 kernel against torch's grid_sample on norm_grid of the same (dequantized) numbers: equal to
    within one output step (the kernel rounds its fixed-point sum once)."""
    x, grid = _case()
    scale = x.abs().max() / 127.5
    q = quantize(x, scale, "qint8", profile=J5)
    shift = functional.coord_shift(tuple(x.shape[-2:]), tuple(grid.shape[1:3]))
    grid = torch.round(grid * 2 ** shift) / 2 ** shift  # on the device's grid: no rounding of coordinates left
    if mode == "nearest":  # fractions 1/8, 3/8, ...: no .5 ties, where torch rounds half to even and J5 half up
        grid = torch.round(grid * 4) / 4 + 0.125
    integer = functional.grid_sample(q, grid, mode, padding_mode).dequantize()
    floating = F.grid_sample(q.dequantize(), functional.norm_grid(x, grid), mode, padding_mode, align_corners=True)
    assert float((integer - floating).abs().max()) <= float(scale) * 0.5 + 1e-6
    qat = functional.grid_sample(QTensor(q.dequantize(), scale, "qint8", profile=J5), grid, mode, padding_mode)
    assert float((qat.data - integer).abs().max()) <= float(scale) + 1e-6


def test_qat_path_passes_gradients_to_input_and_grid():
    x, grid = _case()
    scale = x.abs().max() / 127.5
    data, grid = (torch.round(x / scale) * scale).requires_grad_(), grid.requires_grad_()
    out = functional.grid_sample(QTensor(data, scale, "qint8", profile=J5), grid)
    out.data.sum().backward()
    assert out.scale is not None and data.grad.abs().sum() > 0 and grid.grad.abs().sum() > 0


def test_coord_shift_follows_the_j5_rule():
    assert functional.coord_shift((12, 10), (6, 8)) == 8  # small images: 8 fractional bits at most
    assert functional.coord_shift((1024, 1024), (64, 64)) == 4  # 15 - ceil(log2(1025))
    assert functional.coord_shift((40000, 2), (2, 2)) == 0


def test_grid_sample_errors_say_what_to_change():
    x, grid = _case()
    with pytest.raises(QuantizationError, match="mode 'bilinear'\\|'nearest'"):
        functional.grid_sample(x, grid, mode="bicubic")
    q16 = quantize(x, x.abs().max() / 32767.5, "qint16", producer="backbone.conv3", profile=J5)
    with pytest.raises(QuantizationError, match="qint8 input; 'backbone.conv3' gives qint16"):
        functional.grid_sample(q16, grid)
    with pytest.raises(QuantizationError, match="at least 2x2"):
        functional.norm_grid(torch.zeros(1, 1, 1, 5), torch.zeros(1, 1, 1, 2))
