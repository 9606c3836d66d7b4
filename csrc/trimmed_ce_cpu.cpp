// fused_trim::trimmed_ce_fwd / trimmed_ce_bwd: op schemas and the CPU implementation.
//
// Input: (M, C) rows, or a spatial (N, C, S) map read in place (M = N * S samples in n * S + s
// order; see the "Spatial inputs" section below).
// Forward: one pass over each row's logits (rows split over threads with at::parallel_for; a
// row is read block by block, each block once from memory and re-read from L1), giving the
// per-row loss and logsumexp in float32 (float64 for float64 input). Then the exact-k selection
// (std::nth_element over (key, index) pairs, after a histogram of the keys for many rows), the
// kept mask, the reduced loss, the threshold and a per-row backward scale (0 outside the kept set).
// Backward: kept rows recompute softmax from the saved logsumexp; the other rows are
// zero-filled without reading their logits. The gradient has the input's shape, contiguous.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdlib>

#include "trimmed_ce_common.h"

namespace fused_trim {
namespace {

using at::vec::Vectorized;

// Logits are processed in blocks that stay in L1 between the passes over one block.
constexpr int64_t kBlock = 2048;
// Rows go to threads in chunks of at least this many logits (below it one thread does all);
// 32 KiB of fp32, as ATen's own softmax kernels split their rows.
constexpr int64_t kParallelGrainElements = int64_t(1) << 13;

// exp over a vector: ATen's inline polynomial for float (measured here: the per-row losses stay
// within 2e-7 relative of a float64 computation, as close as F.cross_entropy's float32 ones), and
// SLEEF's 1-ULP exp for double.
template <typename acc_t>
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// Converts n input elements to the accumulation type (a no-op pointer pass for fp32/fp64).
template <typename scalar_t, typename acc_t>
inline const acc_t* load_block(const scalar_t* src, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    using bVec = Vectorized<scalar_t>;
    using fVec = Vectorized<float>;
    int64_t j = 0;
    for (; j + bVec::size() <= n; j += bVec::size()) {
      auto [a, b] = at::vec::convert_to_float<scalar_t>(bVec::loadu(src + j));
      a.store(buf + j);
      b.store(buf + j + fVec::size());
    }
    for (; j < n; ++j) buf[j] = static_cast<float>(src[j]);
    return buf;
  }
}

// Rounds n accumulation-type values to the output type.
template <typename scalar_t, typename acc_t>
inline void store_block(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    using bVec = Vectorized<scalar_t>;
    using fVec = Vectorized<float>;
    int64_t j = 0;
    for (; j + bVec::size() <= n; j += bVec::size()) {
      auto a = fVec::loadu(src + j);
      auto b = fVec::loadu(src + j + fVec::size());
      at::vec::convert_from_float<scalar_t>(a, b).store(dst + j);
    }
    for (; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {  // NaN-propagating
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) { return a + b; }, v);
}

// max over p[0:n], NaN-propagating.
template <typename acc_t>
inline acc_t block_max(const acc_t* p, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec ninf(-std::numeric_limits<acc_t>::infinity());
  Vec m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t j = 0;
  for (; j + 4 * V <= n; j += 4 * V) {
    m0 = at::vec::maximum(m0, Vec::loadu(p + j));
    m1 = at::vec::maximum(m1, Vec::loadu(p + j + V));
    m2 = at::vec::maximum(m2, Vec::loadu(p + j + 2 * V));
    m3 = at::vec::maximum(m3, Vec::loadu(p + j + 3 * V));
  }
  for (; j + V <= n; j += V) m0 = at::vec::maximum(m0, Vec::loadu(p + j));
  if (j < n) m0 = at::vec::maximum(m0, Vec::set(ninf, Vec::loadu(p + j, n - j), n - j));
  return reduce_max<acc_t>(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
}

// sum of exp(p[j] - m) over p[0:n].
template <typename acc_t>
inline acc_t block_sumexp(const acc_t* p, int64_t n, acc_t m) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vm(m);
  Vec s0(0), s1(0), s2(0), s3(0);
  int64_t j = 0;
  for (; j + 4 * V <= n; j += 4 * V) {
    s0 = s0 + vexp(Vec::loadu(p + j) - vm);
    s1 = s1 + vexp(Vec::loadu(p + j + V) - vm);
    s2 = s2 + vexp(Vec::loadu(p + j + 2 * V) - vm);
    s3 = s3 + vexp(Vec::loadu(p + j + 3 * V) - vm);
  }
  for (; j + V <= n; j += V) s0 = s0 + vexp(Vec::loadu(p + j) - vm);
  if (j < n) s0 = s0 + Vec::set(Vec(0), vexp(Vec::loadu(p + j, n - j) - vm), n - j);
  return reduce_sum<acc_t>((s0 + s1) + (s2 + s3));
}

// sum of w[j] * (p[j] - ref) over p[0:n] (w == nullptr: w = 1).
template <typename acc_t>
inline acc_t block_sum_shifted(const acc_t* p, const acc_t* w, int64_t n, acc_t ref) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec vr(ref);
  Vec s0(0), s1(0);
  int64_t j = 0;
  if (w == nullptr) {
    for (; j + 2 * V <= n; j += 2 * V) {
      s0 = s0 + (Vec::loadu(p + j) - vr);
      s1 = s1 + (Vec::loadu(p + j + V) - vr);
    }
    for (; j + V <= n; j += V) s0 = s0 + (Vec::loadu(p + j) - vr);
    if (j < n) s0 = s0 + Vec::set(Vec(0), Vec::loadu(p + j, n - j) - vr, n - j);
  } else {
    for (; j + 2 * V <= n; j += 2 * V) {
      s0 = s0 + Vec::loadu(w + j) * (Vec::loadu(p + j) - vr);
      s1 = s1 + Vec::loadu(w + j + V) * (Vec::loadu(p + j + V) - vr);
    }
    for (; j + V <= n; j += V) s0 = s0 + Vec::loadu(w + j) * (Vec::loadu(p + j) - vr);
    if (j < n) {
      s0 = s0 + Vec::set(Vec(0), Vec::loadu(w + j, n - j) * (Vec::loadu(p + j, n - j) - vr), n - j);
    }
  }
  return reduce_sum<acc_t>(s0 + s1);
}

template <typename acc_t>
struct RowResult {
  acc_t loss;
  acc_t lse;
};

