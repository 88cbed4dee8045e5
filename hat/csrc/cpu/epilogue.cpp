// CPU epilogue of an integer conv / linear computed as a GEMM: one pass over the accumulator [rows, channels]
// (channels last): + int32 bias, saturate to int32 (from 0 with relu), J5 requantization per channel, saturate.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <torch/library.h>

#include "epilogue.h"

namespace hat {
namespace {

template <typename acc_t>
void epilogue_rows(const at::Tensor& acc, const Epilogue& e, at::Tensor& out) {
  const int64_t rows = acc.size(0), channels = acc.size(1), run = e.length / channels;
  const acc_t* ap = acc.data_ptr<acc_t>();
  const int64_t runs = (rows + run - 1) / run;
  AT_DISPATCH_INTEGRAL_TYPES(out.scalar_type(), "hat::gemm_epilogue", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, runs, std::max<int64_t>(1, 16384 / e.length), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t first = r * run * channels;
        epilogue_run(ap + first, e, op + first, std::min(rows - r * run, run) * channels);
      }
    });
  });
}

at::Tensor gemm_epilogue(const at::Tensor& acc_in, const at::Tensor& bias, const at::Tensor& multiplier,
                         const at::Tensor& shift, const at::Tensor& upper, int64_t lower, int64_t qmin,
                         at::ScalarType dtype) {
  TORCH_CHECK(acc_in.dim() == 2, "hat::gemm_epilogue: the accumulator must be [rows, channels], got ",
              acc_in.sizes());
  const int64_t rows = acc_in.size(0), channels = acc_in.size(1);
  const auto e = epilogue_constants("hat::gemm_epilogue", channels, bias, multiplier, shift, upper, lower, qmin);
  auto acc = acc_in.contiguous();
  auto out = at::empty({rows, channels}, acc.options().dtype(dtype));
  if (acc.numel() == 0) return out;
  switch (acc.scalar_type()) {
    case at::kInt: epilogue_rows<int32_t>(acc, e, out); break;
    case at::kLong: epilogue_rows<int64_t>(acc, e, out); break;
    case at::kFloat: epilogue_rows<float>(acc, e, out); break;
    default: TORCH_CHECK(false, "hat::gemm_epilogue: the accumulator must be int32, int64 or float32 (exact "
                         "integers), got ", acc.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, CPU, m) { m.impl("gemm_epilogue", &gemm_epilogue); }

}  // namespace hat
