// y = x @ w for a few rows of x, streaming the weight once for all rows (the decode step's MatMul).
//
// x (M, K) float32 row-major, w (K, N) float32 row-major (Linear's (in, out) layout), or its bfloat16 bit
// patterns (uint16, cpu_common.h: each value widened exactly as it is read, half the bytes to stream), y (M, N).
// A MindSpore "aot" Custom CPU kernel: RowsMatMul(nparam=3, params={x, w, y}, ...).
//
// Why: oneDNN 2.2's gemm (MindSpore 2.7.2's CPU MatMul) reads the weight once only for 1 row; for
// 2-15 rows it packs or re-reads it, so a memory-bound decode step of 8 sequences costs 2-3.4x that
// of 1. Here each thread owns a range of output columns, cut into panels; within a panel k runs
// over all of K while the partial sums of up to 16 rows stay in registers / L1, so every weight
// element is loaded from memory once per call whatever M is (rows beyond 16 take further passes).
// Summation is in k order per output, one float32 multiply-add per term, over all of K or (a decoder
// matrix, see run_halves) over each half of K, the second half's sum added to the first's.
// Built by cogvlm2/cogvlm2_cpu_kernels.py (g++ -O3 -march=native -std=c++17 -shared -fPIC -pthread).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_common.h"