// One sample's loss and logsumexp from its max `m`, `log_s = log(sum_c exp(x_c - m))`, its
// target's logit and weight, and (label smoothing) `sx = sum_c w_c (x_c - ref)`. Every forward
// path (rows, few classes, grouped rows, spatial pixels) ends here.
template <typename acc_t>
inline RowResult<acc_t> finish_sample(acc_t m, acc_t log_s, acc_t x_y, acc_t w_y, acc_t ref, acc_t sx, acc_t ls,
                                      acc_t w_total, int64_t C) {
  // A sample whose max is not finite (a NaN, a +inf, or all -inf) has NaN log-probabilities in
  // torch; the vector exp saturates instead of propagating NaN, so say it explicitly.
  if (!std::isfinite(m)) log_s = std::numeric_limits<acc_t>::quiet_NaN();
  // (m - x_y) + log(s) rather than lse - x_y: no cancellation when p_y is close to 1.
  acc_t loss = w_y * ((m - x_y) + log_s);
  if (ls > 0) {
    const acc_t smooth_term = ((m - ref) + log_s) * w_total - sx;  // -sum_c w_c log p_c
    loss = (acc_t(1) - ls) * loss + (ls / static_cast<acc_t>(C)) * smooth_term;
  }
  return {loss, m + log_s};
}

// Whether sample target `y` is a class to score; an ignored one is not, and one outside [0, C)
// is not either and raises the op's ValueError afterwards (through `bad_target`).
inline bool scored_target(int64_t y, int64_t C, int64_t ignore_index, std::atomic<bool>& bad_target) {
  if (y == ignore_index) return false;
  if (y >= 0 && y < C) return true;
  bad_target.store(true, std::memory_order_relaxed);
  return false;
}

// Loss and logsumexp of one row (one pass over memory, blockwise online max).
template <typename scalar_t, typename acc_t>
__attribute__((flatten)) inline RowResult<acc_t> row_forward(const scalar_t* row, int64_t C, int64_t y, const acc_t* w,
                                    acc_t w_total, acc_t ls, acc_t* buf) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool smooth = ls > 0;
  acc_t m = ninf, s = 0, sx = 0, ref = 0;
  for (int64_t b = 0; b < C; b += kBlock) {
    const int64_t n = std::min(kBlock, C - b);
    const acc_t* p = load_block<scalar_t, acc_t>(row + b, n, buf);
    const acc_t bm = block_max<acc_t>(p, n);
    if (b == 0) {
      ref = std::isfinite(bm) ? bm : acc_t(0);
      m = bm;
    } else if (bm != bm) {
      m = bm;  // NaN propagates to the loss
    } else if (bm > m) {
      s = s * std::exp(m - bm);
      m = bm;
    }
    if (bm != ninf) s += block_sumexp<acc_t>(p, n, m);
    if (smooth) sx += block_sum_shifted<acc_t>(p, w == nullptr ? nullptr : w + b, n, ref);
  }
  return finish_sample<acc_t>(m, std::log(s), static_cast<acc_t>(row[y]), w == nullptr ? acc_t(1) : w[y], ref, sx,
                              ls, w_total, C);
}

// The gradient is the one O(N*C) buffer the op allocates. A fresh multi-hundred-MB allocation is
// backed page by page on first touch (the kernel zeroes every page it hands out), which costs
// more than writing the gradient itself (already at a few MB: glibc hands such blocks back to the
// system when they are freed, so every step faults them in again; (1024, 1000) fp32 fwd+bwd went
// from a median of ~570 to ~340 us). Gradients of 2 MiB and more therefore come from a small cache of
// 2 MiB-aligned blocks with transparent huge pages requested: a block freed by one step (the
// usual `zero_grad(set_to_none=True)`) serves the next step's backward, as the CUDA caching
// allocator does. The cache holds at most kMaxCachedBlocks blocks of memory the process already
// used; FUSED_TRIM_NO_GRAD_CACHE=1 turns it off, and fused_trim::empty_cache() releases it.
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMaxCachedBlocks = 2;

struct GradBlockCache {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> blocks;  // (pointer, size) of free blocks

  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = 0; i < blocks.size(); ++i) {
      if (blocks[i].second == size) {
        void* p = blocks[i].first;
        blocks.erase(blocks.begin() + static_cast<std::ptrdiff_t>(i));
        return p;
      }
    }
    return nullptr;
  }
  void give(void* p, size_t size) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (blocks.size() < kMaxCachedBlocks) {
        blocks.emplace_back(p, size);
        return;
      }
    }
    std::free(p);
  }
  void clear() {
    std::vector<std::pair<void*, size_t>> old;
    {
      std::lock_guard<std::mutex> lock(mu);
      old.swap(blocks);
    }
    for (auto& b : old) std::free(b.first);
  }
};

GradBlockCache& grad_cache() {
  static GradBlockCache* cache = new GradBlockCache();  // never destroyed: deleters may run late
  return *cache;
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] == '1';
}

at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opts) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t nbytes =
      static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  static const bool disabled = env_flag("FUSED_TRIM_NO_GRAD_CACHE");
  if (nbytes >= kHugePage && !disabled) {
    const size_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = grad_cache().take(size);
    if (p == nullptr && posix_memalign(&p, kHugePage, size) == 0) {
      madvise(p, size, MADV_HUGEPAGE);
    }
    if (p != nullptr) {
      return at::from_blob(p, sizes, [size](void* q) { grad_cache().give(q, size); }, opts);
    }
  }
#endif
  return at::detail::empty_cpu(sizes, opts);
}

void empty_cache() {
  grad_cache().clear();
}

// Non-temporal (streaming) stores for gradients much larger than the last-level cache: they
// skip the read-for-ownership of every written line, a third of the backward's memory traffic.
constexpr size_t kStreamBytes = size_t(32) << 20;

template <typename acc_t>
constexpr size_t kVecBytes = sizeof(acc_t) * Vectorized<acc_t>::size();

template <typename acc_t>
inline void store_stream(acc_t* dst, const Vectorized<acc_t>& v) {  // dst aligned to kVecBytes
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    _mm512_stream_ps(dst, v);
  } else {
    _mm512_stream_pd(dst, v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    _mm256_stream_ps(dst, v);
  } else {
    _mm256_stream_pd(dst, v);
  }
#else
  v.store(dst);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

inline void zero_bytes(void* dst, size_t bytes, bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    char* p = static_cast<char*>(dst);
    char* const end = p + bytes;
    while ((reinterpret_cast<uintptr_t>(p) & 63) != 0 && p < end) *p++ = 0;
    const __m256i z = _mm256_setzero_si256();
    for (; p + 64 <= end; p += 64) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), z);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p + 32), z);
    }
    while (p < end) *p++ = 0;
    return;
  }
