// CUDA implementation of fused_trim::trimmed_ce_fwd / trimmed_ce_bwd (schemas and autograd in
// ops.cpp). Built only where torch has CUDA and nvcc is present; CI compiles it with
// `nvcc -c` against torch's headers on CPU-only machines (tests/test_native.py).
//
// Forward, two launches on the current stream, no host synchronisation:
//   1. ce_forward_kernel: a group of G threads per row (with_group_size: 4 for C <= 16, 8 for C <= 32,
//      32 up to C = 2048, else 256) reads the row once with an online softmax (float32 accumulation,
//      float64 for double), and writes the per-row loss (accumulation type and input dtype) and
//      logsumexp. int64 offsets throughout. A few classes take sub-warp groups: with one warp per
//      row, ten classes would leave 22 lanes idle and spend the row's time in five shuffle steps.
//   2. select_kernel: one block counts n, derives k, finds the k-th key by a radix select over
//      8-bit digits of the monotone integer keys (trimmed_ce_common.h), keeps `key > T` plus the
//      first ties in index order (a block-wide running count), and writes the kept mask, k, the
//      threshold, the reduced loss and the per-row backward scale. With a score_offset the keys
//      are those of loss - offset (accumulation type), read where the loss is read.
// Backward: kept rows recompute softmax from the saved logsumexp (true-class term in the
// accumulation type before rounding); the other rows are written with zeros, never read.
// logit_softcap (c > 0; 0: off): every logit z is read as c tanh(z / c) and the gradient is
// multiplied by 1 - tanh^2(z / c) (a template flag: the plain kernels are unchanged); z_loss
// (0: off) adds z_loss * lse^2 to each loss and 2 z_loss lse p_c to its gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "trimmed_ce_common.h"

