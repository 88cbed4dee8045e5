// Argument checks and the [outer, channels, inner] view shared by the CPU and CUDA wrappers (host code).
#pragma once
#include <ATen/ATen.h>
#include <ATen/WrapDimUtils.h>
#include <optional>

namespace hat {

// x seen as [outer, channels, inner]; per-tensor (no axis) is one channel holding everything.
struct ChannelLayout {
  int64_t channels;
  int64_t inner;
};

inline ChannelLayout channel_layout(const char* op, const at::Tensor& x, const at::Tensor& scale,
                                    std::optional<int64_t> axis, const char* what = "scales") {
  if (!axis.has_value()) {
    TORCH_CHECK(scale.numel() == 1, op, ": a per-tensor call takes one of the ", what, ", got ", scale.numel(),
                "; per channel, give the channel axis");
    return {1, std::max<int64_t>(x.numel(), 1)};
  }
  int64_t a = at::maybe_wrap_dim(*axis, x.dim());
  TORCH_CHECK(scale.numel() == x.size(a), op, ": ", scale.numel(), " ", what, " for ", x.size(a),
              " channels on axis ", a);
  int64_t inner = 1;
  for (int64_t d = a + 1; d < x.dim(); ++d) inner *= x.size(d);
  return {x.size(a), std::max<int64_t>(inner, 1)};
}

inline void check_float_pair(const char* op, const at::Tensor& x, const at::Tensor& scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(scale.scalar_type() == x.scalar_type(), op, ": scale dtype ", scale.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(scale.device() == x.device(), op, ": scale is on ", scale.device(), ", x on ", x.device());
}

inline void check_lsq_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale) {
  check_float_pair("hat::lsq_fake_quant_backward", x, scale);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "hat::lsq_fake_quant_backward: grad must match x in shape and dtype");
}

inline void check_mask(const at::Tensor& grad, const at::Tensor& mask) {
  TORCH_CHECK(grad.sizes() == mask.sizes() && mask.scalar_type() == at::kBool, "hat::fake_quant_backward: grad ",
              grad.sizes(), " needs a bool mask of that shape, got ", mask.scalar_type(), " ", mask.sizes());
}

// The accumulator is an integer tensor; multiplier and shift (already int64, on its device) pair up, shifts in [0, 62].
inline void check_requantize(const at::Tensor& acc, const at::Tensor& multiplier, const at::Tensor& shift) {
  TORCH_CHECK(at::isIntegralType(acc.scalar_type(), /*includeBool=*/false),
              "hat::requantize: the accumulator must be an integer tensor, got ", acc.scalar_type());
  TORCH_CHECK(multiplier.numel() == shift.numel(), "hat::requantize: ", multiplier.numel(), " multipliers but ",
              shift.numel(), " shifts");
  TORCH_CHECK(shift.numel() == 0 || (shift.min().item<int64_t>() >= 0 && shift.max().item<int64_t>() < 63),
              "hat::requantize: shifts must lie in [0, 62]");
}

inline void check_grid_sample(const at::Tensor& input, const at::Tensor& grid, int64_t coord_shift,
                              const std::string& mode, const std::string& padding_mode) {
  TORCH_CHECK(input.dim() == 4 && input.scalar_type() == at::kChar,
              "hat::grid_sample: input must be int8 [N, C, H, W], got ", input.scalar_type(), " ", input.sizes());
  TORCH_CHECK(grid.dim() == 4 && grid.size(3) == 2 && grid.scalar_type() == at::kShort,
              "hat::grid_sample: grid must be int16 [N, H_out, W_out, 2], got ", grid.scalar_type(), " ", grid.sizes());
  TORCH_CHECK(grid.size(0) == input.size(0), "hat::grid_sample: batch ", grid.size(0), " of grid vs ",
              input.size(0), " of input");
  TORCH_CHECK(coord_shift >= 0 && coord_shift <= 8, "hat::grid_sample: coord_shift must be in [0, 8], got ",
              coord_shift);
  TORCH_CHECK(mode == "bilinear" || mode == "nearest", "hat::grid_sample: mode must be bilinear or nearest, got ",
              mode);
  TORCH_CHECK(padding_mode == "zeros" || padding_mode == "border",
              "hat::grid_sample: padding_mode must be zeros or border, got ", padding_mode);
}

// The out-of-place and in-place straight-through backward of one device, around its
// masked_grad(grad, mask, out) (grad where mask else 0; out may be grad itself).
using MaskedGradFn = void (*)(const at::Tensor&, const at::Tensor&, at::Tensor&);

template <MaskedGradFn MaskedGrad>
at::Tensor masked_backward(const at::Tensor& grad_in, const at::Tensor& mask) {
  auto grad = grad_in.contiguous();
  auto out = at::empty_like(grad);
  MaskedGrad(grad, mask.contiguous(), out);
  return out;
}

template <MaskedGradFn MaskedGrad>
at::Tensor& masked_backward_(at::Tensor& grad, const at::Tensor& mask) {
  TORCH_CHECK(grad.is_contiguous(), "hat::fake_quant_backward_: grad must be contiguous");
  MaskedGrad(grad, mask.contiguous(), grad);
  return grad;
}

// hat::requantize's arguments as both devices' kernels take them: contiguous, int64 multipliers and shifts on
// the accumulator's device, checked, with the channel layout and the output tensor.
struct RequantizeArgs {
  at::Tensor acc, multiplier, shift, out;
  ChannelLayout layout;
};

inline RequantizeArgs requantize_args(const at::Tensor& acc_in, const at::Tensor& multiplier_in,
                                      const at::Tensor& shift_in, std::optional<int64_t> axis, at::ScalarType dtype) {
  auto acc = acc_in.contiguous();
  auto multiplier = multiplier_in.to(acc.device(), at::kLong).contiguous();
  auto shift = shift_in.to(acc.device(), at::kLong).contiguous();
  check_requantize(acc, multiplier, shift);
  auto layout = channel_layout("hat::requantize", acc, multiplier, axis, "multipliers");
  return {acc, multiplier, shift, at::empty(acc.sizes(), acc.options().dtype(dtype)), layout};
}

// Calls f(T{}) with T the C++ type of an integer activation dtype: int8, int16 (or int32 when allowed).
template <typename F>
void dispatch_activation(at::ScalarType type, const char* op, bool allow_int32, F&& f) {
  switch (type) {
    case at::kChar: f(int8_t{}); break;
    case at::kShort: f(int16_t{}); break;
    case at::kInt:
      TORCH_CHECK(allow_int32, op, ": int8 or int16 tensors only, got int32");
      f(int32_t{});
      break;
    default: TORCH_CHECK(false, op, ": int8 or int16 tensors only, got ", type);
  }
}

}  // namespace hat
