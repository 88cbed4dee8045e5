// CPU im2col of channels-last activations: one row per output pixel, its kernel taps' channel vectors side by side
// ([kh, kw, C], zeros for the padding: the zero point of every grid), the rows an int8 GEMM multiplies.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstring>
#include <torch/library.h>

#include "../checks.h"

namespace hat {
namespace {

at::Tensor im2col(const at::Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation) {
  const char* op = "hat::im2col";
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": x must be a channels-last [N, C, H, W] tensor, got ", x.sizes());
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 &&
                  kernel[0] > 0 && kernel[1] > 0 && stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 &&
                  dilation[1] > 0 && padding[0] >= 0 && padding[1] >= 0,
              op, ": kernel, stride, padding and dilation take two values each");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), kh = kernel[0], kw = kernel[1];
  const int64_t out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t out_w = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(out_h > 0 && out_w > 0, op, ": the kernel does not fit the padded input");
  auto out = at::empty({n * out_h * out_w, kh * kw * c}, x.options());
  const int64_t item = x.element_size(), run = c * item, row_bytes = kh * kw * run;
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, n * out_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / out_h, oh = row % out_h;
      for (int64_t ow = 0; ow < out_w; ++ow) {
        char* to = dst + (row * out_w + ow) * row_bytes;
        const int64_t first_w = ow * stride[1] - padding[1], last_w = first_w + (kw - 1) * dilation[1];
        const bool whole_rows = dilation[1] == 1 && first_w >= 0 && last_w < w;  // kw taps = one contiguous run
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t ih = oh * stride[0] - padding[0] + i * dilation[0];
          if (ih < 0 || ih >= h) {
            std::memset(to, 0, kw * run);
            to += kw * run;
          } else if (whole_rows) {
            std::memcpy(to, src + ((b * h + ih) * w + first_w) * run, kw * run);
            to += kw * run;
          } else {
            for (int64_t j = 0; j < kw; ++j, to += run) {
              const int64_t iw = first_w + j * dilation[1];
              if (iw < 0 || iw >= w)
                std::memset(to, 0, run);
              else
                std::memcpy(to, src + ((b * h + ih) * w + iw) * run, run);
            }
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, CPU, m) { m.impl("im2col", &im2col); }

}  // namespace hat
