// CPU fake quant: straight-through and LSQ, per tensor or per channel, forward and backward in one pass each.
// The hot loops are free functions over raw pointers so that they vectorize (see setup.py for the flags).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../arith.h"
#include "../checks.h"

namespace hat {
namespace {

constexpr int64_t kGrain = 16384;
constexpr int kLanes = 8;  // independent partial sums: vectorizable without reassociating one sum

template <bool HalfUp, typename T>
void fake_quant_run(const T* __restrict x, T s, T lo, T hi, T* __restrict out, bool* __restrict mask, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    bool inside;
    out[i] = fake_quant_one<HalfUp>(x[i], s, lo, hi, inside);
    mask[i] = inside;
  }
}

// grad where mask else +0, on the bit patterns (an AND with 0 or all ones): a select of floats by bytes does not
// vectorize, this does; NaN gradients pass through unchanged where the mask is set, like torch.where.
template <typename Bits>
void masked_run(const Bits* __restrict grad, const uint8_t* __restrict mask, Bits* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = grad[i] & static_cast<Bits>(Bits(0) - Bits(mask[i]));
}

template <typename T>
using BitsOf = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

template <bool HalfUp, typename T>
void lsq_run(const T* __restrict x, T s, T lo, T hi, T* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = lsq_one<HalfUp>(x[i], s, lo, hi);
}

// Writes d/dx and returns the sum of d/ds * grad over the run: kLanes independent sums in T (each over at most
// kGrain / kLanes values), so the loop vectorizes without reassociating a sum; the lanes are added in double.
template <bool HalfUp, typename T>
double lsq_backward_run(const T* __restrict x, const T* __restrict grad, T s, T lo, T hi, T* __restrict dx,
                        int64_t n) {
  T lanes[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
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
  for (int j = 0; j < kLanes; ++j) total += static_cast<double>(lanes[j]);
  return total;
}

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
    HAT_DISPATCH_ROUNDING(half_up, [&] {
      at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for_channel_runs(begin, end, layout, [&](int64_t c, int64_t b, int64_t e) {
          fake_quant_run<kHalfUp>(xp + b, sp[c], scalar_t(qmin), scalar_t(qmax), op + b, mp + b, e - b);
        });
      });
    });
  });
  return {out, mask};
}

at::Tensor fake_quant_backward(const at::Tensor& grad_in, const at::Tensor& mask_in) {
  auto grad = grad_in.contiguous();
  auto mask = mask_in.contiguous();
  TORCH_CHECK(grad.sizes() == mask.sizes() && mask.scalar_type() == at::kBool,
              "hat::fake_quant_backward: grad ", grad.sizes(), " needs a bool mask of that shape, got ",
              mask.scalar_type(), " ", mask.sizes());
  auto out = at::empty_like(grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "hat::fake_quant_backward", [&] {
    using Bits = BitsOf<scalar_t>;
    const uint8_t* mp = static_cast<const uint8_t*>(mask.const_data_ptr());  // bools are bytes 0 or 1
    const Bits* gp = static_cast<const Bits*>(grad.const_data_ptr());
    Bits* op = static_cast<Bits*>(out.data_ptr());
    at::parallel_for(0, grad.numel(), kGrain, [&](int64_t begin, int64_t end) {
      masked_run(gp + begin, mp + begin, op + begin, end - begin);
    });
  });
  return out;
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
    HAT_DISPATCH_ROUNDING(half_up, [&] {
      at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
        for_channel_runs(begin, end, layout, [&](int64_t c, int64_t b, int64_t e) {
          lsq_run<kHalfUp>(xp + b, sp[c], scalar_t(qmin), scalar_t(qmax), op + b, e - b);
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
  check_float_pair("hat::lsq_fake_quant_backward", x_in, scale_in);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type(),
              "hat::lsq_fake_quant_backward: grad must match x in shape and dtype");
  auto x = x_in.contiguous();
  auto grad = grad_in.contiguous();
  auto scale = scale_in.contiguous();
  auto layout = channel_layout("hat::lsq_fake_quant_backward", x, scale, axis);
  auto dx = at::empty_like(x);
  const int64_t n = x.numel();
  const int64_t chunks = std::max<int64_t>(1, (n + kGrain - 1) / kGrain);
  // one partial sum per (chunk, channel): no atomics, and the same result for any thread count
  std::vector<double> partial(static_cast<size_t>(chunks * layout.channels), 0.0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hat::lsq_fake_quant_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* sp = scale.data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    HAT_DISPATCH_ROUNDING(half_up, [&] {
      at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
        for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
          double* sums = partial.data() + chunk * layout.channels;
          const int64_t begin = chunk * kGrain, end = std::min(n, begin + kGrain);
          for_channel_runs(begin, end, layout, [&](int64_t c, int64_t b, int64_t e) {
            sums[c] += lsq_backward_run<kHalfUp>(xp + b, gp + b, sp[c], scalar_t(qmin), scalar_t(qmax), dp + b,
                                                 e - b);
          });
        }
      });
    });
  });
  auto total = at::zeros({layout.channels}, scale.options().dtype(at::kDouble));
  double* tp = total.data_ptr<double>();
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t c = 0; c < layout.channels; ++c) tp[c] += partial[chunk * layout.channels + c];
  return {dx, total.mul_(grad_factor).to(scale.scalar_type()).view(scale_in.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, CPU, m) {
  m.impl("fake_quant", &fake_quant);
  m.impl("fake_quant_backward", &fake_quant_backward);
  m.impl("lsq_fake_quant", &lsq_fake_quant);
  m.impl("lsq_fake_quant_backward", &lsq_fake_quant_backward);
}

}  // namespace hat
