// CPU fake quant: straight-through and LSQ, per tensor or per channel, forward and backward in one pass each.
// The hot loops are free functions over raw pointers so that they vectorize (see setup.py for the flags).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../arith.h"
#include "../checks.h"
#include "vector_loops.h"

namespace hat {
namespace {

constexpr int64_t kGrain = 16384;
constexpr int64_t kShortRun = 64;  // channels with fewer contiguous values take the per-element-scale loops

// Calls body(channel, begin, end) for the runs of [begin, end) that share one channel.
template <typename Body>
void for_channel_runs(int64_t begin, int64_t end, ChannelLayout l, const Body& body) {
  for (int64_t i = begin; i < end;) {
    int64_t row = i / l.inner;
    int64_t stop = std::min(end, (row + 1) * l.inner);
    body(row % l.channels, i, stop);
    i = stop;
  }
}

bool short_runs(ChannelLayout l) { return l.channels > 1 && l.inner < kShortRun; }

// One scale per position of a [C, inner] row (scale repeated `inner` times), for short channels.
at::Tensor scale_row(const at::Tensor& scale, ChannelLayout l) { return scale.repeat_interleave(l.inner); }

// Calls run(begin, positions) for each [C, inner] row of x, in parallel.
template <typename Body>
void for_rows(int64_t numel, ChannelLayout l, const Body& run) {
  const int64_t row = l.channels * l.inner;
  at::parallel_for(0, numel / row, std::max<int64_t>(1, kGrain / row), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) run(r * row, row);
  });
}

std::tuple<at::Tensor, at::Tensor> fake_quant(const at::Tensor& x_in, const at::Tensor& scale_in,
                                              std::optional<int64_t> axis, int64_t qmin, int64_t qmax,
                                              bool half_up) {
  check_float_pair("hat::fake_quant", x_in, scale_in);
  auto x = x_in.contiguous();
  auto scale = scale_in.contiguous();
  auto layout = channel_layout("hat::fake_quant", x, scale, axis);
  auto out = at::empty_like(x);
  auto mask = at::empty_like(x, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hat::fake_quant", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp = scale.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    bool* mp = mask.data_ptr<bool>();
    const scalar_t lo = qmin, hi = qmax;
    HAT_DISPATCH_ROUNDING(half_up, [&] {
      if (short_runs(layout)) {
        auto row = scale_row(scale, layout);
        const scalar_t* rp = row.data_ptr<scalar_t>();
        for_rows(x.numel(), layout, [&](int64_t b, int64_t n) {
          fake_quant_run<kHalfUp, true>(xp + b, rp, lo, hi, op + b, mp + b, n);
        });
        return;
      }
      at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for_channel_runs(begin, end, layout, [&](int64_t c, int64_t b, int64_t e) {
          fake_quant_run<kHalfUp, false>(xp + b, sp + c, lo, hi, op + b, mp + b, e - b);
        });
      });
    });
  });
  return {out, mask};
}

// grad where mask else 0, into `out`: a new tensor, or grad itself (the in-place form).
void masked_grad(const at::Tensor& grad, const at::Tensor& mask, at::Tensor& out) {
  check_mask(grad, mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "hat::fake_quant_backward", [&] {
    using Bits = BitsOf<scalar_t>;
    const uint8_t* mp = static_cast<const uint8_t*>(mask.const_data_ptr());  // bools are bytes 0 or 1
    const Bits* gp = static_cast<const Bits*>(grad.const_data_ptr());
    Bits* op = static_cast<Bits*>(out.data_ptr());
    at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
      if (op == gp) {
        masked_inplace_run(op + begin, mp + begin, end - begin);
      } else {
        masked_run(gp + begin, mp + begin, op + begin, end - begin);
      }
    });
  });
}

