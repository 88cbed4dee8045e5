// CUDA kernels of the hat:: ops. The arithmetic is the same header code the CPU kernels use (arith.h,
// grid_sample.h); these wrappers only launch it. One file keeps the nvcc build to one translation unit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../arith.h"
#include "../checks.h"
#include "../grid_sample.h"

namespace hat {
namespace {

constexpr int kThreads = 256;

inline unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535LL * 8));
}

#define HAT_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(blockDim.x) * gridDim.x)

template <bool HalfUp, typename T>
__global__ void fake_quant_kernel(const T* x, const T* scale, T* out, bool* mask, int64_t n, ChannelLayout l,
                                  T qmin, T qmax) {
  HAT_GRID_STRIDE(i, n) {
    bool inside;
    out[i] = fake_quant_one<HalfUp>(x[i], scale[(i / l.inner) % l.channels], qmin, qmax, inside);
    mask[i] = inside;
  }
}

template <typename T>
__global__ void masked_grad_kernel(const T* grad, const bool* mask, T* out, int64_t n) {
  HAT_GRID_STRIDE(i, n) { out[i] = mask[i] ? grad[i] : T(0); }
}

template <bool HalfUp, typename T>
__global__ void lsq_kernel(const T* x, const T* scale, T* out, int64_t n, ChannelLayout l, T qmin, T qmax) {
  HAT_GRID_STRIDE(i, n) { out[i] = lsq_one<HalfUp>(x[i], scale[(i / l.inner) % l.channels], qmin, qmax); }
}

// d/dx per element, and each element's d/dscale term; the terms are summed per channel afterwards with a
// deterministic reduction (atomics would make the scale gradient depend on thread timing).
template <bool HalfUp, typename T>
__global__ void lsq_backward_kernel(const T* grad, const T* x, const T* scale, T* dx, T* terms, int64_t n,
                                    ChannelLayout l, T qmin, T qmax) {
  HAT_GRID_STRIDE(i, n) {
    const int64_t c = (i / l.inner) % l.channels;
    T d, g;
    lsq_grad_one<HalfUp>(x[i], scale[c], qmin, qmax, &d, &g);
    dx[i] = d * grad[i];
    terms[i] = g * grad[i];
  }
}

template <typename In, typename Out>
__global__ void requantize_kernel(const In* acc, const int64_t* multiplier, const int64_t* shift, Out* out,
                                  int64_t n, ChannelLayout l, int64_t qmin, int64_t qmax) {
  HAT_GRID_STRIDE(i, n) {
    const int64_t c = (i / l.inner) % l.channels;
    out[i] = static_cast<Out>(requantize_one(acc[i], multiplier[c], shift[c], qmin, qmax));
  }
}

__global__ void grid_sample_kernel(GridShape g, const int8_t* input, const int16_t* grid, int8_t* out, int64_t n) {
  HAT_GRID_STRIDE(p, n) { grid_sample_pixel(g, input, grid, out, p); }
}

std::tuple<at::Tensor, at::Tensor> fake_quant(const at::Tensor& x_in, const at::Tensor& scale_in,
                                              std::optional<int64_t> axis, int64_t qmin, int64_t qmax,
                                              bool half_up) {
  check_float_pair("hat::fake_quant", x_in, scale_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto scale = scale_in.contiguous();
  auto layout = channel_layout("hat::fake_quant", x, scale, axis);
  auto out = at::empty_like(x);
  auto mask = at::empty_like(x, x.options().dtype(at::kBool));
  const int64_t n = x.numel();
  if (n == 0) return {out, mask};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hat::fake_quant", [&] {
    HAT_DISPATCH_ROUNDING(half_up, [&] {
      fake_quant_kernel<kHalfUp, scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), mask.data_ptr<bool>(), n,
          layout, scalar_t(qmin), scalar_t(qmax));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, mask};
}

