// CPU: observe and fake-quantize a conv/linear weight with its batch-norm factor folded in: the per-channel range
// of W * f, the scale, and fake_quant(W, scale / f), i.e. fake_quant(W * f) / f, without forming W * f. The
// per-channel min/max come from ATen's amin/amax (vectorized, NaN-propagating); the rest is one pass per channel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../arith.h"
#include "../checks.h"
#include "vector_loops.h"

namespace hat {
namespace {

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
  auto rows = weight.view({channels, row});
  auto row_min = channels && row ? rows.amin(1) : at::zeros({channels}, factor.options());
  auto row_max = channels && row ? rows.amax(1) : at::zeros({channels}, factor.options());
  auto scale = at::empty({channels}, factor.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "hat::fake_quant_folded", [&] {
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* fp = factor.data_ptr<scalar_t>();
    const scalar_t *minp = row_min.data_ptr<scalar_t>(), *maxp = row_max.data_ptr<scalar_t>();
    scalar_t *op = out.data_ptr<scalar_t>(), *lp = lo.data_ptr<scalar_t>(), *hp = hi.data_ptr<scalar_t>();
    scalar_t* sp = scale.data_ptr<scalar_t>();
    bool* mp = mask.data_ptr<bool>();
    const scalar_t div = static_cast<scalar_t>(divisor), floor_scale = static_cast<scalar_t>(eps);
    HAT_DISPATCH_ROUNDING(half_up, [&] {
      at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          const scalar_t f = fp[c], a = minp[c] * f, b = maxp[c] * f;
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