namespace {

using cogvlm2::kLanes;
using cogvlm2::vec;

constexpr int kMaxRows = 16;

// kLanes values of a row of w (float32, or bfloat16 bits widened), and one value
inline vec load_w(const float *p) { return *reinterpret_cast<const vec *>(p); }
inline vec load_w(const uint16_t *p) { return cogvlm2::widen_bf16(p); }
inline float value_w(const float *p) { return *p; }
inline float value_w(const uint16_t *p) { return cogvlm2::widen_bf16(*p); }

// A panel of columns [j0, j0 + P) for MR rows: the partial sums of the panel live in `acc` (MR x P
// floats, L1/L2-resident); k advances in groups of kGroup rows of w, and for each vector of columns the
// MR sums stay in registers over the group. So w is read row after row, each row segment once, as
// kGroup contiguous streams, and the sums go through cache only once per group.
//
// Rows of w per pass over a panel's sums (concurrent read streams): 8, and 16 for bfloat16 weights, whose
// rows are half the bytes (with narrow panels of twice the columns, the same 2 KiB runs: the decoder's
// 1024 x 1536 bfloat16 qkv at 1 row, standalone, 0.187 -> 0.135 ms; 1024 x 2816 0.347 -> 0.307 ms)
template <typename W>
constexpr int kGroupOf = sizeof(W) == sizeof(float) ? 8 : 16;
// Columns per panel. Narrow panels keep a small product's sums in L1; a wide matrix (the lm_head) gets
// wide panels, so each of the kGroup streams reads 32 KiB contiguous runs of a weight row instead of
// 2 KiB ones, which the hardware prefetcher follows (lm_head 1024x128256 at 8 rows, standalone on the
// 2-core machine: 48.7 ms with 512-column panels, 35.9-39.7 ms with 8192; 4-12 MB matrices were
// 1.6x slower with 8192).
constexpr int64_t kNarrowPanel = 512;   // 16 rows x 512 floats of sums = 32 KiB (L1)
constexpr int64_t kWidePanel = 8192;    // 16 rows x 8192 floats = 512 KiB (L2)
constexpr int64_t kWideFrom = 16384;    // a thread's column range from which panels are wide
// Wide panels of bfloat16 weights are twice as many columns, the same 32 KiB runs of a weight row: the
// lm_head in bfloat16 at 1 row, standalone, 9.76 -> 8.87 ms (29.6 GB/s; 17.2 ms from float32 weights).
template <typename W>
constexpr int64_t kWidePanelOf = kWidePanel * int64_t{sizeof(float) / sizeof(W)};

template <int MR, typename W>
void panel(const float *x, int64_t ldx, const W *w, float *y, int64_t K, int64_t N, int64_t j0, int64_t P,
           float *acc) {
  const int64_t nv = P / kLanes;   // whole vectors; the caller handles the scalar tail
  std::memset(acc, 0, sizeof(float) * MR * P);
  int64_t k = 0;
  constexpr int kGroup = kGroupOf<W>;
  for (; k + kGroup <= K; k += kGroup) {
    const W *wk = w + k * N + j0;
    float xs[MR][kGroup];
    for (int m = 0; m < MR; ++m)
      for (int g = 0; g < kGroup; ++g) xs[m][g] = x[m * ldx + k + g];
    for (int64_t v = 0; v < nv; ++v) {
      vec a[MR];
      for (int m = 0; m < MR; ++m) a[m] = *reinterpret_cast<const vec *>(acc + m * P + v * kLanes);
      for (int g = 0; g < kGroup; ++g) {
        const vec wv = load_w(wk + g * N + v * kLanes);
        for (int m = 0; m < MR; ++m) a[m] += xs[m][g] * wv;
      }
      for (int m = 0; m < MR; ++m) *reinterpret_cast<vec *>(acc + m * P + v * kLanes) = a[m];
    }
  }
  for (; k < K; ++k) {
    const W *wk = w + k * N + j0;
    for (int64_t v = 0; v < nv; ++v) {
      const vec wv = load_w(wk + v * kLanes);
      for (int m = 0; m < MR; ++m) {
        vec *a = reinterpret_cast<vec *>(acc + m * P + v * kLanes);
        *a += x[m * ldx + k] * wv;
      }
    }
  }
  for (int m = 0; m < MR; ++m) std::memcpy(y + m * N + j0, acc + m * P, sizeof(float) * nv * kLanes);
}

// The calling thread's panel sums: allocated once per thread (MindSpore's and the pool's threads live
// for the process, so this is not per call).
float *panel_sums() {
  struct Free { void operator()(float *p) const { std::free(p); } };
  static thread_local std::unique_ptr<float, Free> sums;
  if (!sums) sums.reset(static_cast<float *>(std::aligned_alloc(64, sizeof(float) * kMaxRows * kWidePanelOf<uint16_t>)));
  return sums.get();
}

// columns [j0, j1) for rows 0..MR-1: panels of whole vectors, then scalar columns
template <int MR, typename W>
void columns(const float *x, int64_t ldx, const W *w, float *y, int64_t K, int64_t N, int64_t j0, int64_t j1,
             bool wide) {
  float *acc = panel_sums();
  const int64_t narrow = kNarrowPanel * int64_t{sizeof(float) / sizeof(W)};   // 2 KiB runs of a weight row
  const int64_t width = wide ? kWidePanelOf<W> : narrow;
  int64_t j = j0;
  for (; j + kLanes <= j1; j += width) {
    const int64_t P = std::min<int64_t>(width, (j1 - j) / kLanes * kLanes);
    panel<MR, W>(x, ldx, w, y, K, N, j, P, acc);
    if (P < width) { j += P; break; }
  }
  for (; j < j1; ++j)
    for (int m = 0; m < MR; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s = std::fma(x[m * ldx + k], value_w(w + k * N + j), s);   // as the vectors: fused
      y[m * N + j] = s;
    }
}

template <typename W>
using columns_fn = void (*)(const float *, int64_t, const W *, float *, int64_t, int64_t, int64_t, int64_t, bool);

template <typename W, int... MR>
struct Table {
  static constexpr columns_fn<W> fns[sizeof...(MR)] = {&columns<MR, W>...};
};

// y[:, j0:j1] = x[:, k0:k1] @ w[k0:k1, j0:j1] (x's rows are ldx apart, y's N), in wide or narrow panels
template <typename W>
void run(const float *x, int64_t ldx, const W *w, float *y, int64_t M, int64_t k0, int64_t k1, int64_t N,
         int64_t j0, int64_t j1, bool wide) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const int64_t rows = std::min<int64_t>(kMaxRows, M - m0);
    const columns_fn<W> columns_of = Table<W, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16>::fns[rows - 1];
    columns_of(x + m0 * ldx + k0, ldx, w + k0 * N, y + m0 * N, k1 - k0, N, j0, j1, wide);
  }
}

// A weight narrower than two threads' wide panels (every decoder matrix, not the lm_head) is cut along K
// into kHalves contiguous blocks of rows: a thread streams one block front to back, where a range of
// columns would read 1-3 KiB runs of every row (the bench decoder's 2-6 MB bfloat16 matrices, read from
// memory in a decode step: gate/up 0.30 -> 0.23 ms, down 0.39 -> 0.30 ms at 1 row, standalone, from
// memory). The second half's sums go to a buffer and are added after. Where K is cut depends on the shape
// only, not on the weight's dtype or the thread count, so bfloat16 bits and float32 weights of the same
// values still give the same bits, on any number of threads.
constexpr int kHalves = 2;
constexpr int64_t kSplitBelow = 2 * kWideFrom;   // columns
constexpr int64_t kSplitFrom = int64_t(1) << 18;  // values (a float32 megabyte: a second thread's worth)
constexpr int64_t kCutEvery = 16;                 // K is cut at a multiple of every kGroup
static_assert(kCutEvery % kGroupOf<float> == 0 && kCutEvery % kGroupOf<uint16_t> == 0, "cut within a group");

