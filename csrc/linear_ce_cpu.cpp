// The LM head fused with trimming on the CPU (trimmed_linear_cross_entropy, native backend):
//   fused_trim::linear_ce_rows      every row's loss and logsumexp, chunk by chunk, never the (N, V) logits
//   fused_trim::linear_ce_trimmed   the selection (cpu/select.h; on loss - score_offset when given)
//                                   and the reduction on those losses
//   fused_trim::linear_ce_bwd       the gradient of the kept rows only, gathered into dense chunks
//   fused_trim::linear_ce_keep_all  every valid row kept (keep_ratio 1.0): losses, selection and the
//                                   unscaled gradient in one pass (3 GEMMs a chunk, not 4)
// Schemas and CPU kernels are here; the fake (meta) kernels and the autograd formulas are in
// fused_trim/native.py.
//
// Forward (linear_ce_rows): tile-major, each tile of kTileV classes meets every row once (a (rows,
// kTileV) tile of logits per thread), and the rows merge their tiles' statistics into the loss with
// the shared finish_sample (cpu/ce_rows.h). Backward: the kept rows, gathered and converted to the
// accumulation type (fp32; fp64 for fp64 input), a chunk at a time; per tile, its logits
// (recomputed into the per-thread tile), dlogits formed in place with row_backward's pieces, then
// its share of d input and its rows of d linear_weight and d linear_bias, while the tile is still in
// cache. Keep-all: a (chunk, V) buffer of logits per chunk of rows, held tile-major (each tile a dense
// (rows, kTileV) block, so that its three GEMMs read and write one dense block), each tile's
// statistics taken right after its GEMM and merged as in the forward, then the same tile loop in
// place (the logits are not computed twice). BLAS does the FLOPs, each tile's GEMMs one
// single-threaded BLAS call (the tiles go to threads with at::parallel_for): every value is then
// computed the same way whatever the thread count, where a multithreaded GEMM splits its inner
// dimension differently at different thread counts. d input, whose inner dimension is V, is summed
// over a fixed number of class blocks, added in block order; d linear_weight and d linear_bias are
// accumulated in the accumulation type, chunk after chunk, each tile by one thread: the gradients
// are bitwise repeatable run to run and across thread counts.
//
// logit_softcap (0: off) caps each tile's logits in place right after its GEMM (tile_logits), so
// the statistics, the held keep-all logits and the recomputed ones are all capped logits, and the
// dlogits take the cap's derivative from them; z_loss (0: off) enters finish_sample and
// row_grad_coefs (cpu/ce_rows.h). Both off: the plain arithmetic, bitwise.
//
// bf16/fp16: linear_weight is converted to fp32 once per call (V * D * 4 bytes: 64 MiB at V = 32000,
// D = 512, as much as a chunk of logits at the default chunk size; acceptable on the CPU, where
// half-precision GEMMs are far slower than converting), the input chunk by chunk.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/ce_rows.h"
#include "cpu/select.h"
#include "cpu/tensors.h"
#include "cpu/vec.h"
#include "trimmed_ce_common.h"

namespace fused_trim {
namespace {

using namespace fused_trim::cpu;

// Classes per GEMM tile (a tile of logits, of d linear_weight, of d linear_bias).
constexpr int64_t kTileV = 1024;
// At most this many class blocks in a chunk's backward (see class_blocks).
constexpr int64_t kMaxSplit = 16;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// MKL (torch's BLAS on x86) chooses its algorithm from its thread setting even where it then runs
// on one thread (inside our parallel region): set to 2 threads, it splits the inner dimension of a
// small GEMM such as a block of d input, and the bits change with the thread count. Each tile
// therefore runs with MKL's thread-local setting at 1. (A weak symbol: other BLAS builds of torch
// do not have it, and their GEMMs are single-threaded here anyway. mkl_service.h maps the C name
// mkl_set_num_threads_local to this symbol; the lowercase export is the Fortran one, by pointer.)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

struct OneBlasThread {
  int previous = 0;
  OneBlasThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;
};

// Rows per chunk: at most `chunk`, as few chunks as that allows, all of about one size (a last
// chunk of a few rows would cost a whole pass over d linear_weight for almost no work).
int64_t balanced_chunk(int64_t rows, int64_t chunk) {
  if (rows <= 0) return 1;
  const int64_t chunks = ceil_div(rows, std::max<int64_t>(chunk, 1));
  return ceil_div(rows, chunks);
}

// Rows per GEMM where no (rows, V) logits are held (the tile-major forward, the backward): chunk
// times the largest whole factor that keeps a (rows, kTileV) tile for each of 4 threads plus
// `per_row` other values per row within about chunk x V values. Larger GEMMs run closer to BLAS's
// peak and pass over d linear_weight fewer times. A function of the shapes only (never of the
// thread count), so that the sums keep their order.
int64_t gemm_rows(int64_t chunk, int64_t V, int64_t per_row) {
  return chunk * std::max<int64_t>(1, V / (4 * kTileV + per_row));
}

// A non-owning view of acc_t memory: no dispatcher, no autograd (safe on the worker threads).
template <typename acc_t>
at::Tensor blob(const acc_t* p, at::IntArrayRef sizes, at::IntArrayRef strides) {
  return at::from_blob(const_cast<acc_t*>(p), sizes, strides,
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

at::Tensor empty_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, std::nullopt);
}

// The head in the accumulation type: W (V, D) row-major, the bias, the class weight.
template <typename acc_t>
struct Head {
  const acc_t* W;
  const acc_t* bias;  // nullptr: none
  int64_t V, D;
  const acc_t* w;  // class weight, nullptr: none
  acc_t w_total, ls;
  acc_t cap, zl;  // logit_softcap (0: off), z_loss (0: off)
};

// One tile's logits: out (rows, n, row stride ld) = x (rows, D) @ W[v0:v0+n]^T + bias[v0:v0+n], one
// BLAS call (the caller holds OneBlasThread), capped in place with logit_softcap.
template <typename acc_t>
void tile_logits(const Head<acc_t>& h, const at::Tensor& x, int64_t rows, int64_t v0, int64_t n, acc_t* L,
                 int64_t ld) {
  const int64_t D = h.D;
  at::Tensor out = blob(L, {rows, n}, {ld, 1});
  const at::Tensor wt = blob(h.W + v0 * D, {D, n}, {1, D});
  if (h.bias != nullptr) {
    for (int64_t r = 0; r < rows; ++r) std::memcpy(L + r * ld, h.bias + v0, n * sizeof(acc_t));
    at::cpu::addmm_out(out, out, x, wt);
  } else {
    at::cpu::mm_out(out, x, wt);
  }
  if (h.cap > acc_t(0)) {
    for (int64_t r = 0; r < rows; ++r) cap_block<acc_t>(L + r * ld, n, h.cap, L + r * ld);
  }
}

// Per-tile statistics of rows, at [tile * ld + i] for row i: the max m_t over the tile's classes,
// sum exp(x - m_t), for label smoothing (SX != nullptr) sum_c w_c (x_c - m_t), and XY[i] the
// target's logit, from the tile that holds the target.
template <typename acc_t>
struct TileStats {
  acc_t *M, *S, *SX, *XY;
  int64_t ld;
};

// The statistics of tile `tile` (classes v0..v0+n) for rows i0..i0+rows, logits L (rows x n, contiguous).
template <typename acc_t>
void tile_stats(const Head<acc_t>& h, const acc_t* L, int64_t rows, int64_t n, int64_t tile, int64_t v0, int64_t i0,
                const int64_t* t, const TileStats<acc_t>& st) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    const acc_t* row = L + r * n;
    const acc_t m = block_max<acc_t>(row, n);
    st.M[tile * st.ld + i] = m;
    st.S[tile * st.ld + i] = m != ninf ? block_sumexp<acc_t>(row, n, m) : acc_t(0);
    if (st.SX != nullptr) {
      st.SX[tile * st.ld + i] =
          block_sum_shifted<acc_t>(row, h.w == nullptr ? nullptr : h.w + v0, n, std::isfinite(m) ? m : acc_t(0));
    }
    const int64_t y = t[i];
    if (y >= v0 && y < v0 + n) st.XY[i] = row[y - v0];
  }
}

