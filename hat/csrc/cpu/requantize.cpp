// CPU J5 requantization: int accumulator x int16 multiplier, rounding right shift, saturation.
#include <ATen/Parallel.h>
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
      at::parallel_for(0, acc.numel(), 16384, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          int64_t c = (i / layout.inner) % layout.channels;
          op[i] = static_cast<scalar_t>(requantize_one(ap[i], mp[c], sp[c], qmin, qmax));
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, CPU, m) { m.impl("requantize", &requantize); }

}  // namespace hat
