// The fused_trim op library: schemas (TORCH_LIBRARY) and the autograd formula of
// fused_trim::trimmed_ce_fwd for every device. The device kernels register themselves:
// trimmed_ce_cpu.cpp (CPU), trimmed_ce_cuda.cu (CUDA).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <tuple>

#include "cpu/tensors.h"

namespace fused_trim {
namespace {

using FwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using FwdSig = FwdOut(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double,
                      const std::optional<at::Tensor>&, bool, int64_t, double, int64_t,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, double,
                      double);
using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t,
                          double, double, double);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fused_trim::trimmed_ce_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fused_trim::trimmed_ce_bwd", "").typed<BwdSig>();
  return op;
}

constexpr const char* kNoDoubleBackward =
    "double backward of trimmed_cross_entropy is not supported; use backend='reference'";

// Autograd (all devices): the selection is a constant; only `out` is differentiable, and the
// backward op gets the saved logsumexp and per-row scale (0 outside the kept set). A hand-written
// node, as ATen's generated ones (a torch::autograd::Function costs several microseconds more
// per call: argument extraction, a context with a string-keyed map, seven outputs wrapped).
// The backward is not itself differentiable: under create_graph=True the gradient it returns
// carries an Error node, so a first-order gradient still works (a gradient penalty on other
// parts of a model) and differentiating this gradient raises kNoDoubleBackward.
struct TrimmedCEBackward final : public torch::autograd::Node {
  torch::autograd::SavedVariable input_, target_, weight_, lse_, rowscale_;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double logit_softcap = 0.0, z_loss = 0.0;

  std::string name() const override { return "TrimmedCEBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    target_.reset_data();
    weight_.reset_data();
    lse_.reset_data();
    rowscale_.reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor input = input_.unpack();
    const at::Tensor rowscale = rowscale_.unpack();
    at::Tensor grad_input;
    if (task_should_compute_output(0)) {
      const at::Tensor w = weight_.unpack();
      std::optional<at::Tensor> weight;
      if (w.defined()) weight = w;
      at::Tensor grad_out = grads[0];
      if (!grad_out.defined()) grad_out = at::zeros_like(rowscale.select(0, 0).to(input.scalar_type()));
      {
        at::AutoDispatchBelowADInplaceOrView guard;  // the backward op has no autograd formula
        grad_input = bwd_op().call(grad_out, input, target_.unpack(), weight, lse_.unpack(), rowscale,
                                   ignore_index, label_smoothing, logit_softcap, z_loss);
      }
      if (at::GradMode::is_enabled()) {  // create_graph=True: the result must not pass for differentiable
        auto err = c10::make_intrusive<torch::autograd::Error>(kNoDoubleBackward,
                                                            torch::autograd::collect_next_edges(input, grad_out));
        torch::autograd::set_history(grad_input, err);
      }
    }
    return {grad_input};
  }
};

FwdOut trimmed_ce_fwd_autograd(const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, double keep_ratio,
                               const std::optional<at::Tensor>& keep_ratio_t, bool easiest,
                               int64_t ignore_index, double label_smoothing, int64_t reduction,
                               const std::optional<at::Tensor>& score_offset,
                               const std::optional<at::Tensor>& keep_threshold, int64_t min_kept,
                               double logit_softcap, double z_loss) {
  FwdOut res;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    res = fwd_op().call(input, target, weight, keep_ratio, keep_ratio_t, easiest, ignore_index,
                        label_smoothing, reduction, score_offset, keep_threshold, min_kept, logit_softcap, z_loss);
  }
  // No gradient to record (evaluation, no_grad, a detached input): the outputs as they are. Only
  // `input` is differentiable (no gradient flows to target, weight, keep_ratio or score_offset).
  if (!(at::GradMode::is_enabled() && input.requires_grad())) return res;
  auto node = c10::make_intrusive<TrimmedCEBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  node->input_ = torch::autograd::SavedVariable(input, false);
  node->target_ = torch::autograd::SavedVariable(target, false);
  if (weight.has_value() && weight->defined()) {
    node->weight_ = torch::autograd::SavedVariable(*weight, false);
  }
  node->lse_ = torch::autograd::SavedVariable(std::get<5>(res), false);
  node->rowscale_ = torch::autograd::SavedVariable(std::get<6>(res), false);
  node->ignore_index = ignore_index;
  node->label_smoothing = label_smoothing;
  node->logit_softcap = logit_softcap;
  node->z_loss = z_loss;
  torch::autograd::set_history(std::get<0>(res), node);
  return res;
}

}  // namespace

TORCH_LIBRARY(fused_trim, m) {
  m.def(
      "trimmed_ce_fwd(Tensor input, Tensor target, Tensor? weight, float keep_ratio, "
      "Tensor? keep_ratio_t, bool easiest, int ignore_index, float label_smoothing, int reduction, "
      "Tensor? score_offset=None, Tensor? keep_threshold=None, int min_kept=0, float logit_softcap=0.0, "
      "float z_loss=0.0) -> (Tensor out, Tensor losses, Tensor kept, Tensor k, Tensor threshold, Tensor lse, "
      "Tensor rowscale)");
  m.def(
      "trimmed_ce_bwd(Tensor grad_out, Tensor input, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor rowscale, int ignore_index, float label_smoothing, float logit_softcap=0.0, float z_loss=0.0) "
      "-> Tensor");
  m.def("empty_cache() -> ()", &cpu::empty_cache);
}

TORCH_LIBRARY_IMPL(fused_trim, Autograd, m) {
  m.impl("trimmed_ce_fwd", &trimmed_ce_fwd_autograd);
}

}  // namespace fused_trim