// Rows [0, rows)'s loss and logsumexp from their T tiles' statistics, merged in tile order (an
// online logsumexp), ending in the shared finish_sample; 0 for rows not scored (a target outside
// [0, V) that is not ignore_index sets bad_target).
template <typename acc_t>
void merge_tile_stats(const Head<acc_t>& h, const TileStats<acc_t>& st, int64_t T, int64_t rows, const int64_t* t,
                      int64_t ignore_index, acc_t* loss, acc_t* lse, std::atomic<bool>& bad_target) {
  const int64_t V = h.V, ld = st.ld;
  const bool smooth = st.SX != nullptr;
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  std::vector<acc_t> wsum(smooth ? T : 0);  // the class weight of each tile
  for (int64_t tile = 0; tile < static_cast<int64_t>(wsum.size()); ++tile) {
    const int64_t v0 = tile * kTileV, n = std::min(kTileV, V - v0);
    wsum[tile] = h.w == nullptr ? static_cast<acc_t>(n) : weight_total<acc_t>(h.w + v0, n);
  }
  at::parallel_for(0, rows, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t y = t[i];
      if (!scored_target(y, V, ignore_index, bad_target)) {
        loss[i] = lse[i] = 0;
        continue;
      }
      acc_t m = st.M[i];
      for (int64_t tile = 1; tile < T; ++tile) m = nan_max<acc_t>(m, st.M[tile * ld + i]);
      acc_t sum = 0, sx = 0;
      const acc_t ref = std::isfinite(m) ? m : acc_t(0);
      for (int64_t tile = 0; tile < T; ++tile) {
        const acc_t mt = st.M[tile * ld + i];
        if (mt != ninf) sum += st.S[tile * ld + i] * std::exp(mt - m);
        if (smooth) sx += st.SX[tile * ld + i] + ((std::isfinite(mt) ? mt : acc_t(0)) - ref) * wsum[tile];
      }
      const auto res = finish_sample<acc_t>(m, std::log(sum), st.XY[i], h.w == nullptr ? acc_t(1) : h.w[y], ref, sx,
                                            h.ls, h.w_total, V, h.zl);
      loss[i] = res.loss;
      lse[i] = res.lse;
    }
  });
}

// Class blocks of a chunk's backward: its parallel work units (one thread each, a run of whole
// tiles) and the pieces of d input (partial sums, added in block order). A function of the shapes
// only, and the partial sums (blocks x rows x D) no larger than a chunk of logits (rows x V).
int64_t class_blocks(int64_t V, int64_t D) {
  return std::clamp<int64_t>(std::min(ceil_div(V, kTileV), V / std::max<int64_t>(D, 1)), 1, kMaxSplit);
}