namespace fused_trim {
namespace {

constexpr int kThreads = 256;
constexpr int kSelectThreads = 1024;

template <typename acc_t>
__device__ __forceinline__ acc_t dev_exp(acc_t v) {
  return exp(v);
}
template <>
__device__ __forceinline__ float dev_exp<float>(float v) {
  return expf(v);
}

template <typename acc_t>
__device__ __forceinline__ acc_t dev_log(acc_t v) {
  return log(v);
}
template <>
__device__ __forceinline__ float dev_log<float>(float v) {
  return logf(v);
}

template <typename acc_t>
__device__ __forceinline__ acc_t dev_tanh(acc_t v) {
  return tanh(v);
}
template <>
__device__ __forceinline__ float dev_tanh<float>(float v) {
  return tanhf(v);
}

// The capped logit c tanh(z / c) (Cap), or z itself.
template <bool Cap, typename acc_t>
__device__ __forceinline__ acc_t capped(acc_t z, acc_t c) {
  if constexpr (Cap) {
    return c * dev_tanh(z / c);
  } else {
    return z;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// The online-softmax state (MaxSum, ms_add, ms_merge) is in trimmed_ce_common.h.

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

// Reduction over a group of G threads: G <= 32 lanes of one warp (aligned, so an xor offset below
// G stays inside the group; every lane of the warp must call it), or G = kThreads: the whole block.
template <int G, typename acc_t>
__device__ __forceinline__ void group_reduce(MaxSum<acc_t>& ms, acc_t& sx) {
  static_assert(G == kThreads || (G <= 32 && (G & (G - 1)) == 0),
                "a group is a power-of-two part of a warp, or the whole block");
  for (int off = (G < 32 ? G : 32) / 2; off > 0; off >>= 1) {
    MaxSum<acc_t> o{shfl_xor(ms.m, off), shfl_xor(ms.s, off)};
    ms = ms_merge(ms, o);
    sx += shfl_xor(sx, off);
  }
  if constexpr (G > 32) {
    __shared__ acc_t sm_m[G / 32], sm_s[G / 32], sm_x[G / 32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      sm_m[warp] = ms.m;
      sm_s[warp] = ms.s;
      sm_x[warp] = sx;
    }
    __syncthreads();
    ms = {sm_m[0], sm_s[0]};
    sx = sm_x[0];
    for (int w = 1; w < G / 32; ++w) {
      ms = ms_merge(ms, MaxSum<acc_t>{sm_m[w], sm_s[w]});
      sx += sm_x[w];
    }
  }
}

template <typename scalar_t, typename acc_t, int G, bool Cap>
__global__ void ce_forward_kernel(const scalar_t* __restrict__ x, int64_t row_stride, int64_t M,
                                  int64_t C, const int64_t* __restrict__ target,
                                  int64_t ignore_index, const acc_t* __restrict__ w,
                                  const acc_t* __restrict__ w_total_ptr, acc_t ls, acc_t cap, acc_t zl,
                                  acc_t* __restrict__ loss_acc, acc_t* __restrict__ lse_out) {
  constexpr int rows_per_block = kThreads / G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / G;
  const int lane = threadIdx.x % G;
  // (a whole-block group must not return early: it synchronises inside group_reduce)
  const bool active = row < M;
  const int64_t y = active ? target[row] : ignore_index;
  // A class index outside [0, C) that is not ignore_index (the public API asserts against it
  // asynchronously) is never read through: its loss is NaN.
  const bool in_range = y >= 0 && y < C;
  const bool valid = active && y != ignore_index && in_range;
  const scalar_t* xr = x + (active ? row : 0) * row_stride;
  const bool smooth = ls > acc_t(0);
  const acc_t first = valid ? capped<Cap>(static_cast<acc_t>(xr[0]), cap) : acc_t(0);
  const acc_t ref = isfinite(first) ? first : acc_t(0);
  MaxSum<acc_t> ms{-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
  acc_t sx = 0;
  if (valid) {
    for (int64_t c = lane; c < C; c += G) {
      const acc_t v = capped<Cap>(static_cast<acc_t>(xr[c]), cap);
      ms_add(ms, v);
      if (smooth) sx += (w == nullptr ? acc_t(1) : w[c]) * (v - ref);
    }
  }
  group_reduce<G, acc_t>(ms, sx);  // every thread of the group takes part
  if (!valid || lane != 0) {
    if (active && lane == 0) {
      const acc_t v = (y == ignore_index) ? acc_t(0) : quiet_nan<acc_t>();
      loss_acc[row] = v;
      lse_out[row] = v;
    }
    return;
  }
  const acc_t log_s = isfinite(ms.m) ? dev_log(ms.s) : quiet_nan<acc_t>();
  const acc_t x_y = capped<Cap>(static_cast<acc_t>(xr[y]), cap);
  const acc_t w_y = w == nullptr ? acc_t(1) : w[y];
  acc_t loss = w_y * ((ms.m - x_y) + log_s);
  if (smooth) {
    const acc_t w_total = w == nullptr ? static_cast<acc_t>(C) : *w_total_ptr;
    const acc_t smooth_term = ((ms.m - ref) + log_s) * w_total - sx;
    loss = (acc_t(1) - ls) * loss + (ls / static_cast<acc_t>(C)) * smooth_term;
  }
  const acc_t lse = ms.m + log_s;
  if (zl != acc_t(0)) loss += zl * lse * lse;
  loss_acc[row] = loss;
  lse_out[row] = lse;
}

// ---- selection ------------------------------------------------------------------------------

template <typename T>
__device__ T block_sum(T v, T* scratch) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
  for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) total += scratch[i];
  __syncthreads();
  return total;
}

// Exclusive prefix sum of one int per thread over the block; returns the block total too.
__device__ int block_exclusive_scan(int v, int* scratch, int& total) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int incl = v;
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += o;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  int warp_offset = 0;
  total = 0;
  for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) {
    if (i < warp) warp_offset += scratch[i];
    total += scratch[i];
  }
  __syncthreads();
  return warp_offset + incl - v;
}

// The ranked value of row i: its loss, or loss - offset (score_offset).
template <typename acc_t>
__device__ __forceinline__ acc_t score_at(const acc_t* __restrict__ loss_acc, const acc_t* __restrict__ offset,
                                          int64_t i) {
  return offset == nullptr ? loss_acc[i] : loss_acc[i] - offset[i];
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kSelectThreads)
    select_kernel(const acc_t* __restrict__ loss_acc, const int64_t* __restrict__ target, int64_t M,
                  int64_t C, int64_t ignore_index, const acc_t* __restrict__ w, double keep_ratio,
                  const double* __restrict__ keep_ratio_ptr, const int64_t* __restrict__ count_ptr,
                  long long host_count, bool has_threshold, double host_threshold,
                  const double* __restrict__ threshold_ptr, int64_t min_kept, bool easiest, int64_t reduction,
                  bool* __restrict__ kept, int64_t* __restrict__ k_out,
                  scalar_t* __restrict__ threshold, scalar_t* __restrict__ out,
                  acc_t* __restrict__ rowscale, const acc_t* __restrict__ offset) {
  using key_t = typename KeyOf<acc_t>::type;
  constexpr int kBits = sizeof(key_t) * 8;
  // 64-bit counts: a digit's bin may hold more than 2^32 - 1 rows.
  __shared__ unsigned long long hist[256];
  __shared__ double dscratch[kSelectThreads / 32];
  __shared__ int iscratch[kSelectThreads / 32];
  __shared__ long long llscratch[kSelectThreads / 32];
  __shared__ key_t s_prefix;
  __shared__ long long s_remaining;
  __shared__ long long s_thr_idx;
  const int tid = threadIdx.x;

  // n, the samples past the threshold (a threshold rule only) and k.
  // An integer keep_ratio tensor is an exact count (a rank's share of a global selection).
  // (host_count >= 0: a count read on the host from a CPU tensor.)
  const bool exact = count_ptr != nullptr || host_count >= 0;
  const bool by_threshold = has_threshold && !exact;
  const double thr = threshold_ptr != nullptr ? *threshold_ptr : host_threshold;
  long long local_n = 0, local_past = 0;
  for (int64_t i = tid; i < M; i += blockDim.x) {
    const bool valid = target[i] != ignore_index;
    local_n += valid;
    if (by_threshold && valid) local_past += past_threshold(score_at(loss_acc, offset, i), thr, easiest);
  }
  const long long n = block_sum<long long>(local_n, llscratch);
  const long long past = by_threshold ? block_sum<long long>(local_past, llscratch) : 0;
  KeepRule rule;
  rule.ratio = keep_ratio_ptr != nullptr ? *keep_ratio_ptr : keep_ratio;
  rule.count = exact ? (count_ptr != nullptr ? (*count_ptr > 0 ? *count_ptr : 0) : host_count) : -1;
  rule.has_threshold = by_threshold;
  rule.threshold = thr;
  rule.min_kept = min_kept;
  const int64_t k = rule_k(rule, n, past);

  // Radix select of the k-th largest key, 8 bits at a time from the top.
  key_t prefix = 0, mask = 0;
  long long remaining = k;
  if (k > 0) {
    for (int shift = kBits - 8; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += blockDim.x) hist[b] = 0;
      __syncthreads();
      // Every warp runs the same trip count (the loop bound is the block's), so the lanes are
      // converged at the vote: the lanes that share a bin add their count with one atomic (in
      // the first pass losses of one binade share the top byte, and so nearly one bin).
      for (int64_t base = 0; base < M; base += blockDim.x) {
        const int64_t i = base + tid;
        int bin = -1;
        if (i < M && target[i] != ignore_index) {
          const key_t key = KeyOf<acc_t>::get(score_at(loss_acc, offset, i), easiest);
          if ((key & mask) == prefix) bin = static_cast<int>((key >> shift) & 0xFF);
        }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
        const unsigned peers = __match_any_sync(0xffffffffu, bin);
        if (bin >= 0 && (tid % 32) == __ffs(peers) - 1) {
          atomicAdd(&hist[bin], static_cast<unsigned long long>(__popc(peers)));
        }
#else
        if (bin >= 0) atomicAdd(&hist[bin], 1ull);
#endif
      }
      __syncthreads();
      if (tid == 0) {
        long long above = 0;
        int digit = 255;
        for (; digit > 0; --digit) {
          const long long count = static_cast<long long>(hist[digit]);
          if (above + count >= remaining) break;
          above += count;
        }
        s_prefix = prefix | (static_cast<key_t>(digit) << shift);
        s_remaining = remaining - above;
      }
      __syncthreads();
      prefix = s_prefix;
      remaining = s_remaining;
      mask |= static_cast<key_t>(0xFF) << shift;
      __syncthreads();
    }
  }
  // Now prefix = T, the k-th largest key; `remaining` rows with key == T are kept, lowest index
  // first. One ordered pass: a running count of the ties seen so far.
  const key_t T = prefix;
  double local_loss = 0.0, local_w = 0.0;
  long long ties_before = 0;
  if (tid == 0) s_thr_idx = -1;
  __syncthreads();
  for (int64_t base = 0; base < M; base += blockDim.x) {
    const int64_t i = base + tid;
    bool is_kept = false, is_tie = false;
    if (i < M && k > 0 && target[i] != ignore_index) {
      const key_t key = KeyOf<acc_t>::get(score_at(loss_acc, offset, i), easiest);
      is_kept = key > T;
      is_tie = key == T;
    }
    int total = 0;
    const int before = block_exclusive_scan(is_tie ? 1 : 0, iscratch, total);
    if (is_tie) {
      const long long rank = ties_before + before;
      is_kept = rank < remaining;
      if (rank == remaining - 1) s_thr_idx = i;
    }
    ties_before += total;
    if (i < M) {
      kept[i] = is_kept;
      if (is_kept) {
        local_loss += static_cast<double>(loss_acc[i]);
        const int64_t yi = target[i];
        local_w += w == nullptr ? 1.0 : (yi >= 0 && yi < C ? static_cast<double>(w[yi]) : NAN);
      }
    }
  }
  const double sum_loss = block_sum<double>(local_loss, dscratch);
  const double sum_w = block_sum<double>(local_w, dscratch);
  const acc_t scale = reduction == kMean ? static_cast<acc_t>(1.0 / sum_w) : acc_t(1);
  for (int64_t i = tid; i < M; i += blockDim.x) {
    const bool kp = kept[i];
    rowscale[i] = kp ? scale : acc_t(0);
    if (reduction == kNone) out[i] = kp ? static_cast<scalar_t>(loss_acc[i]) : static_cast<scalar_t>(0);
  }
  if (tid == 0) {
    *k_out = k;
    const long long ti = s_thr_idx;
    *threshold =
        ti >= 0 ? static_cast<scalar_t>(score_at(loss_acc, offset, ti)) : static_cast<scalar_t>(quiet_nan<acc_t>());
    if (reduction == kSum) *out = static_cast<scalar_t>(sum_loss);
    if (reduction == kMean) *out = static_cast<scalar_t>(sum_loss / sum_w);
  }
}