#endif
  std::memset(dst, 0, bytes);
}

// Few classes (C <= kSmallC): a row is shorter than a vector or two, and the per-row reductions
// would dominate. Instead V rows at a time are transposed into a [C][V] tile, so that every
// vector op works across V rows (max, exp, sum, log), with no horizontal reduction at all.
constexpr int64_t kSmallC = 32;

template <typename scalar_t, typename acc_t>
void small_c_forward(const scalar_t* x, int64_t row_stride, int64_t C, const int64_t* t,
                     int64_t ignore_index, const acc_t* w, acc_t w_total, acc_t ls,
                     int64_t begin, int64_t end, acc_t* loss_out, acc_t* lse_out,
                     std::atomic<bool>& bad_target) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  alignas(64) acc_t tile[kSmallC * V];
  alignas(64) acc_t mv[V], lsv[V], sxv[V];
  const bool smooth = ls > 0;
  for (int64_t i0 = begin; i0 < end; i0 += V) {
    const int64_t rows = std::min(V, end - i0);
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* row = x + (i0 + r) * row_stride;
      for (int64_t c = 0; c < C; ++c) tile[c * V + r] = static_cast<acc_t>(row[c]);
    }
    for (int64_t r = rows; r < V; ++r) {
      for (int64_t c = 0; c < C; ++c) tile[c * V + r] = 0;
    }
    Vec m = Vec::loadu(tile);
    for (int64_t c = 1; c < C; ++c) m = at::vec::maximum(m, Vec::loadu(tile + c * V));
    Vec s(0), sx(0);
    for (int64_t c = 0; c < C; ++c) {
      const Vec d = Vec::loadu(tile + c * V) - m;
      s = s + vexp(d);
      if (smooth) sx = sx + (w == nullptr ? d : d * Vec(w[c]));
    }
    m.store(mv);
    s.log().store(lsv);
    sx.store(sxv);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const int64_t y = t[i];
      if (!scored_target(y, C, ignore_index, bad_target)) {
        loss_out[i] = lse_out[i] = 0;
        continue;
      }
      // (sx was taken relative to the max itself)
      const auto res = finish_sample<acc_t>(mv[r], lsv[r], tile[y * V + r], w == nullptr ? acc_t(1) : w[y], mv[r],
                                            sxv[r], ls, w_total, C);
      loss_out[i] = res.loss;
      lse_out[i] = res.lse;
    }
  }
}

// Rows of one block (C <= kBlock) in fp32/fp64: rows are taken kRowGroup at a time, in phases
// (every row's max, then every row's exp-sum, then one vector log for the group), so that the
// short dependency chains of independent rows overlap (a row at a time, max -> horizontal
// reduction -> exp -> reduction -> log is one long chain that left the core idle at C ~ 100).
// The rows of a group stay in L1 between the phases. Same arithmetic as row_forward.
constexpr int64_t kRowGroup = 16;

template <typename acc_t>
__attribute__((flatten)) void grouped_rows_forward(
    const acc_t* x, int64_t row_stride, int64_t C, const int64_t* t, int64_t ignore_index,
    const acc_t* w, acc_t w_total, acc_t ls, int64_t begin, int64_t end, acc_t* loss_out,
    acc_t* lse_out, std::atomic<bool>& bad_target) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t G = kRowGroup;
  static_assert(G % V == 0, "the group is a whole number of vectors");
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool smooth = ls > 0;
  // Fewer rows per group when they would not stay in L1 (~32 KiB) between the phases.
  const int64_t g_max = std::clamp<int64_t>(int64_t(32768) / (C * int64_t(sizeof(acc_t))), 1, G);
  alignas(64) acc_t mv[G], sv[G], lsv[G], sxv[G];
  int64_t idx[G];
  int64_t i = begin;
  while (i < end) {
    int64_t g = 0;
    for (; i < end && g < g_max; ++i) {
      if (!scored_target(t[i], C, ignore_index, bad_target)) {
        loss_out[i] = lse_out[i] = 0;
        continue;
      }
      idx[g++] = i;
    }
    for (int64_t r = 0; r < g; ++r) mv[r] = block_max<acc_t>(x + idx[r] * row_stride, C);
    for (int64_t r = 0; r < g; ++r) {
      const acc_t* p = x + idx[r] * row_stride;
      const acc_t m = mv[r];
      sv[r] = m != ninf ? block_sumexp<acc_t>(p, C, m) : acc_t(0);
      if (smooth) sxv[r] = block_sum_shifted<acc_t>(p, w, C, std::isfinite(m) ? m : acc_t(0));
    }
    for (int64_t r = g; r < G; ++r) sv[r] = 1;
    for (int64_t r = 0; r < g; r += V) Vec::loadu(sv + r).log().store(lsv + r);
    for (int64_t r = 0; r < g; ++r) {
      const int64_t row = idx[r];
      const int64_t y = t[row];
      const acc_t m = mv[r];
      const auto res = finish_sample<acc_t>(m, lsv[r], x[row * row_stride + y], w == nullptr ? acc_t(1) : w[y],
                                            std::isfinite(m) ? m : acc_t(0), sxv[r], ls, w_total, C);
      loss_out[row] = res.loss;
      lse_out[row] = res.lse;
    }
  }
}

// From this many rows on, the forward's selection starts with a histogram of the ranking keys
// (fp32 and narrower; below it, one nth_element over all the candidates is faster).
constexpr int64_t kRadixSelectMin = int64_t(1) << 15;

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// `t` as a contiguous tensor of dtype `st`, without a dispatcher round trip when it already is
// one (the usual case: at small shapes a no-op `.to().contiguous()` costs as much as a row).
at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType st) {
  if (t.scalar_type() == st && t.is_contiguous()) return t;
  return t.to(st).contiguous();
}

// `t` with a unit-stride last dimension (the CPU kernels' one requirement on the layout).
at::Tensor unit_stride_last(const at::Tensor& t) {
  const int64_t d = t.dim() - 1;
  return t.size(d) <= 1 || t.stride(d) == 1 ? t : t.contiguous();
}

// sum of the class weights, in the accumulation type, without a tensor op and `.item()`.
template <typename acc_t>
acc_t weight_total(const acc_t* w, int64_t C) {
  double s = 0.0;
  for (int64_t c = 0; c < C; ++c) s += static_cast<double>(w[c]);
  return static_cast<acc_t>(s);
}