void masked_grad(const at::Tensor& grad, const at::Tensor& mask, at::Tensor& out) {
  check_mask(grad, mask);
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t n = grad.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "hat::fake_quant_backward", [&] {
    masked_grad_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<scalar_t>(), mask.data_ptr<bool>(), out.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor lsq_fake_quant(const at::Tensor& x_in, const at::Tensor& scale_in, std::optional<int64_t> axis,
                          int64_t qmin, int64_t qmax, bool half_up) {
  check_float_pair("hat::lsq_fake_quant", x_in, scale_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto scale = scale_in.contiguous();
  auto layout = channel_layout("hat::lsq_fake_quant", x, scale, axis);
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hat::lsq_fake_quant", [&] {
    HAT_DISPATCH_ROUNDING(half_up, [&] {
      lsq_kernel<kHalfUp, scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n, layout,
          scalar_t(qmin), scalar_t(qmax));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> lsq_fake_quant_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                           const at::Tensor& scale_in, std::optional<int64_t> axis,
                                                           int64_t qmin, int64_t qmax, bool half_up,
                                                           double grad_factor) {
  check_lsq_backward(grad_in, x_in, scale_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  auto grad = grad_in.contiguous();
  auto scale = scale_in.contiguous();
  auto layout = channel_layout("hat::lsq_fake_quant_backward", x, scale, axis);
  auto dx = at::empty_like(x);
  auto terms = at::empty_like(x);
  const int64_t n = x.numel();
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hat::lsq_fake_quant_backward", [&] {
      HAT_DISPATCH_ROUNDING(half_up, [&] {
        lsq_backward_kernel<kHalfUp, scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
            dx.data_ptr<scalar_t>(), terms.data_ptr<scalar_t>(), n, layout, scalar_t(qmin), scalar_t(qmax));
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t outer = layout.channels * layout.inner > 0 ? n / (layout.channels * layout.inner) : 0;
  auto dscale = terms.reshape({outer, layout.channels, layout.inner}).sum({0, 2}, false, at::kDouble);
  return {dx, dscale.mul_(grad_factor).to(scale.scalar_type()).view(scale_in.sizes())};
}

at::Tensor requantize(const at::Tensor& acc_in, const at::Tensor& multiplier_in, const at::Tensor& shift_in,
                      std::optional<int64_t> axis, int64_t qmin, int64_t qmax, at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(acc_in.device());
  auto [acc, multiplier, shift, out, layout] = requantize_args(acc_in, multiplier_in, shift_in, axis, dtype);
  const int64_t n = acc.numel();
  if (n == 0) return out;
  AT_DISPATCH_INTEGRAL_TYPES(acc.scalar_type(), "hat::requantize", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_INTEGRAL_TYPES(dtype, "hat::requantize_out", [&] {
      requantize_kernel<acc_t, scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          acc.data_ptr<acc_t>(), multiplier.data_ptr<int64_t>(), shift.data_ptr<int64_t>(),
          out.data_ptr<scalar_t>(), n, layout, qmin, qmax);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor grid_sample(const at::Tensor& input_in, const at::Tensor& grid_in, int64_t coord_shift,
                       std::string mode, std::string padding_mode) {
  check_grid_sample(input_in, grid_in, coord_shift, mode, padding_mode);
  c10::cuda::CUDAGuard guard(input_in.device());
  auto input = input_in.contiguous();
  auto grid = grid_in.contiguous();
  const GridShape g{input.size(0), input.size(1), input.size(2), input.size(3), grid.size(1), grid.size(2),
                    static_cast<int>(coord_shift), mode == "bilinear", padding_mode == "border"};
  auto out = at::empty({g.n, g.c, g.out_h, g.out_w}, input.options());
  const int64_t n = g.n * g.out_h * g.out_w;
  if (n == 0 || g.c == 0) return out;
  grid_sample_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      g, input.data_ptr<int8_t>(), grid.data_ptr<int16_t>(), out.data_ptr<int8_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, CUDA, m) {
  m.impl("fake_quant", &fake_quant);
  m.impl("fake_quant_backward", &masked_backward<masked_grad>);
  m.impl("fake_quant_backward_", &masked_backward_<masked_grad>);
  m.impl("lsq_fake_quant", &lsq_fake_quant);
  m.impl("lsq_fake_quant_backward", &lsq_fake_quant_backward);
  m.impl("requantize", &requantize);
  m.impl("grid_sample", &grid_sample);
}

}  // namespace hat
