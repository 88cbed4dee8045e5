// Differentiable fake quant ops, with autograd in C++: no Python on the training step's hot path.
// They call the device kernels (hat::fake_quant, ...) below the autograd key, so one registration serves CPU and
// CUDA; below autograd (inference mode) the same names run the plain kernels.
#include <torch/autograd.h>
#include <torch/library.h>

namespace hat {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using Tensor = at::Tensor;
using MaybeAxis = std::optional<int64_t>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const auto& fake_quant_op() {
  static auto op = find<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, MaybeAxis, int64_t, int64_t, bool)>(
      "hat::fake_quant");
  return op;
}

const auto& masked_grad_op() {
  static auto op = find<Tensor(const Tensor&, const Tensor&)>("hat::fake_quant_backward");
  return op;
}

const auto& masked_grad_inplace_op() {
  static auto op = find<Tensor&(Tensor&, const Tensor&)>("hat::fake_quant_backward_");
  return op;
}

// The straight-through gradient. When nobody else can see the incoming gradient (this is its only handle, it owns
// its storage, it is no view), it is masked where it lies: no weight-sized allocation and write each step.
Tensor masked_grad(Tensor grad, const Tensor& mask) {
  const bool owned = grad.defined() && grad.use_count() == 1 && !grad.is_view() && grad.is_contiguous() &&
                     grad.storage().use_count() == 1 && grad.sizes() == mask.sizes();
  return owned ? masked_grad_inplace_op().call(grad, mask) : masked_grad_op().call(grad, mask);
}

const auto& lsq_op() {
  static auto op = find<Tensor(const Tensor&, const Tensor&, MaybeAxis, int64_t, int64_t, bool)>("hat::lsq_fake_quant");
  return op;
}

const auto& lsq_backward_op() {
  static auto op = find<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, MaybeAxis, int64_t,
                                                   int64_t, bool, double)>("hat::lsq_fake_quant_backward");
  return op;
}

const auto& folded_op() {
  static auto op = find<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, double, double,
                                                                           int64_t, int64_t, bool)>(
      "hat::fake_quant_folded");
  return op;
}

Tensor undefined() { return Tensor(); }

class FakeQuantFunction : public torch::autograd::Function<FakeQuantFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale, MaybeAxis axis, int64_t qmin,
                        int64_t qmax, bool half_up) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mask] = fake_quant_op().call(x, scale, axis, qmin, qmax, half_up);
    ctx->save_for_backward({mask});
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list& grads) {  // by reference: grads[0] can move
    auto mask = ctx->get_saved_variables()[0];
    return {masked_grad(std::move(grads[0]), mask), undefined(), undefined(), undefined(), undefined(), undefined()};
  }
};

// Outputs (out, lo, hi, scale): only `out` is differentiable (straight through to the weight).
class FoldedFunction : public torch::autograd::Function<FoldedFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const Tensor& weight, const Tensor& factor, double divisor,
                             double eps, int64_t qmin, int64_t qmax, bool half_up) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mask, lo, hi, scale] = folded_op().call(weight, factor, divisor, eps, qmin, qmax, half_up);
    ctx->save_for_backward({mask});
    ctx->mark_non_differentiable({lo, hi, scale});
    return {out, lo, hi, scale};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list& grads) {
    auto mask = ctx->get_saved_variables()[0];
    return {masked_grad(std::move(grads[0]), mask), undefined(), undefined(), undefined(), undefined(), undefined(),
            undefined()};
  }
};

class LsqFunction : public torch::autograd::Function<LsqFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale, MaybeAxis axis, int64_t qmin,
                        int64_t qmax, bool half_up, double grad_factor) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, scale});
    ctx->saved_data["axis"] = axis.has_value() ? c10::IValue(*axis) : c10::IValue();
    ctx->saved_data["qmin"] = qmin;
    ctx->saved_data["qmax"] = qmax;
    ctx->saved_data["half_up"] = half_up;
    ctx->saved_data["grad_factor"] = grad_factor;
    return lsq_op().call(x, scale, axis, qmin, qmax, half_up);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    auto axis_value = ctx->saved_data["axis"];
    MaybeAxis axis = axis_value.isNone() ? std::nullopt : MaybeAxis(axis_value.toInt());
    auto [dx, dscale] = lsq_backward_op().call(grads[0].contiguous(), saved[0], saved[1], axis,
                                               ctx->saved_data["qmin"].toInt(), ctx->saved_data["qmax"].toInt(),
                                               ctx->saved_data["half_up"].toBool(),
                                               ctx->saved_data["grad_factor"].toDouble());
    return {dx, dscale, undefined(), undefined(), undefined(), undefined(), undefined()};
  }
};

Tensor fake_quant_autograd(const Tensor& x, const Tensor& scale, MaybeAxis axis, int64_t qmin, int64_t qmax,
                           bool half_up) {
  return FakeQuantFunction::apply(x, scale, axis, qmin, qmax, half_up);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fake_quant_folded_autograd(const Tensor& weight, const Tensor& factor,
                                                                      double divisor, double eps, int64_t qmin,
                                                                      int64_t qmax, bool half_up) {
  auto outs = FoldedFunction::apply(weight, factor, divisor, eps, qmin, qmax, half_up);
  return {outs[0], outs[1], outs[2], outs[3]};
}

Tensor lsq_fake_quant_autograd(const Tensor& x, const Tensor& scale, MaybeAxis axis, int64_t qmin, int64_t qmax,
                               bool half_up, double grad_factor) {
  return LsqFunction::apply(x, scale, axis, qmin, qmax, half_up, grad_factor);
}

Tensor fake_quant_plain(const Tensor& x, const Tensor& scale, MaybeAxis axis, int64_t qmin, int64_t qmax,
                        bool half_up) {
  return std::get<0>(fake_quant_op().call(x, scale, axis, qmin, qmax, half_up));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fake_quant_folded_plain(const Tensor& weight, const Tensor& factor,
                                                                   double divisor, double eps, int64_t qmin,
                                                                   int64_t qmax, bool half_up) {
  auto [out, mask, lo, hi, scale] = folded_op().call(weight, factor, divisor, eps, qmin, qmax, half_up);
  return {out, lo, hi, scale};
}

Tensor lsq_fake_quant_plain(const Tensor& x, const Tensor& scale, MaybeAxis axis, int64_t qmin, int64_t qmax,
                            bool half_up, double grad_factor) {
  return lsq_op().call(x, scale, axis, qmin, qmax, half_up);
}

}  // namespace

TORCH_LIBRARY_IMPL(hat, Autograd, m) {
  m.impl("fake_quant_autograd", &fake_quant_autograd);
  m.impl("lsq_fake_quant_autograd", &lsq_fake_quant_autograd);
  m.impl("fake_quant_folded_autograd", &fake_quant_folded_autograd);
}

TORCH_LIBRARY_IMPL(hat, CompositeExplicitAutograd, m) {
  m.impl("fake_quant_autograd", &fake_quant_plain);
  m.impl("lsq_fake_quant_autograd", &lsq_fake_quant_plain);
  m.impl("fake_quant_folded_autograd", &fake_quant_folded_plain);
}

}  // namespace hat