// ---------------------------------------------------------------------------------------------
// Spatial inputs (N, C, S): a sample is a pixel, its classes S elements apart, neighbouring
// pixels adjacent. The vectors run ACROSS pixels (V pixels per vector, as the small-C tile does
// for rows, but without a transpose: the layout already is one), and the reductions over the C
// classes are plain elementwise vector ops, with no horizontal reduction at all.
//
// Pixels go in blocks of kPixelVecs vectors (64 fp32 pixels), each block's classes in chunks of
// kClassChunk. The first pass over a chunk reads it from memory once, converts it to the
// accumulation type and copies it into a contiguous tile; the second pass (exp-sum) reads the
// tile. Re-reading the input instead would miss L1 (and L2) for power-of-two maps: the C lines at
// one pixel offset are S * elem bytes apart, a multiple of 4 KiB, so they all fall in one cache
// set, and 19 classes > 8 ways. A later chunk that raises the running max rescales the sum
// (online softmax per chunk, one exp per element).
// ---------------------------------------------------------------------------------------------
constexpr int64_t kPixelVecs = 4;
constexpr int64_t kClassChunk = 64;

template <typename acc_t>
constexpr int64_t kPixelBlock = kPixelVecs * Vectorized<acc_t>::size();

// V pixels of one class in the accumulation type; `count` < V pads with zeros.
template <typename scalar_t, typename acc_t, bool full>
inline Vectorized<acc_t> load_px(const scalar_t* p, int64_t count) {
  using Vec = Vectorized<acc_t>;
  if constexpr (full) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p);
    } else {
      Vec out;
      at::vec::load_to_float<scalar_t>(p, out);
      return out;
    }
  } else {
    alignas(64) acc_t tmp[Vec::size()] = {};
    for (int64_t j = 0; j < std::min<int64_t>(count, Vec::size()); ++j) tmp[j] = static_cast<acc_t>(p[j]);
    return Vec::loadu(tmp);
  }
}

// V (or `count` < V) pixels of one class, rounded to the output type.
template <typename scalar_t, typename acc_t, bool full>
inline void store_px(scalar_t* dst, const Vectorized<acc_t>& v, int64_t count) {
  using Vec = Vectorized<acc_t>;
  if constexpr (full) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(dst);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(dst, Vec::size());
    }
  } else {
    alignas(64) acc_t tmp[Vec::size()];
    v.store(tmp);
    for (int64_t j = 0; j < std::min<int64_t>(count, Vec::size()); ++j) dst[j] = static_cast<scalar_t>(tmp[j]);
  }
}

// One block of pixels [s0, s0 + rows) of image n: loss and logsumexp per pixel.
template <typename scalar_t, typename acc_t, bool full>
__attribute__((flatten)) inline void spatial_block_forward(
    const scalar_t* p, int64_t cs, int64_t C, int64_t rows, const int64_t* t, int64_t ignore_index,
    const acc_t* w, acc_t w_total, acc_t ls, acc_t* tile, acc_t* loss_out, acc_t* lse_out,
    std::atomic<bool>& bad_target) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t B = kPixelVecs;
  constexpr int64_t P = kPixelBlock<acc_t>;
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const bool smooth = ls > 0;
  Vec m[B], s[B], sx[B], ref[B];
  int64_t c0 = 0;
  for (; c0 < C; c0 += kClassChunk) {
    const int64_t cn = std::min(kClassChunk, C - c0);
    Vec bm[B];
    for (int64_t v = 0; v < B; ++v) bm[v] = Vec(ninf);
    for (int64_t c = 0; c < cn; ++c) {
      const scalar_t* row = p + (c0 + c) * cs;
      for (int64_t v = 0; v < B; ++v) {
        const Vec xv = load_px<scalar_t, acc_t, full>(row + v * V, rows - v * V);
        xv.store(tile + c * P + v * V);
        bm[v] = at::vec::maximum(bm[v], xv);
      }
    }
    if (c0 == 0) {
      for (int64_t v = 0; v < B; ++v) {
        m[v] = bm[v];
        s[v] = Vec(0);
        sx[v] = Vec(0);
        // The smoothing sum is taken relative to the first chunk's max where that is finite.
        ref[v] = Vec::blendv(Vec(0), bm[v], (bm[v] - bm[v]) == Vec(0));
      }
    } else {
      for (int64_t v = 0; v < B; ++v) {
        const Vec mn = at::vec::maximum(m[v], bm[v]);
        // Lanes whose classes so far were all -inf hold no sum yet (exp(-inf - -inf) is NaN).
        s[v] = Vec::blendv(Vec(0), s[v] * vexp(m[v] - mn), m[v] != Vec(ninf));
        m[v] = mn;
      }
    }
    for (int64_t c = 0; c < cn; ++c) {
      const acc_t* trow = tile + c * P;
      for (int64_t v = 0; v < B; ++v) s[v] = s[v] + vexp(Vec::loadu(trow + v * V) - m[v]);
      if (smooth) {
        const Vec wc(w == nullptr ? acc_t(1) : w[c0 + c]);
        for (int64_t v = 0; v < B; ++v) sx[v] = sx[v] + wc * (Vec::loadu(trow + v * V) - ref[v]);
      }
    }
  }
  const int64_t last_c0 = (C - 1) / kClassChunk * kClassChunk;  // the chunk still in the tile
  alignas(64) acc_t mv[P], lsv[P], sxv[P], refv[P];
  for (int64_t v = 0; v < B; ++v) {
    m[v].store(mv + v * V);
    s[v].log().store(lsv + v * V);
    sx[v].store(sxv + v * V);
    ref[v].store(refv + v * V);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t y = t[r];
    if (!scored_target(y, C, ignore_index, bad_target)) {
      loss_out[r] = lse_out[r] = 0;
      continue;
    }
    const acc_t x_y = y >= last_c0 ? tile[(y - last_c0) * P + r] : static_cast<acc_t>(p[y * cs + r]);
    const auto res =
        finish_sample<acc_t>(mv[r], lsv[r], x_y, w == nullptr ? acc_t(1) : w[y], refv[r], sxv[r], ls, w_total, C);
    loss_out[r] = res.loss;
    lse_out[r] = res.lse;
  }
}

