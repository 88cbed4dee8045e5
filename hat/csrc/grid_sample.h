// One output pixel of the integer grid sample, shared by the CPU and CUDA kernels.
#pragma once
#include "arith.h"

namespace hat {

struct GridShape {
  int64_t n, c, h, w, out_h, out_w;
  int shift;  // fractional bits of the grid
  bool bilinear, border;
};

// Output pixel p = (n, y, x) over all channels. Coordinates are fixed point: pixel index << shift.
HAT_HD void grid_sample_pixel(const GridShape& g, const int8_t* input, const int16_t* grid, int8_t* out, int64_t p) {
  const int64_t x = p % g.out_w, y = (p / g.out_w) % g.out_h, n = p / (g.out_w * g.out_h);
  const int32_t one = 1 << g.shift;
  int32_t fx = static_cast<int32_t>(x) * one + grid[2 * p];  // multiplications: no left shift of negatives
  int32_t fy = static_cast<int32_t>(y) * one + grid[2 * p + 1];
  const int64_t plane = g.h * g.w, out_plane = g.out_h * g.out_w;
  const int8_t* in_n = input + n * g.c * plane;
  int8_t* out_p = out + n * g.c * out_plane + y * g.out_w + x;
  if (!g.bilinear) {
    int32_t ix = shift_round(fx, g.shift), iy = shift_round(fy, g.shift);
    if (g.border) {
      ix = clamp_to<int32_t>(ix, 0, static_cast<int32_t>(g.w) - 1);
      iy = clamp_to<int32_t>(iy, 0, static_cast<int32_t>(g.h) - 1);
    }
    const bool inside = ix >= 0 && ix < g.w && iy >= 0 && iy < g.h;
    for (int64_t c = 0; c < g.c; ++c) out_p[c * out_plane] = inside ? in_n[c * plane + iy * g.w + ix] : int8_t(0);
    return;
  }
  if (g.border) {
    fx = clamp_to<int32_t>(fx, 0, (static_cast<int32_t>(g.w) - 1) * one);
    fy = clamp_to<int32_t>(fy, 0, (static_cast<int32_t>(g.h) - 1) * one);
  }
  const int32_t x0 = fx >> g.shift, y0 = fy >> g.shift;  // floor, also for negative coordinates
  const int32_t dx = fx - x0 * one, dy = fy - y0 * one;
  const int32_t weights[4] = {(one - dx) * (one - dy), dx * (one - dy), (one - dx) * dy, dx * dy};
  const int32_t xs[4] = {x0, x0 + 1, x0, x0 + 1}, ys[4] = {y0, y0, y0 + 1, y0 + 1};
  int64_t offsets[4];
  bool valid[4];
  for (int k = 0; k < 4; ++k) {
    valid[k] = weights[k] != 0 && xs[k] >= 0 && xs[k] < g.w && ys[k] >= 0 && ys[k] < g.h;
    offsets[k] = valid[k] ? ys[k] * g.w + xs[k] : 0;
  }
  for (int64_t c = 0; c < g.c; ++c) {
    const int8_t* src = in_n + c * plane;
    int32_t acc = 0;
    for (int k = 0; k < 4; ++k) acc += valid[k] ? weights[k] * src[offsets[k]] : 0;
    out_p[c * out_plane] = static_cast<int8_t>(shift_round(acc, 2 * g.shift));
  }
}

}  // namespace hat