// ---- backward -------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, int G, bool Cap>
__global__ void ce_backward_kernel(const scalar_t* __restrict__ x, int64_t row_stride, int64_t M,
                                   int64_t C, const int64_t* __restrict__ target,
                                   const acc_t* __restrict__ w, const acc_t* __restrict__ w_total_ptr,
                                   acc_t ls, acc_t cap, acc_t zl, const acc_t* __restrict__ grad_out,
                                   int64_t grad_stride,
                                   const acc_t* __restrict__ lse, const acc_t* __restrict__ rowscale,
                                   scalar_t* __restrict__ grad) {
  constexpr int rows_per_block = kThreads / G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / G;
  const int lane = threadIdx.x % G;
  if (row >= M) return;
  scalar_t* gr = grad + row * C;
  const acc_t scale = rowscale[row];
  if (scale == acc_t(0)) {
    for (int64_t c = lane; c < C; c += G) gr[c] = static_cast<scalar_t>(0);
    return;
  }
  const acc_t l = lse[row];
  if (l != l) {
    for (int64_t c = lane; c < C; c += G) gr[c] = static_cast<scalar_t>(quiet_nan<acc_t>());
    return;
  }
  const int64_t y = target[row];
  if (y < 0 || y >= C) {  // out-of-range class index (asserted against asynchronously): NaN row
    for (int64_t c = lane; c < C; c += G) gr[c] = static_cast<scalar_t>(quiet_nan<acc_t>());
    return;
  }
  const acc_t coef = grad_out[row * grad_stride] * scale;
  const acc_t w_y = w == nullptr ? acc_t(1) : w[y];
  const acc_t w_total = w == nullptr ? static_cast<acc_t>(C) : *w_total_ptr;
  acc_t a = coef * ((acc_t(1) - ls) * w_y + ls * w_total / static_cast<acc_t>(C));
  if (zl != acc_t(0)) a += coef * (acc_t(2) * zl * l);
  const acc_t b = coef * ls / static_cast<acc_t>(C);
  const acc_t t_term = coef * (acc_t(1) - ls) * w_y;
  const scalar_t* xr = x + row * row_stride;
  for (int64_t c = lane; c < C; c += G) {
    const acc_t u = capped<Cap>(static_cast<acc_t>(xr[c]), cap);
    const acc_t p = dev_exp(u - l);
    acc_t g = a * p - b * (w == nullptr ? acc_t(1) : w[c]);
    if (c == y) g -= t_term;  // formed in the accumulation type, then rounded once
    if constexpr (Cap) {
      const acc_t t = u / cap;
      g *= acc_t(1) - t * t;  // 0, not NaN, where tanh saturates
    }
    gr[c] = static_cast<scalar_t>(g);
  }
}

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Calls f(std::integral_constant<int, G>{}) with G, the threads per row (the kernels' template
// argument), from the class count: 4 up to 16 classes, 8 up to 32, a warp up to 2048, else the block.
template <typename F>
void with_group_size(int64_t C, F&& f) {
  if (C <= 16) {
    f(std::integral_constant<int, 4>{});
  } else if (C <= 32) {
    f(std::integral_constant<int, 8>{});
  } else if (C <= 2048) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, kThreads>{});
  }
}