template <typename scalar_t, typename acc_t>
void spatial_forward(const scalar_t* x, int64_t N, int64_t C, int64_t S, int64_t sN, int64_t sC,
                     const int64_t* t, int64_t ignore_index, const acc_t* w, acc_t w_total, acc_t ls,
                     acc_t* loss_out, acc_t* lse_out, std::atomic<bool>& bad_target) {
  constexpr int64_t P = kPixelBlock<acc_t>;
  const int64_t nblk = (S + P - 1) / P;
  const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(C * P, 1));
  at::parallel_for(0, N * nblk, grain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t tile[kClassChunk * P];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / nblk, s0 = (u - n * nblk) * P;
      const int64_t rows = std::min(P, S - s0);
      const scalar_t* p = x + n * sN + s0;
      const int64_t i0 = n * S + s0;
      if (rows == P) {
        spatial_block_forward<scalar_t, acc_t, true>(p, sC, C, rows, t + i0, ignore_index, w, w_total, ls,
                                                     tile, loss_out + i0, lse_out + i0, bad_target);
      } else {
        spatial_block_forward<scalar_t, acc_t, false>(p, sC, C, rows, t + i0, ignore_index, w, w_total, ls,
                                                      tile, loss_out + i0, lse_out + i0, bad_target);
      }
    }
  });
}

// Gradient of one block of pixels: kept pixels recompute softmax from the saved logsumexp; the
// other lanes are masked to exactly 0 (NaN logits there must not leak). `g` is the block's
// class-0 gradient, classes S apart.
template <typename scalar_t, typename acc_t, bool full>
__attribute__((flatten)) inline void spatial_block_backward(
    const scalar_t* p, int64_t cs, scalar_t* g, int64_t gs, int64_t C, int64_t rows, const acc_t* am,
    const acc_t* bm, const acc_t* lm, const acc_t* km, const acc_t* w, bool stream) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t B = kPixelVecs;
  Vec va[B], vb[B], vl[B], mask[B];
  for (int64_t v = 0; v < B; ++v) {
    va[v] = Vec::loadu(am + v * V);
    vb[v] = Vec::loadu(bm + v * V);
    vl[v] = Vec::loadu(lm + v * V);
    mask[v] = Vec::loadu(km + v * V) != Vec(0);
  }
  const bool nt = full && std::is_same_v<scalar_t, acc_t> && stream &&
                  reinterpret_cast<uintptr_t>(g) % kVecBytes<acc_t> == 0 &&
                  (gs * int64_t(sizeof(scalar_t))) % int64_t(kVecBytes<acc_t>) == 0;
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* row = p + c * cs;
    scalar_t* grow = g + c * gs;
    const Vec wc(w == nullptr ? acc_t(1) : w[c]);
    for (int64_t v = 0; v < B; ++v) {
      const Vec xv = load_px<scalar_t, acc_t, full>(row + v * V, rows - v * V);
      const Vec gv = Vec::blendv(Vec(0), vexp(xv - vl[v]) * va[v] - vb[v] * wc, mask[v]);
      if constexpr (full && std::is_same_v<scalar_t, acc_t>) {
        if (nt) {
          store_stream<acc_t>(reinterpret_cast<acc_t*>(grow + v * V), gv);
          continue;
        }
      }
      store_px<scalar_t, acc_t, full>(grow + v * V, gv, rows - v * V);
    }
  }
}

// v where keep is 1, +0 where it is 0 (bitwise: no branch, and a NaN v is dropped too).
template <typename acc_t>
inline acc_t zero_unless(acc_t v, int64_t keep) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  bits_t b;
  std::memcpy(&b, &v, sizeof(b));
  b &= static_cast<bits_t>(-keep);
  std::memcpy(&v, &b, sizeof(b));
  return v;
}

