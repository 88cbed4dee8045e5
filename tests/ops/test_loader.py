"""FAQ 2.4 Q1/Q2: a missing or mismatched compiled library never stops training; the warning names the file and
the rebuild command; HAT_REQUIRE_EXT=1 makes it an error; HAT_USE_EXT=0 chooses the reference quietly."""
import warnings

import pytest
import torch

from hat import ops
from hat.ops import loader
from hat.ops.loader import ExtensionError, ExtensionWarning, build_mismatch, load_extension


def test_faq_2_4_q1_missing_library_warns_with_file_and_rebuild_command(monkeypatch):
    monkeypatch.delenv("HAT_REQUIRE_EXT", raising=False)
    with pytest.warns(ExtensionWarning) as record:
        status = load_extension("hat._C_missing")
    message = str(record[0].message)
    assert not status.loaded and "No module named 'hat._C_missing'" in status.reason
    assert "_C_missing.cpython" in message and "pip install --no-build-isolation -e ." in message
    assert "reference ops" in message and "HAT_REQUIRE_EXT=1" in message


def test_faq_2_4_q1_require_ext_turns_the_warning_into_an_error(monkeypatch):
    monkeypatch.setenv("HAT_REQUIRE_EXT", "1")
    with pytest.raises(ExtensionError, match="hat._C_missing.*Rebuild with: pip install"):
        load_extension("hat._C_missing")


def test_use_ext_0_selects_the_reference_without_a_warning(monkeypatch):
    monkeypatch.setenv("HAT_USE_EXT", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status = load_extension()
    assert not status.loaded and status.reason == ""


def test_faq_2_4_q2_library_built_for_another_torch_or_cuda_is_refused():
    assert build_mismatch(torch.__version__, torch.version.cuda or "") is None
    assert "built against torch 1.13.0, this is torch" in build_mismatch("1.13.0", "")
    if torch.version.cuda:
        assert "built for CUDA 11.7" in build_mismatch(torch.__version__, "11.7")


def test_a_mismatched_library_falls_back(monkeypatch):
    class Stale:
        torch_version, cuda_version = "1.13.0", ""

    monkeypatch.setattr(loader.importlib, "import_module",
                        lambda name: Stale if name == "hat._C" else __import__(name))
    monkeypatch.delenv("HAT_REQUIRE_EXT", raising=False)
    with pytest.warns(ExtensionWarning, match="built against torch 1.13.0"):
        assert not load_extension().loaded


def test_without_the_library_every_op_gives_the_kernel_results(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x, scale = torch.randn(16, 8, 3, 3, generator=gen), torch.rand(16, generator=gen) * 0.05 + 0.01
    acc, mult, shift = torch.randint(-2**20, 2**20, (4, 16), generator=gen), torch.tensor([12345]), torch.tensor([9])
    image = torch.randint(-128, 128, (1, 2, 5, 5), generator=gen, dtype=torch.int8)
    grid = torch.randint(-600, 600, (1, 4, 4, 2), generator=gen, dtype=torch.int16)

    def run():
        a, s = x.clone().requires_grad_(), scale.clone().requires_grad_()
        out = ops.lsq_fake_quant(a, s, 0, -128, 127, grad_factor=0.1) + ops.fake_quant(a, s, 0, -128, 127)
        out.sum().backward()
        return out, a.grad, ops.requantize(acc, mult, shift, None, -128, 127), ops.grid_sample(image, grid, 7)

    with_library = run()
    monkeypatch.setattr(ops, "_STATUS", loader.ExtensionStatus(False, False, "test"))
    without = run()
    for got, want in zip(without, with_library):
        assert torch.equal(got, want)
