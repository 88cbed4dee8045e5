// CPU integer grid sample (reference-toolchain semantics): int8 input, int16 grid of absolute offsets
// with `coord_shift` fractional bits added to each output pixel's own coordinate.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"
#include "../grid_sample.h"

namespace hat {
namespace {

at::Tensor grid_sample(const at::Tensor& input_in, const at::Tensor& grid_in, int64_t coord_shift,
                       std::string mode, std::string padding_mode) {
  check_grid_sample(input_in, grid_in, coord_shift, mode, padding_mode);
  auto input = input_in.contiguous();
  auto grid = grid_in.contiguous();
  const GridShape g{input.size(0), input.size(1), input.size(2), input.size(3), grid.size(1), grid.size(2),
                    static_cast<int>(coord_shift), mode == "bilinear", padding_mode == "border"};
  auto out = at::empty({g.n, g.c, g.out_h, g.out_w}, input.options());
  const int8_t* ip = input.data_ptr<int8_t>();
  const int16_t* gp = grid.data_ptr<int16_t>();
  int8_t* op = out.data_ptr<int8_t>();
  at::parallel_for(0, g.n * g.out_h * g.out_w, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) grid_sample_pixel(g, ip, gp, op, p);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, CPU, m) { m.impl("grid_sample", &grid_sample); }

}  // namespace hat