// Per kept row of a chunk: the target (-1: a row whose gradient is zero), logsumexp, the upstream
// coefficient (grad_out x the row's scale) and row_backward's coefficients.
template <typename acc_t>
struct ChunkRows {
  std::vector<int64_t> y;
  std::vector<acc_t> lse, coef, w_y;
  std::vector<RowGrad<acc_t>> g;
  explicit ChunkRows(int64_t c) : y(c), lse(c), coef(c), w_y(c), g(c) {}
  void set(const Head<acc_t>& h, int64_t r, int64_t target, acc_t row_lse, acc_t row_coef) {
    y[r] = target;
    lse[r] = row_lse;
    coef[r] = row_coef;
    w_y[r] = h.w == nullptr || target < 0 ? acc_t(1) : h.w[target];
    g[r] = row_grad_coefs<acc_t>(row_coef, w_y[r], h.w_total, h.ls, h.V, row_lse, h.zl);
  }
};

// The backward of one chunk of rows (xk: rows x D), a tile of kTileV classes at a time, so that a
// tile's dlogits stay in cache from their forming to the two GEMMs that read them:
//   dlogits = d(sum_r coef[r] l_r)/d logits (row_backward's pieces, cpu/ce_rows.h),
//   dx (rows, D) = dlogits @ W (nullptr: not wanted), dW (V, D) += dlogits^T @ xk, db += column sums.
// `logits` holds the chunk's logits tile-major (the tile of classes v0..v0+n a dense rows x n block at
// logits + v0 * rows), turned into dlogits in place; nullptr:
// each tile's logits are computed into `scratch` (rows x kTileV per thread of the pool). `partial`:
// class_blocks(V, D) * rows * D values when dx is wanted. `first`: dW and db are written, not added to.
template <typename acc_t>
void chunk_backward(const Head<acc_t>& h, const acc_t* xk, int64_t rows, const ChunkRows<acc_t>& cr,
                    acc_t* logits, acc_t* scratch, acc_t* dx, acc_t* partial, acc_t* dW, acc_t* db, bool first) {
  const int64_t V = h.V, D = h.D;
  const int64_t S = class_blocks(V, D), tiles = ceil_div(V, kTileV);
  constexpr acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  at::parallel_for(0, S, 1, [&](int64_t b0, int64_t b1) {
    const OneBlasThread one;
    const at::Tensor x = blob(xk, {rows, D}, {D, 1});
    acc_t* own = scratch == nullptr ? nullptr : scratch + at::get_thread_num() * rows * kTileV;
    for (int64_t b = b0; b < b1; ++b) {
      acc_t* P = S == 1 ? dx : (dx == nullptr ? nullptr : partial + b * rows * D);
      for (int64_t t = b * tiles / S; t < (b + 1) * tiles / S; ++t) {
        const int64_t v0 = t * kTileV, n = std::min(kTileV, V - v0);
        const at::Tensor wt = blob(h.W + v0 * D, {n, D}, {D, 1});
        acc_t* L = logits != nullptr ? logits + v0 * rows : own;
        const int64_t ld = n;
        if (logits == nullptr) tile_logits<acc_t>(h, x, rows, v0, n, L, ld);  // this tile's logits
        for (int64_t r = 0; r < rows; ++r) {  // dlogits in place
          acc_t* row = L + r * ld;
          const int64_t y = cr.y[r];
          if (y < 0 || cr.lse[r] != cr.lse[r]) {  // zero row; NaN log-probabilities: NaN, as torch
            std::fill(row, row + n, y < 0 ? acc_t(0) : nan);
            continue;
          }
          const bool has_y = y >= v0 && y < v0 + n;
          const acc_t x_y = has_y ? row[y - v0] : acc_t(0);  // read before the pass overwrites it
          const acc_t* wv = h.w == nullptr ? nullptr : h.w + v0;
          if (h.cap > acc_t(0)) {  // (the logits are capped ones: tile_logits)
            row_grad_block<acc_t, true>(row, row, n, cr.lse[r], cr.g[r], wv, false, h.cap);
            if (has_y) {
              row[y - v0] =
                  row_grad_true_class<acc_t, true>(x_y, cr.lse[r], cr.g[r], cr.coef[r], cr.w_y[r], h.ls, h.cap);
            }
          } else {
            row_grad_block<acc_t>(row, row, n, cr.lse[r], cr.g[r], wv, false);
            if (has_y) row[y - v0] = row_grad_true_class<acc_t>(x_y, cr.lse[r], cr.g[r], cr.coef[r], cr.w_y[r], h.ls);
          }
        }
        const at::Tensor dl = blob(L, {rows, n}, {ld, 1});
        if (dW != nullptr) {
          at::Tensor out = blob(dW + v0 * D, {n, D}, {D, 1});
          if (first) {
            at::cpu::mm_out(out, dl.t(), x);
          } else {
            at::cpu::addmm_out(out, out, dl.t(), x);
          }
        }
        if (db != nullptr) {
          acc_t* o = db + v0;
          if (first) std::fill(o, o + n, acc_t(0));
          for (int64_t r = 0; r < rows; ++r) {
            const acc_t* src = L + r * ld;
            for (int64_t j = 0; j < n; ++j) o[j] += src[j];
          }
        }
        if (P != nullptr) {
          at::Tensor out = blob(P, {rows, D}, {D, 1});
          if (t == b * tiles / S) {
            at::cpu::mm_out(out, dl, wt);
          } else {
            at::cpu::addmm_out(out, out, dl, wt);
          }
        }
      }
    }
  });
  if (dx == nullptr || S == 1) return;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t Lv = Vec::size();
  const int64_t size = rows * D;
  at::parallel_for(0, ceil_div(size, Lv), 2048, [&](int64_t e0v, int64_t e1v) {
    const int64_t e1 = std::min(size, e1v * Lv);
    int64_t e = e0v * Lv;
    for (; e + Lv <= e1; e += Lv) {
      Vec acc = Vec::loadu(partial + e);
      for (int64_t s = 1; s < S; ++s) acc = acc + Vec::loadu(partial + s * size + e);
      acc.store(dx + e);
    }
    for (; e < e1; ++e) {
      acc_t acc = partial[e];
      for (int64_t s = 1; s < S; ++s) acc += partial[s * size + e];
      dx[e] = acc;
    }
  });
}

