// fused_trim::trimmed_ce_fwd / trimmed_ce_bwd: the CPU implementation (schemas and autograd:
// ops.cpp).
//
// Input: (M, C) rows, or a spatial (N, C, S) map read in place (M = N * S samples in n * S + s
// order; cpu/ce_spatial.h).
// Forward: one pass over each row's logits (cpu/ce_rows.h; few classes: cpu/ce_small.h, rows
// transposed into vector lanes; rows split over threads with at::parallel_for; a row is read block by block, each block once from memory and re-read from
// L1), giving the per-row loss and logsumexp in float32 (float64 for float64 input). Then the
// exact-k selection (cpu/select.h; on loss - score_offset when an offset is given, which it
// reads in the selection's pass over the keys), the kept mask, the reduced loss, the threshold (the k-th
// loss or score) and a per-row backward scale (0 outside the kept set).
// Backward: kept rows recompute softmax from the saved logsumexp; the other rows are
// zero-filled without reading their logits. Row blocks go to the threads in turn (interleaved_for),
// since the kept rows of a group rule are contiguous runs. The gradient has the input's shape, contiguous.
// logit_softcap (c > 0; 0: off) and z_loss (0: off): the options of cpu/ce_rows.h, passed to every
// kernel (the cap as a template flag: the plain path is unchanged).
//
// This file holds the op's argument handling and the order of the steps; the kernels live in
// cpu/*.h, shared with the other CPU ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "cpu/ce_rows.h"
#include "cpu/ce_small.h"
#include "cpu/ce_spatial.h"
#include "cpu/select.h"
#include "cpu/tensors.h"
#include "cpu/vec.h"
#include "trimmed_ce_common.h"

