// CPU J5 add of two activations in one pass: acc = sign * (x << x_shift) + y * y_multiplier, requantized and
// saturated (hat.integer.kernels.add, fused). x and y share shape and memory layout (both dense).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <torch/library.h>

#include "../checks.h"
#include "vector_loops.h"

namespace hat {
namespace {

template <typename x_t, typename y_t, typename out_t>
HAT_AVX512_CLONES
void add_run(const x_t* __restrict x, const y_t* __restrict y, int64_t x_shift, int64_t x_sign, int64_t y_multiplier,
             int64_t multiplier, int64_t rounding, int64_t shift, int64_t qmin, int64_t qmax, out_t* __restrict out,
             int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t acc = x_sign * (static_cast<int64_t>(x[i]) << x_shift) + static_cast<int64_t>(y[i]) * y_multiplier;
    out[i] = static_cast<out_t>(requantize_rounded(acc, multiplier, rounding, shift, qmin, qmax));
  }
}

at::Tensor add_requantize(const at::Tensor& x, const at::Tensor& y, int64_t x_shift, int64_t x_sign,
                          int64_t y_multiplier, int64_t multiplier, int64_t shift, int64_t qmin, int64_t qmax,
                          at::ScalarType dtype) {
  const char* op = "hat::add_requantize";
  TORCH_CHECK(x.sizes() == y.sizes() && x.strides() == y.strides() && x.is_non_overlapping_and_dense(), op,
              ": x and y must have one shape and one dense memory layout, got ", x.sizes(), " / ", y.sizes());
  TORCH_CHECK(x_shift >= 0 && x_shift < 32 && shift >= 0 && shift < 63, op, ": shifts out of range");
  auto out = at::empty_strided(x.sizes(), x.strides(), x.options().dtype(dtype));
  const int64_t count = x.numel(), rounding = shift_rounding(shift);
  dispatch_activation(x.scalar_type(), op, false, [&](auto xv) {
    using x_t = decltype(xv);
    dispatch_activation(y.scalar_type(), op, false, [&](auto yv) {
      using y_t = decltype(yv);
      dispatch_activation(dtype, op, true, [&](auto ov) {
        using out_t = decltype(ov);
        const x_t* xp = static_cast<const x_t*>(x.data_ptr());
        const y_t* yp = static_cast<const y_t*>(y.data_ptr());
        out_t* o = static_cast<out_t*>(out.data_ptr());
        at::parallel_for(0, count, 32768, [&](int64_t begin, int64_t end) {
          add_run(xp + begin, yp + begin, x_shift, x_sign, y_multiplier, multiplier, rounding, shift, qmin, qmax,
                  o + begin, end - begin);
        });
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, CPU, m) { m.impl("add_requantize", &add_requantize); }

}  // namespace hat