// A gradient buffer of `dtype` (`acc_st` values are accumulated in it directly): the cached
// huge-page blocks of empty_large when it is what the caller gets (a fresh 64 MiB d linear_weight
// costs more in page faults than a third of its GEMM), a plain allocation when it is scratch.
at::Tensor grad_buffer(at::IntArrayRef sizes, at::ScalarType acc_st, at::ScalarType dtype) {
  return dtype == acc_st ? empty_large(sizes, at::TensorOptions().dtype(acc_st))
                         : at::detail::empty_cpu(sizes, acc_st, false, std::nullopt);
}

// `acc` (accumulation type) as the parameter's dtype, times `factor`: `acc` itself when there is
// nothing to do, else a new (cached, see grad_buffer) tensor.
at::Tensor finish_grad(const at::Tensor& acc, at::ScalarType dtype, double factor = 1.0) {
  if (acc.scalar_type() == dtype && factor == 1.0) return acc;
  at::Tensor out = empty_large(acc.sizes(), at::TensorOptions().dtype(dtype));
  const int64_t n = acc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "finish_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* src = acc.const_data_ptr<acc_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const acc_t f = static_cast<acc_t>(factor);
    at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
      alignas(64) acc_t buf[kBlock];
      for (int64_t j = b; j < e; j += kBlock) {
        const int64_t m = std::min(kBlock, e - j);
        for (int64_t q = 0; q < m; ++q) buf[q] = src[j + q] * f;
        store_block<scalar_t, acc_t>(buf, m, dst + j);
      }
    });
  });
  return out;
}

// Rows `rows_idx[0:count]` (or first..first+count when rows_idx is nullptr) of x, converted to acc_t.
template <typename scalar_t, typename acc_t>
void gather_rows(const scalar_t* x, int64_t row_stride, int64_t D, const int64_t* rows_idx, int64_t first,
                 int64_t count, acc_t* out) {
  for (int64_t r = 0; r < count; ++r) {
    const int64_t i = rows_idx != nullptr ? rows_idx[r] : first + r;
    acc_t* dst = out + r * D;
    const acc_t* p = load_block<scalar_t, acc_t>(x + i * row_stride, D, dst);
    if (p != dst) std::memcpy(dst, p, D * sizeof(acc_t));
  }
}

// The op's inputs in the accumulation type (linear_weight converted once when it is not already).
struct Prepared {
  at::Tensor input, W, bias, target, weight;
  int64_t N, D, V;
};

Prepared prepare(const at::Tensor& input_, const at::Tensor& W_, const std::optional<at::Tensor>& b_,
                 const at::Tensor& target_, const std::optional<at::Tensor>& weight_) {
  TORCH_CHECK(input_.dim() == 2, "fused_trim: input must be (N, D), got ", input_.sizes());
  TORCH_CHECK(W_.dim() == 2 && W_.size(1) == input_.size(1), "fused_trim: linear_weight must be (V, ",
              input_.size(1), "), got ", W_.sizes());
  TORCH_CHECK(target_.dim() == 1 && target_.size(0) == input_.size(0), "fused_trim: target must be (",
              input_.size(0), ",), got ", target_.sizes());
  TORCH_CHECK(W_.scalar_type() == input_.scalar_type(), "fused_trim: linear_weight dtype ", W_.scalar_type(),
              " differs from input dtype ", input_.scalar_type());
  Prepared p;
  const auto acc_st = acc_type_of(input_.scalar_type());
  p.input = unit_stride_last(input_);
  p.W = as_contiguous(W_, acc_st);
  p.N = input_.size(0);
  p.D = input_.size(1);
  p.V = W_.size(0);
  if (b_.has_value() && b_->defined()) {
    TORCH_CHECK(b_->dim() == 1 && b_->size(0) == p.V, "fused_trim: linear_bias must be (", p.V, ",), got ",
                b_->sizes());
    p.bias = as_contiguous(*b_, acc_st);
  }
  p.target = as_contiguous(target_, at::kLong);
  if (weight_.has_value() && weight_->defined()) p.weight = as_contiguous(*weight_, acc_st);
  return p;
}

template <typename acc_t>
Head<acc_t> head_of(const Prepared& p, double label_smoothing, double logit_softcap, double z_loss) {
  Head<acc_t> h;
  h.W = p.W.const_data_ptr<acc_t>();
  h.bias = p.bias.defined() ? p.bias.const_data_ptr<acc_t>() : nullptr;
  h.V = p.V;
  h.D = p.D;
  h.w = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
  h.w_total = h.w == nullptr ? static_cast<acc_t>(p.V) : weight_total<acc_t>(h.w, p.V);
  h.ls = static_cast<acc_t>(label_smoothing);
  h.cap = static_cast<acc_t>(logit_softcap);
  h.zl = static_cast<acc_t>(z_loss);
  return h;
}

inline bool scored(int64_t y, int64_t V, int64_t ignore_index) { return y != ignore_index && y >= 0 && y < V; }

[[noreturn]] void raise_bad_target(const int64_t* t, int64_t N, int64_t V, int64_t ignore_index) {
  int64_t first = 0;
  for (int64_t i = 0; i < N; ++i) {
    if (t[i] != ignore_index && (t[i] < 0 || t[i] >= V)) {
      first = t[i];
      break;
    }
  }
  TORCH_CHECK_VALUE(false, "target holds ", first, ", outside [0, ", V, ") and not ignore_index=", ignore_index);
}

