// Schemas of the hat:: ops and the build facts the Python loader compares with the running torch.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef HAT_TORCH_VERSION
#define HAT_TORCH_VERSION "unknown"
#endif
#ifndef HAT_CUDA_VERSION
#define HAT_CUDA_VERSION ""
#endif

TORCH_LIBRARY(hat, m) {
  m.def("fake_quant(Tensor x, Tensor scale, int? axis, int qmin, int qmax, bool half_up) -> (Tensor, Tensor)");
  m.def("fake_quant_backward(Tensor grad, Tensor mask) -> Tensor");
  m.def("fake_quant_backward_(Tensor(a!) grad, Tensor mask) -> Tensor(a!)");
  m.def("lsq_fake_quant(Tensor x, Tensor scale, int? axis, int qmin, int qmax, bool half_up) -> Tensor");
  m.def("lsq_fake_quant_backward(Tensor grad, Tensor x, Tensor scale, int? axis, int qmin, int qmax, "
        "bool half_up, float grad_factor) -> (Tensor, Tensor)");
  // differentiable forms of the two above (autograd in autograd.cpp)
  m.def("fake_quant_autograd(Tensor x, Tensor scale, int? axis, int qmin, int qmax, bool half_up) -> Tensor");
  m.def("lsq_fake_quant_autograd(Tensor x, Tensor scale, int? axis, int qmin, int qmax, bool half_up, "
        "float grad_factor) -> Tensor");
  // a weight with its BN factor f folded in: range of W * f, scale, fake_quant(W, scale / f), gradient mask
  m.def("fake_quant_folded(Tensor weight, Tensor factor, float divisor, float eps, int qmin, int qmax, "
        "bool half_up) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("fake_quant_folded_autograd(Tensor weight, Tensor factor, float divisor, float eps, int qmin, int qmax, "
        "bool half_up) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("requantize(Tensor acc, Tensor multiplier, Tensor shift, int? axis, int qmin, int qmax, "
        "ScalarType dtype) -> Tensor");
  m.def("grid_sample(Tensor input, Tensor grid, int coord_shift, str mode, str padding_mode) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("torch_version") = HAT_TORCH_VERSION;  // the torch this library was compiled against
  m.attr("cuda_version") = HAT_CUDA_VERSION;    // "" when built without CUDA kernels
}