namespace fused_trim {
namespace {

using namespace fused_trim::cpu;

// Raises the op's ValueError for the first target outside [0, C) that is not ignore_index.
[[noreturn]] void raise_bad_target(const int64_t* t, int64_t M, int64_t C, int64_t ignore_index) {
  int64_t first = 0;
  for (int64_t i = 0; i < M; ++i) {
    if (t[i] != ignore_index && (t[i] < 0 || t[i] >= C)) {
      first = t[i];
      break;
    }
  }
  TORCH_CHECK_VALUE(false, "target holds ", first, ", outside [0, ", C, ") and not ignore_index=", ignore_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
trimmed_ce_fwd_cpu(const at::Tensor& input_, const at::Tensor& target_,
                   const std::optional<at::Tensor>& weight_, double keep_ratio,
                   const std::optional<at::Tensor>& keep_ratio_t, bool easiest,
                   int64_t ignore_index, double label_smoothing, int64_t reduction,
                   const std::optional<at::Tensor>& score_offset_, const std::optional<at::Tensor>& keep_threshold,
                   int64_t min_kept, double logit_softcap, double z_loss) {
  // (M, C) rows, or the spatial layout (N, C, S): M = N * S samples in n * S + s order.
  const bool spatial = input_.dim() == 3;
  TORCH_CHECK(input_.dim() == 2 || spatial, "fused_trim: input must be (M, C) or (N, C, S), got ",
              input_.sizes());
  const int64_t M = spatial ? input_.size(0) * input_.size(2) : input_.size(0);
  TORCH_CHECK(target_.dim() == 1 && target_.size(0) == M, "fused_trim: target must be (", M, ",), got ",
              target_.sizes());
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fused_trim: bad reduction code ", reduction);
  const at::Tensor input = unit_stride_last(input_);
  const at::Tensor target = as_contiguous(target_, at::kLong);
  const int64_t C = input.size(1);
  const int64_t row_stride = input.stride(0);
  const auto acc_st = acc_type_of(input.scalar_type());
  const at::Tensor weight =
      weight_.has_value() && weight_->defined() ? as_contiguous(*weight_, acc_st) : at::Tensor();
  // keep_ratio_t: a 0-dim float tensor (a ratio), or an integer one: an exact count (a rank's
  // share of a global selection, see fused_trim/distributed.py).
  // keep_threshold (a 0-dim tensor, or none): keep the samples past it, at least min_kept.
  const bool has_ratio_t = keep_ratio_t.has_value() && keep_ratio_t->defined();
  const bool exact_count = has_ratio_t && !at::isFloatingType(keep_ratio_t->scalar_type());
  KeepRule rule;
  rule.count = exact_count ? std::max<int64_t>(0, keep_ratio_t->item<int64_t>()) : -1;
  rule.ratio = has_ratio_t && !exact_count ? keep_ratio_t->item<double>() : keep_ratio;
  rule.has_threshold = keep_threshold.has_value() && keep_threshold->defined();
  rule.threshold = rule.has_threshold ? keep_threshold->item<double>() : 0.0;
  rule.min_kept = std::max<int64_t>(0, min_kept);
  // score_offset: rank loss - offset (in the accumulation type) instead of the loss.
  const at::Tensor score_offset =
      score_offset_.has_value() && score_offset_->defined() ? as_contiguous(*score_offset_, acc_st) : at::Tensor();
  TORCH_CHECK(!score_offset.defined() || score_offset.numel() == M, "fused_trim: score_offset must have ", M,
              " values, got ", score_offset.numel());

  // The CPU allocator directly (at::detail::empty_cpu), not at::empty through the dispatcher:
  // seven outputs, and at (256, 100) each dispatcher round trip costs about as much as a row.
  const at::ScalarType st = input.scalar_type();
  auto empty = [](at::IntArrayRef sizes, at::ScalarType dtype) -> at::Tensor {
    return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, std::nullopt);
  };
  at::Tensor losses = empty({M}, acc_st);  // the ranking's own values: fp32 (fp64) for every input
  at::Tensor kept = empty({M}, at::kBool);
  at::Tensor k_t = empty({}, at::kLong);
  at::Tensor threshold = empty({}, st);
  at::Tensor lse_t = empty({M}, acc_st);
  at::Tensor rowscale = empty({M}, acc_st);
  at::Tensor out = reduction == kNone ? empty({M}, st) : empty({}, st);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "trimmed_ce_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t w_total = w == nullptr ? static_cast<acc_t>(C) : weight_total<acc_t>(w, C);
    const acc_t ls = static_cast<acc_t>(label_smoothing);
    const acc_t cap = static_cast<acc_t>(logit_softcap), zl = static_cast<acc_t>(z_loss);
    acc_t* loss_acc = losses.mutable_data_ptr<acc_t>();  // per-row losses in the accumulation type
    acc_t* lse = lse_t.mutable_data_ptr<acc_t>();
    std::atomic<bool> bad_target{false};

    if (spatial) {
      spatial_forward<scalar_t, acc_t>(x, input.size(0), C, input.size(2), input.stride(0), input.stride(1), t,
                                       ignore_index, w, w_total, ls, cap, zl, loss_acc, lse, bad_target);
    } else if (C <= kSmallC) {
      small_c_forward_parallel<scalar_t, acc_t>(x, row_stride, M, C, t, ignore_index, w, w_total, ls, cap, zl,
                                                loss_acc, lse, bad_target);
    } else {
      rows_forward_parallel<scalar_t, acc_t>(x, row_stride, M, C, t, ignore_index, w, w_total, ls, cap, zl, loss_acc,
                                             lse, bad_target);
    }
    if (bad_target.load()) raise_bad_target(t, M, C, ignore_index);  // (the public API validates first)

    const acc_t* offset = score_offset.defined() ? score_offset.const_data_ptr<acc_t>() : nullptr;
    const Selection sel =
        select_reduce<scalar_t, acc_t>(loss_acc, t, ignore_index, M, easiest, rule, offset, w, reduction,
                                       out.mutable_data_ptr<scalar_t>(), kept.mutable_data_ptr<bool>(),
                                       rowscale.mutable_data_ptr<acc_t>());
    *k_t.mutable_data_ptr<int64_t>() = sel.k;
    *threshold.mutable_data_ptr<scalar_t>() =
        sel.thr_idx >= 0 ? static_cast<scalar_t>(score_of(loss_acc, offset, sel.thr_idx))
                         : static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
  });
  return {out, losses, kept, k_t, threshold, lse_t, rowscale};
}

at::Tensor trimmed_ce_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input_,
                              const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
                              const at::Tensor& lse_t, const at::Tensor& rowscale_t,
                              int64_t ignore_index, double label_smoothing, double logit_softcap,
                              double z_loss) {
  TORCH_CHECK(input_.dim() == 2 || input_.dim() == 3, "fused_trim: input must be (M, C) or (N, C, S), got ",
              input_.sizes());
  const at::Tensor input = unit_stride_last(input_);
  const at::Tensor target = as_contiguous(target_, at::kLong);
  const int64_t M = input.size(0), C = input.size(1);
  const int64_t row_stride = input.stride(0);
  const auto acc_st = acc_type_of(input.scalar_type());
  const at::Tensor weight =
      weight_.has_value() && weight_->defined() ? as_contiguous(*weight_, acc_st) : at::Tensor();
  const bool per_row = grad_out.dim() == 1;
  const at::Tensor g = as_contiguous(grad_out, acc_st);
  const at::Tensor lse_c = as_contiguous(lse_t, acc_st);
  const at::Tensor rs_c = as_contiguous(rowscale_t, acc_st);
  if (input.dim() == 3) {
    return spatial_backward(g, input, target, weight, lse_c, rs_c, ignore_index, label_smoothing, logit_softcap,
                            z_loss);
  }
  at::Tensor grad = empty_large({M, C}, input.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "trimmed_ce_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t w_total = w == nullptr ? static_cast<acc_t>(C) : weight_total<acc_t>(w, C);
    const acc_t ls = static_cast<acc_t>(label_smoothing);
    const acc_t cap = static_cast<acc_t>(logit_softcap), zl = static_cast<acc_t>(z_loss);
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* lse = lse_c.const_data_ptr<acc_t>();
    const acc_t* rs = rs_c.const_data_ptr<acc_t>();
    scalar_t* gr = grad.mutable_data_ptr<scalar_t>();
    if (C <= kSmallC) {
      small_c_backward_parallel<scalar_t, acc_t>(x, row_stride, M, C, t, ignore_index, w, w_total, ls, cap, zl, gp,
                                                 per_row, lse, rs, gr);
      return;
    }

    const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(C, 1));
    const bool stream = static_cast<size_t>(M) * C * sizeof(scalar_t) >= kStreamBytes;
    // The rows [begin, end) of one thread; Cap: the capped logits (an input block per row block).
    auto rows = [&](auto cap_tag, int64_t begin, int64_t end) {
      constexpr bool Cap = decltype(cap_tag)::value;
      alignas(64) acc_t inbuf[std::is_same_v<scalar_t, acc_t> && !Cap ? 1 : kBlock];
      alignas(64) acc_t outbuf[std::is_same_v<scalar_t, acc_t> ? 1 : kBlock];
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* grow = gr + i * C;
        const acc_t scale = rs[i];
        const int64_t y = t[i];
        if (scale == acc_t(0) || y == ignore_index || y < 0 || y >= C) {
          zero_bytes(static_cast<void*>(grow), C * sizeof(scalar_t), stream);
          continue;
        }
        const acc_t coef = (per_row ? gp[i] : gp[0]) * scale;
        row_backward<scalar_t, acc_t, Cap>(x + i * row_stride, grow, C, y, lse[i], coef, w, w_total, ls, cap, zl,
                                           stream, inbuf, outbuf);
      }
      if (stream) stream_fence();
    };
    interleaved_for(M, grain, [&](int64_t begin, int64_t end) {
      if (cap > acc_t(0)) {
        rows(std::true_type{}, begin, end);
      } else {
        rows(std::false_type{}, begin, end);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_trim, CPU, m) {
  m.impl("trimmed_ce_fwd", &trimmed_ce_fwd_cpu);
  m.impl("trimmed_ce_bwd", &trimmed_ce_bwd_cpu);
}

}  // namespace fused_trim