// Every row's loss and logsumexp, tile-major: each tile of kTileV classes (one thread) meets every
// row, `chunk` rows per GEMM, and leaves each row its statistics over the tile (max m_t, sum of
// exp(x - m_t), for label smoothing sum_c w_c (x_c - m_t), the target's logit where the tile holds
// it); the rows then merge their tiles' statistics in tile order (an online logsumexp) and end in
// the shared finish_sample. A head tile is read from memory once, not once per chunk of rows, and
// no (chunk, V) logits exist: a (chunk, kTileV) tile per thread. `x`: (N, D) in acc_t, contiguous.
template <typename acc_t>
void rows_forward_tiled(const Prepared& p, const Head<acc_t>& h, const acc_t* x, int64_t ignore_index, int64_t chunk,
                        acc_t* loss, acc_t* lse) {
  const int64_t N = p.N, D = p.D, V = p.V;
  const int64_t T = ceil_div(V, kTileV);
  const int64_t c = balanced_chunk(N, gemm_rows(chunk, V, 0));
  const auto acc_st = c10::CppTypeToScalarType<acc_t>::value;
  const bool smooth = h.ls > 0;
  at::Tensor stats = empty_cpu({(smooth ? 3 : 2) * T * N + N}, acc_st);
  acc_t* base = stats.mutable_data_ptr<acc_t>();
  const TileStats<acc_t> st{base, base + T * N, smooth ? base + 2 * T * N : nullptr, base + (smooth ? 3 : 2) * T * N,
                            N};
  at::Tensor scratch = empty_cpu({at::get_num_threads() * c * kTileV}, acc_st);
  const int64_t* t = p.target.const_data_ptr<int64_t>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    const OneBlasThread one;
    acc_t* L = scratch.mutable_data_ptr<acc_t>() + at::get_thread_num() * c * kTileV;
    for (int64_t tile = t0; tile < t1; ++tile) {
      const int64_t v0 = tile * kTileV, n = std::min(kTileV, V - v0);
      for (int64_t s = 0; s < N; s += c) {
        const int64_t rows = std::min(c, N - s);
        tile_logits<acc_t>(h, blob(x + s * D, {rows, D}, {D, 1}), rows, v0, n, L, n);
        tile_stats<acc_t>(h, L, rows, n, tile, v0, s, t, st);
      }
    }
  });
  std::atomic<bool> bad_target{false};
  merge_tile_stats<acc_t>(h, st, T, N, t, ignore_index, loss, lse, bad_target);
  if (bad_target.load()) raise_bad_target(t, N, V, ignore_index);  // (the public API validates first)
}

// Keep-all (every valid row kept): every row's loss and logsumexp and the unscaled gradient of
// sum_i l_i, chunk after chunk: dx (N, D) (nullptr: not wanted), dW (V, D), db (V,) accumulated.
// A chunk's logits are held tile-major, tile t's (rows, n) block contiguous at logits + v0 * rows
// (each tile's GEMMs then read and write one dense block), its statistics taken right after its
// GEMM, while it is in cache; the backward then turns the tiles into dlogits in place.
template <typename scalar_t, typename acc_t>
void keep_all_chunks(const Prepared& p, const Head<acc_t>& h, int64_t ignore_index, int64_t chunk, acc_t* loss,
                     acc_t* lse, acc_t* dx, acc_t* dW, acc_t* db) {
  const int64_t N = p.N, D = p.D, V = p.V;
  const int64_t T = ceil_div(V, kTileV);
  const int64_t c = balanced_chunk(N, chunk);
  const auto acc_st = c10::CppTypeToScalarType<acc_t>::value;
  const bool smooth = h.ls > 0;
  at::Tensor xbuf = empty_cpu({c, D}, acc_st);
  at::Tensor lbuf = empty_cpu({c, V}, acc_st);
  at::Tensor stats = empty_cpu({(smooth ? 3 : 2) * T * c + c}, acc_st);
  acc_t* base = stats.mutable_data_ptr<acc_t>();
  const TileStats<acc_t> st{base, base + T * c, smooth ? base + 2 * T * c : nullptr, base + (smooth ? 3 : 2) * T * c,
                            c};
  at::Tensor partial = dx != nullptr ? empty_cpu({class_blocks(V, D) * c * D}, acc_st) : at::Tensor();
  ChunkRows<acc_t> cr(c);
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const int64_t* t = p.target.const_data_ptr<int64_t>();
  acc_t* xk = xbuf.mutable_data_ptr<acc_t>();
  acc_t* L = lbuf.mutable_data_ptr<acc_t>();
  std::atomic<bool> bad_target{false};
  for (int64_t s = 0; s < N; s += c) {
    const int64_t rows = std::min(c, N - s);
    gather_rows<scalar_t, acc_t>(x, p.input.stride(0), D, nullptr, s, rows, xk);
    // An ignored row contributes exactly nothing: its hidden state (a NaN padding token's, say)
    // would otherwise reach d linear_weight as 0 * NaN through its zero dlogits.
    for (int64_t r = 0; r < rows; ++r) {
      if (!scored(t[s + r], V, ignore_index)) std::fill(xk + r * D, xk + (r + 1) * D, acc_t(0));
    }
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      const OneBlasThread one;
      const at::Tensor xs = blob(xk, {rows, D}, {D, 1});
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t v0 = tile * kTileV, n = std::min(kTileV, V - v0);
        tile_logits<acc_t>(h, xs, rows, v0, n, L + v0 * rows, n);
        tile_stats<acc_t>(h, L + v0 * rows, rows, n, tile, v0, 0, t + s, st);
      }
    });
    merge_tile_stats<acc_t>(h, st, T, rows, t + s, ignore_index, loss + s, lse + s, bad_target);
    for (int64_t r = 0; r < rows; ++r) {
      cr.set(h, r, scored(t[s + r], V, ignore_index) ? t[s + r] : -1, lse[s + r], acc_t(1));
    }
    chunk_backward<acc_t>(h, xk, rows, cr, L, nullptr, dx == nullptr ? nullptr : dx + s * D,
                          partial.defined() ? partial.mutable_data_ptr<acc_t>() : nullptr, dW, db, /*first=*/s == 0);
  }
  if (bad_target.load()) raise_bad_target(t, N, V, ignore_index);  // (the public API validates first)
}

