// Differentiable fake quant ops, with autograd in C++: no Python on the training step's hot path.
// They call the device kernels (hat::fake_quant, ...) below the autograd key, so one registration serves
// CPU and CUDA.
#include <torch/autograd.h>
#include <torch/library.h>

namespace hat {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

at::Tensor undefined() { return at::Tensor(); }

class FakeQuantFunction : public torch::autograd::Function<FakeQuantFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            std::optional<int64_t> axis, int64_t qmin, int64_t qmax, bool half_up) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("hat::fake_quant", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   std::optional<int64_t>, int64_t, int64_t, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mask] = op.call(x, scale, axis, qmin, qmax, half_up);
    ctx->save_for_backward({mask});
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("hat::fake_quant_backward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    auto mask = ctx->get_saved_variables()[0];
    return {op.call(grads[0], mask), undefined(), undefined(), undefined(), undefined(), undefined()};
  }
};

// Outputs (out, lo, hi, scale): only `out` is differentiable (straight through to the weight).
class FoldedFunction : public torch::autograd::Function<FoldedFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& factor, double divisor,
                             double eps, int64_t qmin, int64_t qmax, bool half_up) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("hat::fake_quant_folded", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, double, double, int64_t, int64_t, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mask, lo, hi, scale] = op.call(weight, factor, divisor, eps, qmin, qmax, half_up);
    ctx->save_for_backward({mask});
    ctx->mark_non_differentiable({lo, hi, scale});
    return {out, lo, hi, scale};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("hat::fake_quant_backward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    auto mask = ctx->get_saved_variables()[0];
    return {op.call(grads[0], mask), undefined(), undefined(), undefined(), undefined(), undefined(), undefined()};
  }
};

class LsqFunction : public torch::autograd::Function<LsqFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            std::optional<int64_t> axis, int64_t qmin, int64_t qmax, bool half_up,
                            double grad_factor) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("hat::lsq_fake_quant", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, std::optional<int64_t>, int64_t,
                                           int64_t, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, scale});
    ctx->saved_data["axis"] = axis.has_value() ? c10::IValue(*axis) : c10::IValue();
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["half_up"] = half_up;
    ctx->saved_data["grad_factor"] = grad_factor;
    return op.call(x, scale, axis, qmin, qmax, half_up);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("hat::lsq_fake_quant_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, std::optional<int64_t>,
                                                                   int64_t, int64_t, bool, double)>();
    auto saved = ctx->get_saved_variables();
    auto axis_value = ctx->saved_data["axis"];
    std::optional<int64_t> axis = axis_value.isNone() ? std::nullopt : std::optional<int64_t>(axis_value.toInt());
    auto [dx, dscale] = op.call(grads[0].contiguous(), saved[0], saved[1], axis, ctx->saved_data["qmin"].toInt(),
                                ctx->saved_data["qmax"].toInt(), ctx->saved_data["half_up"].toBool(),
                                ctx->saved_data["grad_factor"].toDouble());
    return {dx, dscale, undefined(), undefined(), undefined(), undefined(), undefined()};
  }
};

at::Tensor fake_quant_autograd(const at::Tensor& x, const at::Tensor& scale, std::optional<int64_t> axis,
                               int64_t qmin, int64_t qmax, bool half_up) {
  return FakeQuantFunction::apply(x, scale, axis, qmin, qmax, half_up);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fake_quant_folded_autograd(
    const at::Tensor& weight, const at::Tensor& factor, double divisor, double eps, int64_t qmin, int64_t qmax,
    bool half_up) {
  auto outs = FoldedFunction::apply(weight, factor, divisor, eps, qmin, qmax, half_up);
  return {outs[0], outs[1], outs[2], outs[3]};
}

at::Tensor lsq_fake_quant_autograd(const at::Tensor& x, const at::Tensor& scale, std::optional<int64_t> axis,
                                   int64_t qmin, int64_t qmax, bool half_up, double grad_factor) {
  return LsqFunction::apply(x, scale, axis, qmin, qmax, half_up, grad_factor);
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, Autograd, m) {
  m.impl("fake_quant_autograd", &fake_quant_autograd);
  m.impl("lsq_fake_quant_autograd", &lsq_fake_quant_autograd);
  m.impl("fake_quant_folded_autograd", &fake_quant_folded_autograd);
}

}  // namespace hat
