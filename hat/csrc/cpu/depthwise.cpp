// CPU depthwise conv (one filter per channel) on channels-last int8/int16 activations: exact int32 sums, then the
// GEMM epilogue (bias, int32 saturation, relu, requantization) on each output row while its sums are in L1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <torch/library.h>
#include <vector>

#include "../checks.h"
#include "epilogue.h"

namespace hat {
namespace {

// The geometry of one call.
struct Window {
  int64_t h, w, c, kh, kw, out_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// One row of output pixels: per pixel, acc[c] += x[c] * w[c] over the taps inside the input (int32 products and
// sums: the caller bounded them), then the epilogue. One vectorized clone for the whole row.
template <typename in_t, typename out_t>
HAT_AVX512_CLONES
void depthwise_row(const in_t* __restrict image, const int32_t* __restrict weight, const Window& g, int64_t oh,
                   const Epilogue& e, int32_t* __restrict acc, out_t* __restrict out) {
  const int64_t c = g.c;
  for (int64_t ow = 0; ow < g.out_w; ++ow) {
    for (int64_t k = 0; k < c; ++k) acc[k] = 0;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
      if (ih < 0 || ih >= g.h) continue;  // zero padding: the zero point of every grid adds nothing
      for (int64_t j = 0; j < g.kw; ++j) {
        const int64_t iw = ow * g.stride_w - g.pad_w + j * g.dil_w;
        if (iw < 0 || iw >= g.w) continue;
        const in_t* x = image + (ih * g.w + iw) * c;
        const int32_t* wt = weight + (i * g.kw + j) * c;
        for (int64_t k = 0; k < c; ++k) acc[k] += static_cast<int32_t>(x[k]) * wt[k];
      }
    }
    epilogue_values(acc, e.bias, e.multiplier, e.rounding, e.shift, e.upper, e.lower, e.qmin, out + ow * c, c);
  }
}

// One row of output pixels when the stride along W is 1: for each tap, the pixels it reaches form one contiguous run
// of (pixel, channel) values in the input and in the row's sums, so each tap is one long vectorized loop; the
// weights come repeated per pixel ([taps, out_w * C]) and the epilogue constants over the whole row.
template <typename in_t, typename out_t>
HAT_AVX512_CLONES
void depthwise_row_unit_stride(const in_t* __restrict image, const int32_t* __restrict weight_rows, const Window& g,
                               int64_t oh, const Epilogue& row_epilogue, int32_t* __restrict acc,
                               out_t* __restrict out) {
  const int64_t c = g.c, row = g.out_w * c;
  for (int64_t k = 0; k < row; ++k) acc[k] = 0;
  for (int64_t i = 0; i < g.kh; ++i) {
    const int64_t ih = oh * g.stride_h - g.pad_h + i * g.dil_h;
    if (ih < 0 || ih >= g.h) continue;  // zero padding: the zero point of every grid adds nothing
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t shift = j * g.dil_w - g.pad_w;  // iw = ow + shift
      const int64_t first = std::max<int64_t>(0, -shift), last = std::min<int64_t>(g.out_w, g.w - shift);
      if (first >= last) continue;
      const in_t* x = image + (ih * g.w + first + shift) * c;
      const int32_t* wt = weight_rows + (i * g.kw + j) * row + first * c;
      int32_t* a = acc + first * c;
      const int64_t n = (last - first) * c;
      for (int64_t k = 0; k < n; ++k) a[k] += static_cast<int32_t>(x[k]) * wt[k];
    }
  }
  const Epilogue& e = row_epilogue;
  epilogue_values(acc, e.bias, e.multiplier, e.rounding, e.shift, e.upper, e.lower, e.qmin, out, row);
}

at::Tensor depthwise_conv2d(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, const at::Tensor& bias,
                            const at::Tensor& multiplier, const at::Tensor& shift, const at::Tensor& upper,
                            int64_t lower, int64_t qmin, at::ScalarType dtype) {
  const char* op = "hat::depthwise_conv2d";
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": x must be a channels-last [N, C, H, W] tensor, got ", x.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == at::kInt && weight.is_contiguous() &&
                  weight.size(2) == x.size(1),
              op, ": weight must be contiguous int32 [kh, kw, C] with C = ", x.size(1), ", got ", weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && stride[0] > 0 && stride[1] > 0 &&
                  dilation[0] > 0 && dilation[1] > 0 && padding[0] >= 0 && padding[1] >= 0,
              op, ": stride, padding and dilation take two values each (stride, dilation >= 1; padding >= 0)");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), kh = weight.size(0), kw = weight.size(1);
  const int64_t out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(out_h > 0 && out_w > 0, op, ": the kernel does not fit the padded input");
  const auto e = epilogue_constants(op, c, bias, multiplier, shift, upper, lower, qmin);
  auto out = at::empty({n * out_h * out_w, c}, x.options().dtype(dtype));
  const int32_t* wp = weight.data_ptr<int32_t>();
  dispatch_activation(x.scalar_type(), op, false, [&](auto in_value) {
    using in_t = decltype(in_value);
    const in_t* xp = static_cast<const in_t*>(x.data_ptr());
    dispatch_activation(dtype, op, true, [&](auto out_value) {
      using out_t = decltype(out_value);
      out_t* op_ = static_cast<out_t*>(out.data_ptr());
      const Window g{h, w, c, kh, kw, out_w, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
      if (stride[1] == 1) {
        auto repeat_row = [&](const at::Tensor& t) { return t.narrow(0, 0, c).repeat({out_w}); };
        const auto bias_row = repeat_row(bias), multiplier_row = repeat_row(multiplier);
        const auto shift_row = repeat_row(shift), upper_row = repeat_row(upper);
        const auto row_e = epilogue_constants(op, c, bias_row, multiplier_row, shift_row, upper_row, lower, qmin);
        const auto weight_rows = weight.reshape({kh * kw, 1, c}).expand({kh * kw, out_w, c}).contiguous();
        const int32_t* wr = weight_rows.data_ptr<int32_t>();
        at::parallel_for(0, n * out_h, 1, [&](int64_t begin, int64_t end) {
          std::vector<int32_t> acc(out_w * c);
          for (int64_t row = begin; row < end; ++row) {
            const int64_t b = row / out_h, oh = row % out_h;
            depthwise_row_unit_stride(xp + b * h * w * c, wr, g, oh, row_e, acc.data(), op_ + row * out_w * c);
          }
        });
        return;
      }
      at::parallel_for(0, n * out_h, 1, [&](int64_t begin, int64_t end) {
        std::vector<int32_t> acc(c);
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / out_h, oh = row % out_h;
          depthwise_row(xp + b * h * w * c, wp, g, oh, e, acc.data(), op_ + row * out_w * c);
        }
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, CPU, m) { m.impl("depthwise_conv2d", &depthwise_conv2d); }

}  // namespace hat
