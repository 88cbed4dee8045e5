// The vectorized element loops of the CPU fake-quant kernels (shared by fake_quant.cpp and folded_weight.cpp).
#pragma once
#include <cstdint>
#include <type_traits>

#include "../arith.h"

namespace hat {
namespace {  // internal linkage in each kernel file

// The hot loops are compiled twice on x86-64, for AVX2 and for the baseline, and the loader picks the one the
// CPU runs (GCC function multiversioning): twice the vector width where there is one, no crash where there isn't.
// Integer loops (requantization, int8 convs) get an AVX-512 clone too: twice the width, and int64 vector multiplies.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HAT_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#define HAT_AVX512_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define HAT_VECTOR_CLONES
#define HAT_AVX512_CLONES
#endif

constexpr int kSumLanes = 8;  // independent partial sums: vectorizable without reassociating one sum


// A run of values: one scale (s[0]) or, with PerElement, s[i] each (short channels: a row of [C, inner]).
template <bool HalfUp, bool PerElement, typename T>
HAT_VECTOR_CLONES
void fake_quant_run(const T* __restrict x, const T* __restrict s, T lo, T hi, T* __restrict out,
                    bool* __restrict mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    bool inside;
    out[i] = fake_quant_one<HalfUp>(x[i], s[PerElement ? i : 0], lo, hi, inside);
    mask[i] = inside;
  }
}

// grad where mask else +0, on the bit patterns (an AND with 0 or all ones): a select of floats by bytes does not
// vectorize, this does; NaN gradients pass through unchanged where the mask is set, like torch.where.
template <typename Bits>
HAT_VECTOR_CLONES
void masked_run(const Bits* __restrict grad, const uint8_t* __restrict mask, Bits* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = grad[i] & static_cast<Bits>(Bits(0) - Bits(mask[i]));
}

template <typename Bits>
HAT_VECTOR_CLONES
void masked_inplace_run(Bits* __restrict grad, const uint8_t* __restrict mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) grad[i] &= static_cast<Bits>(Bits(0) - Bits(mask[i]));
}

template <typename T>
using BitsOf = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

template <bool HalfUp, bool PerElement, typename T>
HAT_VECTOR_CLONES
void lsq_run(const T* __restrict x, const T* __restrict s, T lo, T hi, T* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = lsq_one<HalfUp>(x[i], s[PerElement ? i : 0], lo, hi);
}

// Short channels: d/dx, and d/ds * grad added per position into sums[i] (positions of a [C, inner] row).
template <bool HalfUp, typename T>
HAT_VECTOR_CLONES
void lsq_backward_row(const T* __restrict x, const T* __restrict grad, const T* __restrict s, T lo, T hi,
                      T* __restrict dx, double* __restrict sums, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    T d, g;
    lsq_grad_one<HalfUp>(x[i], s[i], lo, hi, &d, &g);
    dx[i] = d * grad[i];
    sums[i] += static_cast<double>(g * grad[i]);
  }
}

// Writes d/dx and returns the sum of d/ds * grad over the run: kSumLanes independent sums in T (each over at most
// kGrain / kSumLanes values), so the loop vectorizes without reassociating a sum; the lanes are added in double.
template <bool HalfUp, typename T>
HAT_VECTOR_CLONES
double lsq_backward_run(const T* __restrict x, const T* __restrict grad, T s, T lo, T hi, T* __restrict dx,
                        int64_t n) {
  T lanes[kSumLanes] = {0};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int j = 0; j < kSumLanes; ++j) {
      T d, g;
      lsq_grad_one<HalfUp>(x[i + j], s, lo, hi, &d, &g);
      dx[i + j] = d * grad[i + j];
      lanes[j] += g * grad[i + j];
    }
  }
  double total = 0.0;
  for (; i < n; ++i) {
    T d, g;
    lsq_grad_one<HalfUp>(x[i], s, lo, hi, &d, &g);
    dx[i] = d * grad[i];
    total += static_cast<double>(g * grad[i]);
  }
  for (int j = 0; j < kSumLanes; ++j) total += static_cast<double>(lanes[j]);
  return total;
}

}  // namespace
}  // namespace hat