// ------------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> linear_ce_rows_cpu(const at::Tensor& input_, const at::Tensor& W_,
                                                      const std::optional<at::Tensor>& b_, const at::Tensor& target_,
                                                      const std::optional<at::Tensor>& weight_, int64_t ignore_index,
                                                      double label_smoothing, int64_t chunk_size,
                                                      double logit_softcap, double z_loss) {
  const Prepared p = prepare(input_, W_, b_, target_, weight_);
  const auto acc_st = acc_type_of(p.input.scalar_type());
  at::Tensor losses = empty_cpu({p.N}, acc_st);
  at::Tensor lse = empty_cpu({p.N}, acc_st);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "linear_ce_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor x = as_contiguous(p.input, acc_st);  // (the input itself when it is fp32 rows)
    rows_forward_tiled<acc_t>(p, head_of<acc_t>(p, label_smoothing, logit_softcap, z_loss), x.const_data_ptr<acc_t>(),
                              ignore_index, chunk_size, losses.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>());
  });
  return {losses, lse};
}

// (out, kept, k, threshold, rowscale) from the per-row losses, ranked by loss - offset when an
// offset (score_offset, acc_t) is given; returns the denominator too.
template <typename scalar_t, typename acc_t>
double select_and_reduce(const acc_t* loss, const int64_t* t, const acc_t* w, int64_t N, int64_t ignore_index,
                         bool easiest, double r, int64_t count, int64_t reduction, at::Tensor& out, at::Tensor& kept,
                         at::Tensor& k_t, at::Tensor& threshold, at::Tensor& rowscale, const acc_t* offset = nullptr) {
  KeepRule rule;  // (a threshold's k arrives as an exact count, computed from the losses in Python)
  rule.ratio = r;
  rule.count = count;
  const Selection sel =
      select_reduce<scalar_t, acc_t>(loss, t, ignore_index, N, easiest, rule, offset, w, reduction,
                                     out.mutable_data_ptr<scalar_t>(), kept.mutable_data_ptr<bool>(),
                                     rowscale.mutable_data_ptr<acc_t>());
  const double denom = sel.denom;
  *k_t.mutable_data_ptr<int64_t>() = sel.k;
  *threshold.mutable_data_ptr<scalar_t>() = sel.thr_idx >= 0
                                                ? static_cast<scalar_t>(score_of(loss, offset, sel.thr_idx))
                                                : static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
  return sel.k > 0 ? denom : 0.0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_trimmed_cpu(
    const at::Tensor& losses_, const at::Tensor& lse, const at::Tensor& input, const at::Tensor& W,
    const std::optional<at::Tensor>& b, const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
    double keep_ratio, const std::optional<at::Tensor>& keep_ratio_t, bool easiest, int64_t ignore_index,
    double label_smoothing, int64_t reduction, int64_t chunk_size, const std::optional<at::Tensor>& score_offset_,
    double /*logit_softcap*/, double /*z_loss*/) {
  // (logit_softcap and z_loss are in the losses already; the op takes them for its backward.)
  const int64_t N = losses_.size(0);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fused_trim: bad reduction code ", reduction);
  const auto st = input.scalar_type();
  const auto acc_st = acc_type_of(st);
  const at::Tensor losses = as_contiguous(losses_, acc_st);
  const at::Tensor target = as_contiguous(target_, at::kLong);
  const at::Tensor weight =
      weight_.has_value() && weight_->defined() ? as_contiguous(*weight_, acc_st) : at::Tensor();
  const at::Tensor score_offset = score_offset_.has_value() && score_offset_->defined()
                                      ? as_contiguous(*score_offset_, acc_st)
                                      : at::Tensor();
  TORCH_CHECK(!score_offset.defined() || score_offset.numel() == N, "fused_trim: score_offset must have ", N,
              " values, got ", score_offset.numel());
  // keep_ratio_t: a 0-dim float tensor (a ratio), or an integer one: an exact count.
  const bool has_ratio_t = keep_ratio_t.has_value() && keep_ratio_t->defined();
  const bool exact_count = has_ratio_t && !at::isFloatingType(keep_ratio_t->scalar_type());
  const int64_t count = exact_count ? std::max<int64_t>(0, keep_ratio_t->item<int64_t>()) : -1;
  const double r = has_ratio_t && !exact_count ? keep_ratio_t->item<double>() : keep_ratio;
  at::Tensor out = reduction == kNone ? empty_cpu({N}, st) : empty_cpu({}, st);
  at::Tensor kept = empty_cpu({N}, at::kBool);
  at::Tensor k_t = empty_cpu({}, at::kLong);
  at::Tensor threshold = empty_cpu({}, st);
  at::Tensor rowscale = empty_cpu({N}, acc_st);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "linear_ce_trimmed_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    select_and_reduce<scalar_t, acc_t>(losses.const_data_ptr<acc_t>(), target.const_data_ptr<int64_t>(),
                                       weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr, N, ignore_index,
                                       easiest, r, count, reduction, out, kept, k_t, threshold, rowscale,
                                       score_offset.defined() ? score_offset.const_data_ptr<acc_t>() : nullptr);
  });
  return {out, kept, k_t, threshold, rowscale};
}