unsigned int grid_for(int64_t M, int G) {
  const int64_t rows_per_block = kThreads / G;
  const int64_t blocks = (M + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fused_trim: too many rows: ", M);
  return static_cast<unsigned int>(blocks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
trimmed_ce_fwd_cuda(const at::Tensor& input_, const at::Tensor& target_,
                    const std::optional<at::Tensor>& weight_, double keep_ratio,
                    const std::optional<at::Tensor>& keep_ratio_t, bool easiest,
                    int64_t ignore_index, double label_smoothing, int64_t reduction,
                    const std::optional<at::Tensor>& score_offset_, const std::optional<at::Tensor>& keep_threshold,
                    int64_t min_kept, double logit_softcap, double z_loss) {
  TORCH_CHECK(input_.dim() == 2, "fused_trim: input must be (M, C), got ", input_.sizes());
  TORCH_CHECK(target_.dim() == 1 && target_.size(0) == input_.size(0),
              "fused_trim: target must be (M,), got ", target_.sizes());
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fused_trim: bad reduction code ", reduction);
  c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.stride(1) == 1 ? input_ : input_.contiguous();
  const at::Tensor target = target_.to(at::kLong).contiguous();
  const int64_t M = input.size(0), C = input.size(1);
  const auto acc_st = acc_type_of(input.scalar_type());
  const at::Tensor weight =
      weight_.has_value() && weight_->defined() ? weight_->to(acc_st).contiguous() : at::Tensor();
  const at::Tensor w_total = weight.defined() ? weight.sum() : at::Tensor();
  // keep_ratio_t: a 0-dim float tensor (a ratio) or an integer one (an exact count). On the
  // device it is read by the select kernel; on the CPU it is read here, on the host: copying it
  // to the device would be a synchronising copy from pageable memory (illegal in graph capture).
  const bool has_ratio_t = keep_ratio_t.has_value() && keep_ratio_t->defined();
  const bool exact_count = has_ratio_t && !at::isFloatingType(keep_ratio_t->scalar_type());
  const bool ratio_on_host = has_ratio_t && keep_ratio_t->is_cpu();
  long long host_count = -1;
  if (ratio_on_host && exact_count) host_count = std::max<long long>(0, keep_ratio_t->item<int64_t>());
  if (ratio_on_host && !exact_count) keep_ratio = keep_ratio_t->item<double>();
  const at::Tensor ratio_t = has_ratio_t && !exact_count && !ratio_on_host
                                 ? keep_ratio_t->to(input.device(), at::kDouble).contiguous()
                                 : at::Tensor();
  const at::Tensor count_t = exact_count && !ratio_on_host
                                 ? keep_ratio_t->to(input.device(), at::kLong).contiguous()
                                 : at::Tensor();
  // keep_threshold: read on the host from a CPU tensor (no copy), by the select kernel on the device.
  const bool has_threshold = keep_threshold.has_value() && keep_threshold->defined();
  const bool threshold_on_host = has_threshold && keep_threshold->is_cpu();
  const double host_threshold = threshold_on_host ? keep_threshold->item<double>() : 0.0;
  const at::Tensor threshold_t = has_threshold && !threshold_on_host
                                     ? keep_threshold->to(input.device(), at::kDouble).contiguous()
                                     : at::Tensor();
  // score_offset in the accumulation type on the device (a conversion kernel only for another dtype).
  const at::Tensor score_offset = score_offset_.has_value() && score_offset_->defined()
                                      ? score_offset_->to(input.device(), acc_st).contiguous()
                                      : at::Tensor();
  TORCH_CHECK(!score_offset.defined() || score_offset.numel() == M, "fused_trim: score_offset must have ", M,
              " values, got ", score_offset.numel());
  auto acc_opts = input.options().dtype(acc_st);
  at::Tensor kept = at::empty({M}, input.options().dtype(at::kBool));
  at::Tensor k_t = at::empty({}, input.options().dtype(at::kLong));
  at::Tensor threshold = at::empty({}, input.options());
  at::Tensor loss_acc = at::empty({M}, acc_opts);
  at::Tensor lse = at::empty({M}, acc_opts);
  at::Tensor rowscale = at::empty({M}, acc_opts);
  at::Tensor out = reduction == kNone ? at::empty({M}, input.options()) : at::empty({}, input.options());
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "trimmed_ce_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t* wt = w_total.defined() ? w_total.const_data_ptr<acc_t>() : nullptr;
    const acc_t ls = static_cast<acc_t>(label_smoothing);
    const acc_t cap = static_cast<acc_t>(logit_softcap), zl = static_cast<acc_t>(z_loss);
    auto launch = [&](auto cap_tag) {
      constexpr bool Cap = decltype(cap_tag)::value;
      with_group_size(C, [&](auto g_tag) {
        constexpr int G = decltype(g_tag)::value;
        ce_forward_kernel<scalar_t, acc_t, G, Cap><<<grid_for(M, G), kThreads, 0, stream>>>(
            input.const_data_ptr<scalar_t>(), input.stride(0), M, C,
            target.const_data_ptr<int64_t>(), ignore_index, w, wt, ls, cap, zl,
            loss_acc.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>());
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (M > 0) {
      if (cap > acc_t(0)) {
        launch(std::true_type{});
      } else {
        launch(std::false_type{});
      }
    }
    select_kernel<scalar_t, acc_t><<<1, kSelectThreads, 0, stream>>>(
        loss_acc.const_data_ptr<acc_t>(), target.const_data_ptr<int64_t>(), M, C, ignore_index, w,
        keep_ratio, ratio_t.defined() ? ratio_t.const_data_ptr<double>() : nullptr,
        count_t.defined() ? count_t.const_data_ptr<int64_t>() : nullptr, host_count, has_threshold,
        host_threshold, threshold_t.defined() ? threshold_t.const_data_ptr<double>() : nullptr,
        std::max<int64_t>(0, min_kept), easiest,
        reduction, kept.mutable_data_ptr<bool>(), k_t.mutable_data_ptr<int64_t>(),
        threshold.mutable_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        rowscale.mutable_data_ptr<acc_t>(),
        score_offset.defined() ? score_offset.const_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, loss_acc, kept, k_t, threshold, lse, rowscale};
}

at::Tensor trimmed_ce_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input_,
                               const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
                               const at::Tensor& lse_t, const at::Tensor& rowscale_t,
                               int64_t ignore_index, double label_smoothing, double logit_softcap,
                               double z_loss) {
  c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.stride(1) == 1 ? input_ : input_.contiguous();
  const at::Tensor target = target_.to(at::kLong).contiguous();
  const int64_t M = input.size(0), C = input.size(1);
  const auto acc_st = acc_type_of(input.scalar_type());
  const at::Tensor weight =
      weight_.has_value() && weight_->defined() ? weight_->to(acc_st).contiguous() : at::Tensor();
  const at::Tensor w_total = weight.defined() ? weight.sum() : at::Tensor();
  const at::Tensor g = grad_out.to(acc_st).contiguous();
  const int64_t g_stride = g.dim() == 1 ? 1 : 0;
  const at::Tensor lse = lse_t.to(acc_st).contiguous();
  const at::Tensor rs = rowscale_t.to(acc_st).contiguous();
  at::Tensor grad = at::empty({M, C}, input.options());
  if (M == 0) return grad;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "trimmed_ce_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t* wt = w_total.defined() ? w_total.const_data_ptr<acc_t>() : nullptr;
    const acc_t ls = static_cast<acc_t>(label_smoothing);
    const acc_t cap = static_cast<acc_t>(logit_softcap), zl = static_cast<acc_t>(z_loss);
    auto launch = [&](auto cap_tag) {
      constexpr bool Cap = decltype(cap_tag)::value;
      with_group_size(C, [&](auto g_tag) {
        constexpr int G = decltype(g_tag)::value;
        ce_backward_kernel<scalar_t, acc_t, G, Cap><<<grid_for(M, G), kThreads, 0, stream>>>(
            input.const_data_ptr<scalar_t>(), input.stride(0), M, C, target.const_data_ptr<int64_t>(),
            w, wt, ls, cap, zl, g.const_data_ptr<acc_t>(), g_stride, lse.const_data_ptr<acc_t>(),
            rs.const_data_ptr<acc_t>(), grad.mutable_data_ptr<scalar_t>());
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (cap > acc_t(0)) {
      launch(std::true_type{});
    } else {
      launch(std::false_type{});
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_trim, CUDA, m) {
  m.impl("trimmed_ce_fwd", &trimmed_ce_fwd_cuda);
  m.impl("trimmed_ce_bwd", &trimmed_ce_bwd_cuda);
}

}  // namespace fused_trim
