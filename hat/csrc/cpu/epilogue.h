// The epilogue of an integer conv / linear over one run of accumulators (channels last), shared by the GEMM
// epilogue and the depthwise conv: + int32 bias, saturate to int32 (from `lower`), J5 requantization, saturate.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

#include "../arith.h"
#include "vector_loops.h"

namespace hat {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// One run of n accumulators with their per-channel constants. A float accumulator holds exact integers (the caller
// proved its sums below 2^24). Inlined into each vectorized clone that calls it (epilogue_row, depthwise rows).
template <typename acc_t, typename out_t>
__attribute__((always_inline)) inline void epilogue_values(
    const acc_t* __restrict acc, const int32_t* __restrict bias, const int32_t* __restrict multiplier,
    const int64_t* __restrict rounding, const int32_t* __restrict shift, const int32_t* __restrict upper,
    int64_t lower, int64_t qmin, out_t* __restrict out, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    int64_t v = static_cast<int64_t>(acc[c]) + bias[c];
    v = v < lower ? lower : (v > kInt32Max ? kInt32Max : v);
    out[c] = static_cast<out_t>(requantize_rounded(v, multiplier[c], rounding[c], shift[c], qmin, upper[c]));
  }
}

template <typename acc_t, typename out_t>
HAT_AVX512_CLONES
void epilogue_row(const acc_t* __restrict acc, const int32_t* __restrict bias, const int32_t* __restrict multiplier,
                  const int64_t* __restrict rounding, const int32_t* __restrict shift,
                  const int32_t* __restrict upper, int64_t lower, int64_t qmin, out_t* __restrict out, int64_t n) {
  epilogue_values(acc, bias, multiplier, rounding, shift, upper, lower, qmin, out, n);
}

// The per-channel constants of a call: int32 [channels * k], each channel's value with the whole run repeated k
// times (fast.py prepares them once per layer), so that one epilogue_row call covers k rows. Checked for form here;
// the values were checked when the program was loaded.
struct Epilogue {
  const int32_t *bias, *multiplier, *shift, *upper;
  at::Tensor rounding_storage;
  const int64_t* rounding;
  int64_t lower, qmin, length;
};

inline Epilogue epilogue_constants(const char* op, int64_t channels, const at::Tensor& bias,
                                   const at::Tensor& multiplier, const at::Tensor& shift, const at::Tensor& upper,
                                   int64_t lower, int64_t qmin) {
  const int64_t length = bias.numel();
  for (const auto* t : {&bias, &multiplier, &shift, &upper})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->numel() == length && channels > 0 &&
                    length % channels == 0 && length > 0,
                op, ": the constants must be contiguous int32 tensors of one length, a multiple of the ", channels,
                " channels");
  auto rounding = at::empty({length}, bias.options().dtype(at::kLong));
  const int32_t* sp = shift.data_ptr<int32_t>();
  int64_t* rp = rounding.data_ptr<int64_t>();
  for (int64_t i = 0; i < length; ++i) {
    TORCH_CHECK(sp[i] >= 0 && sp[i] < 63, op, ": shifts must lie in [0, 62], got ", sp[i]);
    rp[i] = shift_rounding(sp[i]);
  }
  return {bias.data_ptr<int32_t>(), multiplier.data_ptr<int32_t>(), sp, upper.data_ptr<int32_t>(), rounding, rp,
          lower, qmin, length};
}

template <typename acc_t, typename out_t>
inline void epilogue_run(const acc_t* acc, const Epilogue& e, out_t* out, int64_t n) {
  epilogue_row(acc, e.bias, e.multiplier, e.rounding, e.shift, e.upper, e.lower, e.qmin, out, n);
}

}  // namespace
}  // namespace hat