bool split_k(int64_t K, int64_t N) { return N < kSplitBelow && K >= 16 * kCutEvery && K * N >= kSplitFrom; }

// The calling thread's buffer for the second half's sums (M x N), grown as needed.
float *half_sums(int64_t values) {
  static thread_local std::vector<float> sums;
  if (static_cast<int64_t>(sums.size()) < values) sums.resize(static_cast<size_t>(values));
  return sums.data();
}

template <typename W>
void run_halves(const float *x, const W *w, float *y, int64_t M, int64_t K, int64_t N) {
  const int64_t middle = K / 2 / kCutEvery * kCutEvery;
  float *second = half_sums(M * N);
  // task: rows [0, middle) of w into y or [middle, K) into `second`, on a range of columns
  cogvlm2::parallel(cogvlm2::cpu_count(), [&](int t, int n) {
    const int columns = std::max(1, n / kHalves);
    for (int task = t; task < kHalves * columns; task += n) {
      const int half = task % kHalves, c = task / kHalves;
      const int64_t blocks = (N + 63) / 64;
      const int64_t j0 = std::min(N, blocks * c / columns * 64), j1 = std::min(N, blocks * (c + 1) / columns * 64);
      if (half == 0)
        run(x, K, w, y, M, 0, middle, N, j0, j1, true);
      else
        run(x, K, w, second, M, middle, K, N, j0, j1, true);
    }
  });
  for (int64_t i = 0; i < M * N; ++i) y[i] += second[i];
}

}  // namespace

extern "C" int RowsMatMul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2) return 1;
  const bool bits = cogvlm2::is_bf16_bits(dtypes[1]);
  for (int i = 0; i < 3; ++i)
    if (!cogvlm2::is_float32(dtypes[i]) && !(i == 1 && bits)) return 2;
  const int64_t M = shapes[0][0], K = shapes[0][1], N = shapes[1][1];
  if (shapes[1][0] != K || shapes[2][0] != M || shapes[2][1] != N) return 3;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[2]);
  if (M == 0 || N == 0) return 0;
  // a thread per 1 MB of weight, so small products (and the scalar tests) stay on the calling thread.
  // With the pool a worker costs a wake-up, not a thread start: whole slot decode steps of the bench
  // model (loaded machine, interleaved) took 85.8 / 74.5 / 85.7 ms at batch 1 and 96.1 / 89.4 / 100.3
  // ms at batch 8 with a thread per 4 MB / 1 MB / 256 KB.
  const int64_t blocks = (N + 63) / 64;
  const int64_t per_thread = int64_t(1) << 20;
  const int64_t wanted = (K * N * int64_t(bits ? sizeof(uint16_t) : sizeof(float)) + per_thread - 1) / per_thread;
  if (split_k(K, N)) {
    if (bits)
      run_halves(x, static_cast<const uint16_t *>(params[1]), y, M, K, N);
    else
      run_halves(x, static_cast<const float *>(params[1]), y, M, K, N);
    return 0;
  }
  // one contiguous column range per thread, in whole 64-column blocks
  cogvlm2::parallel(std::min(wanted, blocks), [&](int t, int n) {
    const int64_t j0 = std::min(N, blocks * t / n * 64), j1 = std::min(N, blocks * (t + 1) / n * 64);
    if (bits)
      run(x, K, static_cast<const uint16_t *>(params[1]), y, M, 0, K, N, j0, j1, j1 - j0 >= kWideFrom);
    else
      run(x, K, static_cast<const float *>(params[1]), y, M, 0, K, N, j0, j1, j1 - j0 >= kWideFrom);
  });
  return 0;
}

// Output shape for MindSpore's graph compiler and its dynamic-shape runtime: (M, N). The third
// argument is MindSpore's AotExtra*, unused here.
extern "C" std::vector<int64_t> RowsMatMulInferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)ndims;
  (void)extra;
  return {shapes[0][0], shapes[1][1]};
}
