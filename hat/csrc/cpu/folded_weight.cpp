// CPU: observe and fake-quantize a conv/linear weight with its batch-norm factor folded in, one channel at a
// time while the channel's values are in cache: the per-channel range (of W * f), the scale, and
// fake_quant(W, scale / f), i.e. fake_quant(W * f) / f, in one read of the weight instead of three.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "../arith.h"
#include "../checks.h"
#include "vector_loops.h"

namespace hat {
namespace {

constexpr int kLanes = 8;  // independent min/max lanes

// min and max of a row in kLanes independent lanes (vectorizes; min and max are exact in any order).
template <typename T>
HAT_VECTOR_CLONES void row_range(const T* __restrict x, int64_t n, T* lo, T* hi) {
  T mins[kLanes], maxs[kLanes];
  for (int j = 0; j < kLanes; ++j) mins[j] = maxs[j] = n > 0 ? x[0] : T(0);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      T v = x[i + j];
      mins[j] = (v < mins[j] || v != v) ? v : mins[j];  // a NaN sticks, as in torch.amin
      maxs[j] = (v > maxs[j] || v != v) ? v : maxs[j];
    }
  }
  for (; i < n; ++i) {
    mins[0] = (x[i] < mins[0] || x[i] != x[i]) ? x[i] : mins[0];
    maxs[0] = (x[i] > maxs[0] || x[i] != x[i]) ? x[i] : maxs[0];
  }
  for (int j = 1; j < kLanes; ++j) {
    mins[0] = (mins[j] < mins[0] || mins[j] != mins[j]) ? mins[j] : mins[0];
    maxs[0] = (maxs[j] > maxs[0] || maxs[j] != maxs[j]) ? maxs[j] : maxs[0];
  }
  *lo = mins[0];
  *hi = maxs[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fake_quant_folded(
    const at::Tensor& weight_in, const at::Tensor& factor_in, double divisor, double eps, int64_t qmin, int64_t qmax,
    bool half_up) {
  check_float_pair("hat::fake_quant_folded", weight_in, factor_in);
  TORCH_CHECK(weight_in.dim() >= 1 && factor_in.numel() == weight_in.size(0), "hat::fake_quant_folded: ",
              factor_in.numel(), " factors for ", weight_in.dim() ? weight_in.size(0) : 0, " output channels");
  auto weight = weight_in.contiguous();
  auto factor = factor_in.contiguous();
  const int64_t channels = weight.size(0), row = channels ? weight.numel() / channels : 0;
  auto out = at::empty_like(weight);
  auto mask = at::empty_like(weight, weight.options().dtype(at::kBool));
  auto lo = at::empty({channels}, factor.options());
  auto hi = at::empty({channels}, factor.options());
  auto scale = at::empty({channels}, factor.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "hat::fake_quant_folded", [&] {
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* fp = factor.data_ptr<scalar_t>();
    scalar_t *op = out.data_ptr<scalar_t>(), *lp = lo.data_ptr<scalar_t>(), *hp = hi.data_ptr<scalar_t>();
    scalar_t* sp = scale.data_ptr<scalar_t>();
    bool* mp = mask.data_ptr<bool>();
    const scalar_t div = static_cast<scalar_t>(divisor), floor_scale = static_cast<scalar_t>(eps);
    HAT_DISPATCH_ROUNDING(half_up, [&] {
      at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          scalar_t mn, mx;
          row_range(wp + c * row, row, &mn, &mx);
          const scalar_t f = fp[c], a = mn * f, b = mx * f;
          const bool nan = a != a || b != b;  // torch.minimum/maximum/clamp propagate NaN
          lp[c] = nan ? a + b : (a < b ? a : b);  // the range of W * f: a negative f swaps the ends
          hp[c] = nan ? a + b : (a < b ? b : a);
          const scalar_t lo_abs = std::abs(lp[c]), hi_abs = std::abs(hp[c]);
          scalar_t s = (nan ? lo_abs : (lo_abs > hi_abs ? lo_abs : hi_abs)) / div;
          s = (s < floor_scale) ? floor_scale : s;
          sp[c] = s;
          const scalar_t step = f == scalar_t(0) ? std::numeric_limits<scalar_t>::max() : s / f;
          fake_quant_run<kHalfUp, false>(wp + c * row, &step, scalar_t(qmin), scalar_t(qmax), op + c * row,
                                          mp + c * row, row);
        }
      });
    });
  });
  return {out, mask, lo, hi, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, CPU, m) { m.impl("fake_quant_folded", &fake_quant_folded); }

}  // namespace hat