at::Tensor spatial_backward(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& target,
                            const at::Tensor& weight, const at::Tensor& lse_c, const at::Tensor& rs_c,
                            int64_t ignore_index, double label_smoothing) {
  const int64_t N = input.size(0), C = input.size(1), S = input.size(2);
  const int64_t sN = input.stride(0), sC = input.stride(1);
  const bool per_row = grad_out.dim() == 1;
  at::Tensor grad = empty_large({N, C, S}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "trimmed_ce_bwd_spatial", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t P = kPixelBlock<acc_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t w_total = w == nullptr ? static_cast<acc_t>(C) : weight_total<acc_t>(w, C);
    const acc_t ls = static_cast<acc_t>(label_smoothing);
    const acc_t* gp = grad_out.const_data_ptr<acc_t>();
    const acc_t* lse = lse_c.const_data_ptr<acc_t>();
    const acc_t* rs = rs_c.const_data_ptr<acc_t>();
    scalar_t* gr = grad.mutable_data_ptr<scalar_t>();
    const int64_t nblk = (S + P - 1) / P;
    const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(C * P, 1));
    const bool stream = static_cast<size_t>(N) * C * S * sizeof(scalar_t) >= kStreamBytes;
    // d l / d x_c = (1-ls) w_y (p_c - [c==y]) + ls/C (W p_c - w_c), per kept pixel a p_c - b w_c
    // with a = coef ((1-ls) w_y + ls W / C), b = coef ls / C, and the true-class term patched.
    const acc_t one_m_ls = acc_t(1) - ls, ls_wc = ls * w_total / static_cast<acc_t>(C);
    const acc_t ls_c = ls / static_cast<acc_t>(C);
    at::parallel_for(0, N * nblk, grain, [&](int64_t begin, int64_t end) {
      alignas(64) acc_t am[P], bm[P], lm[P], km[P], coefv[P];
      int64_t kept_r[P];
      // Locals, so that the per-pixel loop does not reload them through the captures.
      const int64_t* const tp = t;
      const acc_t* const rsp = rs;
      const acc_t* const lsep = lse;
      const acc_t* const wp = w;
      const acc_t* const gpp = gp;
      const int64_t ign = ignore_index;
      const int64_t g_step = per_row ? 1 : 0;
      for (int64_t u = begin; u < end; ++u) {
        const int64_t n = u / nblk, s0 = (u - n * nblk) * P;
        const int64_t rows = std::min(P, S - s0);
        const int64_t i0 = n * S + s0;
        scalar_t* g = gr + n * C * S + s0;
        int64_t nk = 0;
        // Branch-free: a random half of the pixels is kept, which no predictor guesses.
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          const int64_t y = tp[i];
          const int64_t keep_r = int64_t(rsp[i] != acc_t(0)) & int64_t(y != ign) &
                                 int64_t(static_cast<uint64_t>(y) < static_cast<uint64_t>(C));
          // Masks, not products: a non-kept pixel's upstream gradient may be NaN.
          const acc_t coef = zero_unless(gpp[i * g_step] * rsp[i], keep_r);
          const acc_t w_y = wp == nullptr ? acc_t(1) : wp[y & -keep_r];
          am[r] = coef * (one_m_ls * w_y + ls_wc);
          bm[r] = coef * ls_c;
          lm[r] = zero_unless(lsep[i], keep_r);
          km[r] = static_cast<acc_t>(keep_r);
          coefv[r] = coef;
          kept_r[nk] = r;
          nk += keep_r;
        }
        for (int64_t r = rows; r < P; ++r) am[r] = bm[r] = lm[r] = km[r] = 0;
        if (nk == 0) {  // no kept pixel: zeros, without reading the logits
          for (int64_t c = 0; c < C; ++c) {
            zero_bytes(static_cast<void*>(g + c * S), rows * sizeof(scalar_t), stream);
          }
          continue;
        }
        const scalar_t* p = x + n * sN + s0;
        if (rows == P) {
          spatial_block_backward<scalar_t, acc_t, true>(p, sC, g, S, C, rows, am, bm, lm, km, w, stream);
        } else {
          spatial_block_backward<scalar_t, acc_t, false>(p, sC, g, S, C, rows, am, bm, lm, km, w, stream);
        }
        if (stream) stream_fence();  // the streamed block is in place before it is patched
        for (int64_t j = 0; j < nk; ++j) {
          const int64_t r = kept_r[j];
          const int64_t i = i0 + r;
          const int64_t y = t[i];
          if (lse[i] != lse[i]) {  // a kept pixel with NaN log-probabilities: NaN gradient, as torch
            for (int64_t c = 0; c < C; ++c) {
              g[c * S + r] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
            }
            continue;
          }
          // The true-class term, formed in the accumulation type before rounding.
          const acc_t w_y = w == nullptr ? acc_t(1) : w[y];
          const acc_t p_y = std::exp(static_cast<acc_t>(p[y * sC + r]) - lse[i]);
          g[y * S + r] = static_cast<scalar_t>(am[r] * p_y - bm[r] * w_y - coefv[r] * one_m_ls * w_y);
        }
      }
      if (stream) stream_fence();
    });
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
trimmed_ce_fwd_cpu(const at::Tensor& input_, const at::Tensor& target_,
                   const std::optional<at::Tensor>& weight_, double keep_ratio,
                   const std::optional<at::Tensor>& keep_ratio_t, bool easiest,
                   int64_t ignore_index, double label_smoothing, int64_t reduction) {
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
  const bool has_ratio_t = keep_ratio_t.has_value() && keep_ratio_t->defined();
  const bool exact_count = has_ratio_t && !at::isFloatingType(keep_ratio_t->scalar_type());
  const int64_t count = exact_count ? std::max<int64_t>(0, keep_ratio_t->item<int64_t>()) : 0;
  const double r = has_ratio_t && !exact_count ? keep_ratio_t->item<double>() : keep_ratio;

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
    using key_t = typename KeyOf<acc_t>::type;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t w_total = w == nullptr ? static_cast<acc_t>(C) : weight_total<acc_t>(w, C);
    const acc_t ls = static_cast<acc_t>(label_smoothing);
    acc_t* loss_acc = losses.mutable_data_ptr<acc_t>();  // per-row losses in the accumulation type
    acc_t* lse = lse_t.mutable_data_ptr<acc_t>();
    std::atomic<bool> bad_target{false};

    const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(C, 1));
    if (spatial) {
      spatial_forward<scalar_t, acc_t>(x, input.size(0), C, input.size(2), input.stride(0), input.stride(1), t,
                                       ignore_index, w, w_total, ls, loss_acc, lse, bad_target);
    } else if (C <= kSmallC) {
      constexpr int64_t V = Vectorized<acc_t>::size();
      const int64_t small_grain = (grain + V - 1) / V * V;
      at::parallel_for(0, (M + V - 1) / V, (small_grain + V - 1) / V, [&](int64_t gb, int64_t ge) {
        small_c_forward<scalar_t, acc_t>(x, row_stride, C, t, ignore_index, w, w_total, ls, gb * V,
                                         std::min(M, ge * V), loss_acc, lse, bad_target);
      });
    } else if (std::is_same_v<scalar_t, acc_t> && C <= kBlock) {
      at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
        grouped_rows_forward<acc_t>(reinterpret_cast<const acc_t*>(x), row_stride, C, t, ignore_index,
                                    w, w_total, ls, begin, end, loss_acc, lse, bad_target);
      });
    } else
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
      alignas(64) acc_t buf[std::is_same_v<scalar_t, acc_t> ? 1 : kBlock];
      for (int64_t i = begin; i < end; ++i) {
        const int64_t y = t[i];
        if (y == ignore_index) {
          loss_acc[i] = 0;
          lse[i] = 0;
          continue;
        }
        if (y < 0 || y >= C) {
          bad_target.store(true, std::memory_order_relaxed);
          loss_acc[i] = 0;
          lse[i] = 0;
          continue;
        }
        auto res = row_forward<scalar_t, acc_t>(x + i * row_stride, C, y, w, w_total, ls, buf);
        loss_acc[i] = res.loss;
        lse[i] = res.lse;
      }
    });
    if (bad_target.load()) {  // (the public API validates first; this guards direct calls)
      int64_t first = 0;
      for (int64_t i = 0; i < M; ++i) {
        if (t[i] != ignore_index && (t[i] < 0 || t[i] >= C)) {
          first = t[i];
          break;
        }
      }
      TORCH_CHECK_VALUE(false, "target holds ", first, ", outside [0, ", C,
                        ") and not ignore_index=", ignore_index);
    }

    // Selection: the k candidates with the largest (key, -index). With 32-bit keys (fp32 and
    // below) and fewer than 2^32 rows, a candidate is one 64-bit integer (key above, complemented
    // index below), so the selection compares plain integers.
    std::vector<int64_t> kept_idx;  // the k kept rows, in no particular order
    int64_t n = 0, k = 0, thr_idx = -1;
    bool selected = false;
    auto select = [&](auto& cands, auto better, auto index_of) {
      n = static_cast<int64_t>(cands.size());
      k = exact_count ? std::min(n, count) : compute_k(n, r);
      if (k > 0 && k < n) std::nth_element(cands.begin(), cands.begin() + (k - 1), cands.end(), better);
      // The k-th in ranking order is the worst of the first k.
      if (k > 0) thr_idx = index_of(*std::max_element(cands.begin(), cands.begin() + k, better));
      kept_idx.resize(k);
      for (int64_t j = 0; j < k; ++j) kept_idx[j] = index_of(cands[j]);
      selected = true;
    };
    if constexpr (sizeof(key_t) == 4) {
      if (M >= kRadixSelectMin && M <= int64_t(0xFFFFFFFF)) {
        // Many rows: a histogram of the keys' top 16 bits finds the bin that holds the k-th; rows
        // above it are kept, rows below it dropped, and only the threshold bin's rows (a few
        // hundredths of them) go through nth_element. Branch-free where the outcome is random.
        std::vector<uint32_t> keys(M);
        std::vector<uint32_t> hist(size_t(1) << 16, 0);
        for (int64_t i = 0; i < M; ++i) {
          const uint32_t key = KeyOf<acc_t>::get(loss_acc[i], easiest);
          const uint32_t valid = t[i] != ignore_index;
          keys[i] = key;
          hist[key >> 16] += valid;
          n += valid;
        }
        k = exact_count ? std::min(n, count) : compute_k(n, r);
        kept_idx.resize(k);
        if (k > 0) {
          int64_t above = 0;  // rows in the bins above the threshold bin
          uint32_t bin = 0xFFFF;
          while (above + int64_t(hist[bin]) < k) above += hist[bin--];
          std::vector<uint64_t> tie;
          int64_t na = 0;
          for (int64_t i = 0; i < M; ++i) {
            const uint32_t hb = keys[i] >> 16;
            const bool valid = t[i] != ignore_index;
            kept_idx[std::min(na, k - 1)] = i;  // (na < k whenever it is kept)
            na += valid & (hb > bin);
            if (valid & (hb == bin)) tie.push_back((uint64_t(keys[i]) << 32) | (uint64_t(0xFFFFFFFFu) - uint64_t(i)));
          }
          const int64_t need = k - above;  // 1 <= need <= tie.size()
          if (need < static_cast<int64_t>(tie.size())) {
            std::nth_element(tie.begin(), tie.begin() + (need - 1), tie.end(), std::greater<uint64_t>());
          }
          const uint64_t worst = *std::min_element(tie.begin(), tie.begin() + need);
          thr_idx = int64_t(0xFFFFFFFFu - (worst & 0xFFFFFFFFu));
          for (int64_t j = 0; j < need; ++j) kept_idx[above + j] = int64_t(0xFFFFFFFFu - (tie[j] & 0xFFFFFFFFu));
        }
        selected = true;
      } else if (M <= int64_t(0xFFFFFFFF)) {
        std::vector<uint64_t> cands;
        cands.reserve(M);
        for (int64_t i = 0; i < M; ++i) {
          if (t[i] != ignore_index) {
            cands.push_back((uint64_t(KeyOf<acc_t>::get(loss_acc[i], easiest)) << 32) |
                            (uint64_t(0xFFFFFFFFu) - uint64_t(i)));
          }
        }
        // "better" = ranks first = larger packed value; max_element(better) gives the worst.
        select(cands, std::greater<uint64_t>(),
               [](uint64_t c) { return int64_t(0xFFFFFFFFu - (c & 0xFFFFFFFFu)); });
      }
    }
    if (!selected) {
      struct Cand {
        key_t key;
        int64_t idx;
      };
      std::vector<Cand> cands;
      cands.reserve(M);
      for (int64_t i = 0; i < M; ++i) {
        if (t[i] != ignore_index) cands.push_back({KeyOf<acc_t>::get(loss_acc[i], easiest), i});
      }
      select(cands,
             [](const Cand& a, const Cand& b) { return a.key > b.key || (a.key == b.key && a.idx < b.idx); },
             [](const Cand& c) { return c.idx; });
    }
    double sum_loss = 0.0, sum_w = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = kept_idx[j];
      sum_loss += static_cast<double>(loss_acc[i]);
      sum_w += w == nullptr ? 1.0 : static_cast<double>(w[t[i]]);
    }
    const acc_t scale = reduction == kMean ? static_cast<acc_t>(1.0 / sum_w) : acc_t(1);
    bool* kp = kept.mutable_data_ptr<bool>();
    acc_t* rs = rowscale.mutable_data_ptr<acc_t>();
    scalar_t* o = reduction == kNone ? out.mutable_data_ptr<scalar_t>() : nullptr;
    for (int64_t i = 0; i < M; ++i) {
      kp[i] = false;
      rs[i] = 0;
      if (o != nullptr) o[i] = static_cast<scalar_t>(0);
    }
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = kept_idx[j];
      kp[i] = true;
      rs[i] = scale;
      if (o != nullptr) o[i] = static_cast<scalar_t>(loss_acc[i]);
    }
    if (reduction == kSum) {
      *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(sum_loss);
    } else if (reduction == kMean) {
      *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(sum_loss / sum_w);
    }
    *k_t.mutable_data_ptr<int64_t>() = k;
    *threshold.mutable_data_ptr<scalar_t>() =
        thr_idx >= 0 ? static_cast<scalar_t>(loss_acc[thr_idx])
                     : static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
  });
  return {out, losses, kept, k_t, threshold, lse_t, rowscale};
}