// Gradient mask bits of linear_ce_bwd / linear_ce_keep_all.
constexpr int64_t kGradInput = 1, kGradWeight = 2, kGradBias = 4;

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input_, const at::Tensor& W_, const std::optional<at::Tensor>& b_,
    const at::Tensor& target_, const std::optional<at::Tensor>& weight_, const at::Tensor& lse_,
    const at::Tensor& kept_, const at::Tensor& rowscale_, int64_t ignore_index, double label_smoothing,
    int64_t chunk_size, int64_t grad_mask, double logit_softcap, double z_loss) {
  const Prepared p = prepare(input_, W_, b_, target_, weight_);
  const int64_t N = p.N, D = p.D, V = p.V;
  const auto st = p.input.scalar_type();
  const auto acc_st = acc_type_of(st);
  const bool need_input = grad_mask & kGradInput, need_weight = grad_mask & kGradWeight;
  const bool need_bias = (grad_mask & kGradBias) && p.bias.defined();
  const at::Tensor g = as_contiguous(grad_out, acc_st);
  const bool per_row = g.dim() == 1;
  const at::Tensor lse_c = as_contiguous(lse_, acc_st);
  const at::Tensor rs_c = as_contiguous(rowscale_, acc_st);
  const at::Tensor kept = as_contiguous(kept_, at::kBool);
  at::Tensor grad_input = need_input ? empty_large({N, D}, at::TensorOptions().dtype(st)) : empty_cpu({0}, st);
  if (need_input) zero_bytes(grad_input.mutable_data_ptr(), grad_input.nbytes(), /*stream=*/false);
  at::Tensor dW = need_weight ? grad_buffer({V, D}, acc_st, W_.scalar_type()) : at::Tensor();
  at::Tensor db = need_bias ? empty_cpu({V}, acc_st) : at::Tensor();

  // The kept rows, in row order: the sums run in a fixed order.
  std::vector<int64_t> idx;
  const bool* kp = kept.const_data_ptr<bool>();
  for (int64_t i = 0; i < N; ++i) {
    if (kp[i]) idx.push_back(i);
  }
  const int64_t k = static_cast<int64_t>(idx.size());

  if (k > 0 && (need_input || need_weight || need_bias)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "linear_ce_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const Head<acc_t> h = head_of<acc_t>(p, label_smoothing, logit_softcap, z_loss);
      const int64_t c = balanced_chunk(k, gemm_rows(chunk_size, V, (class_blocks(V, D) + 1) * D));
      at::Tensor xbuf = empty_cpu({c, D}, acc_st);
      // No chunk of logits: each thread computes a tile of them at a time.
      at::Tensor scratch = empty_cpu({at::get_num_threads() * c * kTileV}, acc_st);
      at::Tensor dxbuf = need_input ? empty_cpu({c, D}, acc_st) : at::Tensor();
      at::Tensor partial = need_input ? empty_cpu({class_blocks(V, D) * c * D}, acc_st) : at::Tensor();
      ChunkRows<acc_t> cr(c);
      const scalar_t* x = p.input.const_data_ptr<scalar_t>();
      const int64_t* t = p.target.const_data_ptr<int64_t>();
      const acc_t* lse_all = lse_c.const_data_ptr<acc_t>();
      const acc_t* rs = rs_c.const_data_ptr<acc_t>();
      const acc_t* gp = g.const_data_ptr<acc_t>();
      acc_t* xk = xbuf.mutable_data_ptr<acc_t>();
      for (int64_t s = 0; s < k; s += c) {
        const int64_t rows = std::min(c, k - s);
        const int64_t* ri = idx.data() + s;
        gather_rows<scalar_t, acc_t>(x, p.input.stride(0), D, ri, 0, rows, xk);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = ri[r];
          cr.set(h, r, scored(t[i], V, ignore_index) ? t[i] : -1, lse_all[i], (per_row ? gp[i] : gp[0]) * rs[i]);
        }
        acc_t* dxk = need_input ? dxbuf.mutable_data_ptr<acc_t>() : nullptr;
        chunk_backward<acc_t>(h, xk, rows, cr, nullptr, scratch.mutable_data_ptr<acc_t>(), dxk,
                              need_input ? partial.mutable_data_ptr<acc_t>() : nullptr,
                              need_weight ? dW.mutable_data_ptr<acc_t>() : nullptr,
                              need_bias ? db.mutable_data_ptr<acc_t>() : nullptr, /*first=*/s == 0);
        if (need_input) {
          scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
          for (int64_t r = 0; r < rows; ++r) store_block<scalar_t, acc_t>(dxk + r * D, D, gi + ri[r] * D);
        }
      }
    });
  }
  if (k == 0) {  // nothing kept: zero gradients (no chunk wrote them)
    if (need_weight) dW.zero_();
    if (need_bias) db.zero_();
  }
  at::Tensor grad_weight = need_weight ? finish_grad(dW, W_.scalar_type()) : empty_cpu({0}, W_.scalar_type());
  at::Tensor grad_bias = need_bias ? finish_grad(db, b_->scalar_type()) : empty_cpu({0}, st);
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
linear_ce_keep_all_cpu(const at::Tensor& input_, const at::Tensor& W_, const std::optional<at::Tensor>& b_,
                       const at::Tensor& target_, const std::optional<at::Tensor>& weight_, bool easiest,
                       int64_t ignore_index, double label_smoothing, int64_t reduction, int64_t chunk_size,
                       int64_t grad_mask, double logit_softcap, double z_loss) {
  TORCH_CHECK(reduction == kMean || reduction == kSum, "fused_trim: linear_ce_keep_all takes mean or sum, got code ",
              reduction);
  const Prepared p = prepare(input_, W_, b_, target_, weight_);
  const int64_t N = p.N, D = p.D, V = p.V;
  const auto st = p.input.scalar_type();
  const auto acc_st = acc_type_of(st);
  const bool need_input = grad_mask & kGradInput;
  const bool need_bias = (grad_mask & kGradBias) && p.bias.defined();
  at::Tensor losses = empty_cpu({N}, acc_st);
  at::Tensor lse = empty_cpu({N}, acc_st);
  at::Tensor out = empty_cpu({}, st);
  at::Tensor kept = empty_cpu({N}, at::kBool);
  at::Tensor k_t = empty_cpu({}, at::kLong);
  at::Tensor threshold = empty_cpu({}, st);
  at::Tensor rowscale = empty_cpu({N}, acc_st);
  at::Tensor gscale = empty_cpu({}, acc_st);
  // The unscaled gradients, kept for the backward (which scales them with linear_ce_scale).
  at::Tensor dx = need_input ? empty_large({N, D}, at::TensorOptions().dtype(acc_st)) : empty_cpu({0}, acc_st);
  // d linear_weight is accumulated whether or not it is wanted (the GEMM of d input needs the
  // same dlogits; d linear_weight alone is a third of the work).
  const bool need_weight = grad_mask & kGradWeight;
  at::Tensor dW = need_weight ? empty_large({V, D}, at::TensorOptions().dtype(acc_st)) : empty_cpu({0}, acc_st);
  at::Tensor db = need_bias ? empty_cpu({V}, acc_st) : empty_cpu({0}, acc_st);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "linear_ce_keep_all_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Head<acc_t> h = head_of<acc_t>(p, label_smoothing, logit_softcap, z_loss);
    keep_all_chunks<scalar_t, acc_t>(p, h, ignore_index, chunk_size, losses.mutable_data_ptr<acc_t>(),
                                     lse.mutable_data_ptr<acc_t>(), need_input ? dx.mutable_data_ptr<acc_t>() : nullptr,
                                     need_weight ? dW.mutable_data_ptr<acc_t>() : nullptr,
                                     need_bias ? db.mutable_data_ptr<acc_t>() : nullptr);
    if (N == 0) {
      if (need_weight) dW.zero_();
      if (need_bias) db.zero_();
    }
    const double denom = select_and_reduce<scalar_t, acc_t>(
        losses.const_data_ptr<acc_t>(), p.target.const_data_ptr<int64_t>(), h.w, N, ignore_index, easiest, 1.0, -1,
        reduction, out, kept, k_t, threshold, rowscale);
    // The backward's factor: grad_out / denominator ("mean") or grad_out ("sum"); 0 when nothing is
    // kept (the gradient is then zero, as the unscaled one already is).
    const bool none_kept = *k_t.const_data_ptr<int64_t>() == 0;
    *gscale.mutable_data_ptr<acc_t>() =
        none_kept ? acc_t(0) : (reduction == kMean ? static_cast<acc_t>(1.0 / denom) : acc_t(1));
  });
  return {out, losses, kept, k_t, threshold, gscale, dx, dW, db, lse};
}

