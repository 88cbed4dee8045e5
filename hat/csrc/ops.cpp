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
  // conv / linear as a GEMM, after the integer products: + bias, saturate to int32 (from `lower`: 0 with relu),
  // requantize per channel, saturate to [qmin, upper[c]]; multiplier 1 and shift 0 keep the int32 accumulator.
  // The constants: int32, per channel, repeated a whole number of times
  m.def("gemm_epilogue(Tensor acc, Tensor bias, Tensor multiplier, Tensor shift, Tensor upper, int lower, int qmin, "
        "ScalarType dtype) -> Tensor");
  // rows of kernel taps of channels-last x: [N * H' * W', kh * kw * C], zeros for the padding
  m.def("im2col(Tensor x, int[2] kernel, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // depthwise conv of channels-last x with int32 [kh, kw, C] weights, then the epilogue above: [N * H' * W', C]
  m.def("depthwise_conv2d(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, Tensor bias, "
        "Tensor multiplier, Tensor shift, Tensor upper, int lower, int qmin, ScalarType dtype) -> Tensor");
  // the J5 add of two activations of one shape and layout, fused: (x << x_shift) * x_sign + y * y_multiplier,
  // requantized
  m.def("add_requantize(Tensor x, Tensor y, int x_shift, int x_sign, int y_multiplier, int multiplier, int shift, "
        "int qmin, int qmax, ScalarType dtype) -> Tensor");
  m.def("grid_sample(Tensor input, Tensor grid, int coord_shift, str mode, str padding_mode) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("torch_version") = HAT_TORCH_VERSION;  // the torch this library was compiled against
  m.attr("cuda_version") = HAT_CUDA_VERSION;    // "" when built without CUDA kernels
}