at::Tensor trimmed_ce_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input_,
                              const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
                              const at::Tensor& lse_t, const at::Tensor& rowscale_t,
                              int64_t ignore_index, double label_smoothing) {
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
    return spatial_backward(g, input, target, weight, lse_c, rs_c, ignore_index, label_smoothing);
  }
  at::Tensor grad = empty_large({M, C}, input.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "trimmed_ce_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    const acc_t w_total = w == nullptr ? static_cast<acc_t>(C) : weight_total<acc_t>(w, C);
    const acc_t ls = static_cast<acc_t>(label_smoothing);
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* lse = lse_c.const_data_ptr<acc_t>();
    const acc_t* rs = rs_c.const_data_ptr<acc_t>();
    scalar_t* gr = grad.mutable_data_ptr<scalar_t>();

    const int64_t grain = std::max<int64_t>(1, kParallelGrainElements / std::max<int64_t>(C, 1));
    const bool stream = static_cast<size_t>(M) * C * sizeof(scalar_t) >= kStreamBytes;
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
      alignas(64) acc_t inbuf[std::is_same_v<scalar_t, acc_t> ? 1 : kBlock];
      alignas(64) acc_t outbuf[std::is_same_v<scalar_t, acc_t> ? 1 : kBlock];
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* grow = gr + i * C;
        const acc_t scale = rs[i];
        const int64_t y = t[i];
        if (scale == acc_t(0) || y == ignore_index || y < 0 || y >= C) {
          zero_bytes(static_cast<void*>(grow), C * sizeof(scalar_t), stream);
          continue;
        }
        if (lse[i] != lse[i]) {  // a kept row with NaN log-probabilities: NaN gradient, as torch
          std::fill(grow, grow + C, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
          continue;
        }
        const acc_t coef = (per_row ? gp[i] : gp[0]) * scale;
        const acc_t w_y = w == nullptr ? acc_t(1) : w[y];
        // d l / d x_c = (1-ls) w_y (p_c - [c==y]) + ls/C (W p_c - w_c)
        const acc_t a = coef * ((acc_t(1) - ls) * w_y + ls * w_total / static_cast<acc_t>(C));
        const acc_t bconst = coef * ls / static_cast<acc_t>(C);
        const Vec va(a), vb(bconst), vl(lse[i]);
        const scalar_t* xrow = x + i * row_stride;
        for (int64_t b = 0; b < C; b += kBlock) {
          const int64_t n = std::min(kBlock, C - b);
          const acc_t* p = load_block<scalar_t, acc_t>(xrow + b, n, inbuf);
          acc_t* o = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(grow + b) : outbuf;
          int64_t j = 0;
          const bool nt = std::is_same_v<scalar_t, acc_t> && stream &&
                          reinterpret_cast<uintptr_t>(o) % kVecBytes<acc_t> == 0;
          if (nt && bconst == acc_t(0)) {
            for (; j + V <= n; j += V) store_stream<acc_t>(o + j, vexp(Vec::loadu(p + j) - vl) * va);
            if (j < n) (vexp(Vec::loadu(p + j, n - j) - vl) * va).store(o + j, n - j);
          } else if (bconst == acc_t(0)) {
            for (; j + V <= n; j += V) (vexp(Vec::loadu(p + j) - vl) * va).store(o + j);
            if (j < n) (vexp(Vec::loadu(p + j, n - j) - vl) * va).store(o + j, n - j);
          } else if (w == nullptr) {
            for (; j + V <= n; j += V) (vexp(Vec::loadu(p + j) - vl) * va - vb).store(o + j);
            if (j < n) (vexp(Vec::loadu(p + j, n - j) - vl) * va - vb).store(o + j, n - j);
          } else {
            const acc_t* wb = w + b;
            for (; j + V <= n; j += V) {
              (vexp(Vec::loadu(p + j) - vl) * va - vb * Vec::loadu(wb + j)).store(o + j);
            }
            if (j < n) {
              (vexp(Vec::loadu(p + j, n - j) - vl) * va - vb * Vec::loadu(wb + j, n - j))
                  .store(o + j, n - j);
            }
          }
          if constexpr (!std::is_same_v<scalar_t, acc_t>) store_block<scalar_t, acc_t>(o, n, grow + b);
        }
        if (stream) stream_fence();  // the streamed row is in place before grow[y] is patched
        // The true-class term, formed in the accumulation type before rounding.
        const acc_t p_y = std::exp(static_cast<acc_t>(xrow[y]) - lse[i]);
        const acc_t w_yc = w == nullptr ? acc_t(1) : w[y];
        grow[y] = static_cast<scalar_t>(a * p_y - bconst * w_yc - coef * (acc_t(1) - ls) * w_y);
      }
      if (stream) stream_fence();
    });
  });
  return grad;
}

using FwdOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using FwdSig = FwdOut(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double,
                      const std::optional<at::Tensor>&, bool, int64_t, double, int64_t);
using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t,
                          double);

const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fused_trim::trimmed_ce_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fused_trim::trimmed_ce_bwd", "").typed<BwdSig>();
  return op;
}

// Autograd (all devices): the selection is a constant; only `out` is differentiable, and the
// backward op gets the saved logsumexp and per-row scale (0 outside the kept set). A hand-written
// node, as ATen's generated ones (a torch::autograd::Function costs several microseconds more
// per call: argument extraction, a context with a string-keyed map, seven outputs wrapped).
struct TrimmedCEBackward final : public torch::autograd::Node {
  torch::autograd::SavedVariable input_, target_, weight_, lse_, rowscale_;
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;

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
      grad_input = bwd_op().call(grad_out, input, target_.unpack(), weight, lse_.unpack(), rowscale,
                                 ignore_index, label_smoothing);
    }
    return {grad_input};
  }
};

FwdOut trimmed_ce_fwd_autograd(const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, double keep_ratio,
                               const std::optional<at::Tensor>& keep_ratio_t, bool easiest,
                               int64_t ignore_index, double label_smoothing, int64_t reduction) {
  FwdOut res;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    res = fwd_op().call(input, target, weight, keep_ratio, keep_ratio_t, easiest, ignore_index,
                        label_smoothing, reduction);
  }
  // No gradient to record (evaluation, no_grad, a detached input): the outputs as they are. Only
  // `input` is differentiable (no gradient flows to target, weight or keep_ratio).
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
  torch::autograd::set_history(std::get<0>(res), node);
  return res;
}

}  // namespace

TORCH_LIBRARY(fused_trim, m) {
  m.def(
      "trimmed_ce_fwd(Tensor input, Tensor target, Tensor? weight, float keep_ratio, "
      "Tensor? keep_ratio_t, bool easiest, int ignore_index, float label_smoothing, int reduction) "
      "-> (Tensor out, Tensor losses, Tensor kept, Tensor k, Tensor threshold, Tensor lse, "
      "Tensor rowscale)");
  m.def(
      "trimmed_ce_bwd(Tensor grad_out, Tensor input, Tensor target, Tensor? weight, Tensor lse, "
      "Tensor rowscale, int ignore_index, float label_smoothing) -> Tensor");
  m.def("empty_cache() -> ()", &empty_cache);
}

TORCH_LIBRARY_IMPL(fused_trim, CPU, m) {
  m.impl("trimmed_ce_fwd", &trimmed_ce_fwd_cpu);
  m.impl("trimmed_ce_bwd", &trimmed_ce_bwd_cpu);
}

TORCH_LIBRARY_IMPL(fused_trim, Autograd, m) {
  m.impl("trimmed_ce_fwd", &trimmed_ce_fwd_autograd);
}

}  // namespace fused_trim