at::Tensor lsq_fake_quant(const at::Tensor& x_in, const at::Tensor& scale_in, std::optional<int64_t> axis,
                          int64_t qmin, int64_t qmax, bool half_up) {
  check_float_pair("hat::lsq_fake_quant", x_in, scale_in);
  auto x = x_in.contiguous();
  auto scale = scale_in.contiguous();
  auto layout = channel_layout("hat::lsq_fake_quant", x, scale, axis);
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hat::lsq_fake_quant", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp = scale.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t lo = qmin, hi = qmax;
    HAT_DISPATCH_ROUNDING(half_up, [&] {
      if (short_runs(layout)) {
        auto row = scale_row(scale, layout);
        const scalar_t* rp = row.data_ptr<scalar_t>();
        for_rows(x.numel(), layout,
                 [&](int64_t b, int64_t n) { lsq_run<kHalfUp, true>(xp + b, rp, lo, hi, op + b, n); });
        return;
      }
      at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for_channel_runs(begin, end, layout, [&](int64_t c, int64_t b, int64_t e) {
          lsq_run<kHalfUp, false>(xp + b, sp + c, lo, hi, op + b, e - b);
        });
      });
    });
  });
  return out;
}

// d/dx and d/dscale (summed per channel in double, times grad_factor) in one pass over x and grad.
std::tuple<at::Tensor, at::Tensor> lsq_fake_quant_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                           const at::Tensor& scale_in, std::optional<int64_t> axis,
                                                           int64_t qmin, int64_t qmax, bool half_up,
                                                           double grad_factor) {
  check_lsq_backward(grad_in, x_in, scale_in);
  auto x = x_in.contiguous();
  auto grad = grad_in.contiguous();
  auto scale = scale_in.contiguous();
  auto layout = channel_layout("hat::lsq_fake_quant_backward", x, scale, axis);
  auto dx = at::empty_like(x);
  const int64_t n = x.numel();
  std::vector<double> total(layout.channels, 0.0);
  auto dscale = at::empty_like(scale);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hat::lsq_fake_quant_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* sp = scale.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    const scalar_t lo = qmin, hi = qmax;
    // fixed chunks, one partial sum per (chunk, position): no atomics, the same result for any thread count
    const bool rows = short_runs(layout);
    const int64_t width = rows ? layout.channels * layout.inner : layout.channels;  // positions summed apart
    const int64_t chunk_len = rows ? std::max<int64_t>(1, kGrain / width) * width : kGrain;
    const int64_t chunks = std::max<int64_t>(1, (n + chunk_len - 1) / chunk_len);
    std::vector<double> partial(static_cast<size_t>(chunks * width), 0.0);
    auto row_scale = rows ? scale_row(scale, layout) : scale;
    const scalar_t* rp = row_scale.data_ptr<scalar_t>();
    HAT_DISPATCH_ROUNDING(half_up, [&] {
      at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
        for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
          double* sums = partial.data() + chunk * width;
          const int64_t begin = chunk * chunk_len, end = std::min(n, begin + chunk_len);
          if (rows) {
            for (int64_t b = begin; b < end; b += width)
              lsq_backward_row<kHalfUp>(xp + b, gp + b, rp, lo, hi, dp + b, sums, width);
            continue;
          }
          for_channel_runs(begin, end, layout, [&](int64_t c, int64_t b, int64_t e) {
            sums[c] += lsq_backward_run<kHalfUp>(xp + b, gp + b, sp[c], lo, hi, dp + b, e - b);
          });
        }
      });
    });
    for (int64_t chunk = 0; chunk < chunks; ++chunk)
      for (int64_t p = 0; p < width; ++p) total[rows ? p / layout.inner : p] += partial[chunk * width + p];
    scalar_t* out = dscale.data_ptr<scalar_t>();
    for (int64_t c = 0; c < layout.channels; ++c) out[c] = static_cast<scalar_t>(total[c] * grad_factor);
  });
  return {dx, dscale.view(scale_in.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, CPU, m) {
  m.impl("fake_quant", &fake_quant);
  m.impl("fake_quant_backward", &masked_backward<masked_grad>);
  m.impl("fake_quant_backward_", &masked_backward_<masked_grad>);
  m.impl("lsq_fake_quant", &lsq_fake_quant);
  m.impl("lsq_fake_quant_backward", &lsq_fake_quant_backward);
}

}  // namespace hat
