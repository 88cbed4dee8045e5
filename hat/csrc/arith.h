// Element-wise arithmetic shared by the CPU and CUDA kernels: one definition of each J5 rule.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define HAT_HD __host__ __device__ __forceinline__
#else
#define HAT_HD inline
#endif

namespace hat {

// Real value / scale -> integer grid: half up (J5 hardware) or half to even (torch, ONNX). A template
// parameter, so that the CPU loops vectorize.
template <bool HalfUp, typename T>
HAT_HD T round_grid(T v) {
  return HalfUp ? std::floor(v + T(0.5)) : std::nearbyint(v);
}

// Calls body.template operator()<true|false>() for the rounding mode: one instantiation per mode.
#define HAT_DISPATCH_ROUNDING(half_up, ...) \
  do {                                     \
    if (half_up) {                         \
      constexpr bool kHalfUp = true;       \
      __VA_ARGS__();                       \
    } else {                               \
      constexpr bool kHalfUp = false;      \
      __VA_ARGS__();                       \
    }                                      \
  } while (0)

template <typename T>
HAT_HD T clamp_to(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// Straight-through fake quant of one value; `inside` is the gradient mask (rounded value within range).
template <bool HalfUp, typename T>
HAT_HD T fake_quant_one(T x, T scale, T qmin, T qmax, bool& inside) {
  T r = round_grid<HalfUp>(x / scale);
  T c = clamp_to(r, qmin, qmax);
  inside = (c == r);
  return c * scale;
}

// LSQ: clamp v = x / s to [qmin, qmax], then round. Returns the fake-quantized value.
template <bool HalfUp, typename T>
HAT_HD T lsq_one(T x, T scale, T qmin, T qmax) {
  return round_grid<HalfUp>(clamp_to(x / scale, qmin, qmax)) * scale;
}

// LSQ gradient terms of one value: d out / d x (1 inside, 0 outside) and d out / d s before the gradient scale.
// Branch-free (selects), so that the CPU loop vectorizes.
template <bool HalfUp, typename T>
HAT_HD void lsq_grad_one(T x, T scale, T qmin, T qmax, T* dx, T* ds) {
  T v = x / scale;
  bool below = v < qmin, above = v > qmax;
  T inside_ds = round_grid<HalfUp>(v) - v;
  *dx = (below || above) ? T(0) : T(1);
  *ds = below ? qmin : (above ? qmax : inside_ds);
}

// The rounding term of a right shift by n: 2^(n-1), none for n = 0.
HAT_HD int64_t shift_rounding(int64_t shift) { return shift > 0 ? int64_t(1) << (shift - 1) : 0; }

// J5 requantization of one accumulator: (acc * m + 2^(n-1)) >> n (arithmetic), then saturate. The rounding term
// comes precomputed (shift_rounding), so that loops over channels vectorize.
HAT_HD int64_t requantize_rounded(int64_t acc, int64_t multiplier, int64_t rounding, int64_t shift, int64_t qmin,
                                  int64_t qmax) {
  int64_t v = (acc * multiplier + rounding) >> shift;
  return v < qmin ? qmin : (v > qmax ? qmax : v);
}

HAT_HD int64_t requantize_one(int64_t acc, int64_t multiplier, int64_t shift, int64_t qmin, int64_t qmax) {
  return requantize_rounded(acc, multiplier, shift_rounding(shift), shift, qmin, qmax);
}

// Round-half-up right shift of a non-negative-weight interpolation sum (arithmetic shift floors negatives).
HAT_HD int32_t shift_round(int32_t v, int shift) {
  return shift > 0 ? (v + (1 << (shift - 1))) >> shift : v;
}

}  // namespace hat
