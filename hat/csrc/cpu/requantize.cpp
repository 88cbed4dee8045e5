// CPU J5 requantization: int accumulator x int16 multiplier, rounding right shift, saturation.
#include <ATen/Parallel.h>

#include <algorithm>
#include <torch/library.h>

#include "../arith.h"
#include "../checks.h"

namespace hat {
namespace {

at::Tensor requantize(const at::Tensor& acc_in, const at::Tensor& multiplier_in, const at::Tensor& shift_in,
                      std::optional<int64_t> axis, int64_t qmin, int64_t qmax, at::ScalarType dtype) {
  auto [acc, multiplier, shift, out, layout] = requantize_args(acc_in, multiplier_in, shift_in, axis, dtype);
  AT_DISPATCH_INTEGRAL_TYPES(acc.scalar_type(), "hat::requantize", [&] {
    using acc_t = scalar_t;
    const acc_t* ap = acc.data_ptr<acc_t>();
    const int64_t* mp = multiplier.data_ptr<int64_t>();
    const int64_t* sp = shift.data_ptr<int64_t>();
    AT_DISPATCH_INTEGRAL_TYPES(dtype, "hat::requantize_out", [&] {
      scalar_t* op = out.data_ptr<scalar_t>();
      const int64_t inner = layout.inner, channels = layout.channels;
      at::parallel_for(0, acc.numel(), 16384, [&](int64_t begin, int64_t end) {
        // one run of `inner` elements shares a channel: its multiplier and shift are loop constants
        for (int64_t i = begin; i < end;) {
          const int64_t row = i / inner, c = row % channels, m = mp[c], s = sp[c];
          const int64_t run_end = std::min(end, (row + 1) * inner);
          for (; i < run_end; ++i) op[i] = static_cast<scalar_t>(requantize_one(ap[i], m, s, qmin, qmax));
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, CPU, m) { m.impl("requantize", &requantize); }

}  // namespace hat