// The keep-all backward: `grad` (accumulation type) times the 0-dim `factor`, as `dtype`.
at::Tensor linear_ce_scale_cpu(const at::Tensor& grad, const at::Tensor& factor, at::ScalarType dtype) {
  return finish_grad(grad.contiguous(), dtype, factor.item<double>());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fused_trim, m) {
  m.def(
      "linear_ce_rows(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? weight, "
      "int ignore_index, float label_smoothing, int chunk_size, float logit_softcap=0.0, float z_loss=0.0) "
      "-> (Tensor losses, Tensor lse)");
  m.def(
      "linear_ce_trimmed(Tensor losses, Tensor lse, Tensor input, Tensor linear_weight, Tensor? linear_bias, "
      "Tensor target, Tensor? weight, float keep_ratio, Tensor? keep_ratio_t, bool easiest, int ignore_index, "
      "float label_smoothing, int reduction, int chunk_size, Tensor? score_offset=None, float logit_softcap=0.0, "
      "float z_loss=0.0) "
      "-> (Tensor out, Tensor kept, Tensor k, Tensor threshold, Tensor rowscale)");
  m.def(
      "linear_ce_bwd(Tensor grad_out, Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
      "Tensor? weight, Tensor lse, Tensor kept, Tensor rowscale, int ignore_index, float label_smoothing, "
      "int chunk_size, int grad_mask, float logit_softcap=0.0, float z_loss=0.0) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "linear_ce_keep_all(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, Tensor? weight, "
      "bool easiest, int ignore_index, float label_smoothing, int reduction, int chunk_size, int grad_mask, "
      "float logit_softcap=0.0, float z_loss=0.0) "
      "-> (Tensor out, Tensor losses, Tensor kept, Tensor k, Tensor threshold, Tensor gscale, Tensor grad_input, "
      "Tensor grad_weight, Tensor grad_bias, Tensor lse)");
  m.def("linear_ce_scale(Tensor grad, Tensor factor, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_trim, CPU, m) {
  m.impl("linear_ce_rows", &linear_ce_rows_cpu);
  m.impl("linear_ce_trimmed", &linear_ce_trimmed_cpu);
  m.impl("linear_ce_bwd", &linear_ce_bwd_cpu);
  m.impl("linear_ce_keep_all", &linear_ce_keep_all_cpu);
  m.impl("linear_ce_scale", &linear_ce_scale_cpu);
}

}  // namespace fused_trim
