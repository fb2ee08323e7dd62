// y = x @ w in float32 on the AMX bf16 tile unit, to float32 accuracy ("bf16x3"): the products of
// prefill and of the vision tower (products of fewer than 16 rows go to the rows kernel).
//
// x (M, K), w (K, N) (Linear's (in, out) layout), y (M, N), all float32 row-major; w may also be the bit
// patterns of bfloat16 weights (uint16, cpu_common.h), widened exactly as they are split: the same bits.
// A MindSpore "aot" Custom CPU kernel: AmxMatMul(nparam=3, params={x, w, y}, ...), and AmxLinear
// (nparam=4, {x, w, bias (N,), y}) for y = x @ w + bias, the bias added as the last chunk's sums are
// stored: a biased Linear in one kernel instead of a product and MindSpore's BiasAdd. Two more take the
// step after a Linear of the vision tower into the same kernel (the epilogue):
// - AmxLinearGelu (the same params): y = GELU(x @ w + bias), the MLP's fc1 and its GELU (gelu.h);
// - AmxLinearNormAdd ({x, w, bias, norm_weight (N,), norm_bias (N,), eps (1,), residual (M, N), y}):
//   y = residual + LayerNorm(x @ w + bias) (layer_norm.h), the end of each branch of an EVA layer;
// - AmxGated ({x, w_gate, w_up, y}): y = silu(x @ w_gate) * (x @ w_up) (silu.h), SwiGLU's two products
//   and their product in one kernel: each block's gate sums wait in a per-thread buffer for the same
//   block of up sums, so neither product is written out and read back.
// Their row work runs on the vector units while the tile unit multiplies the next block (deferred:
// `Pending`), and gives the bits of the separate kernels and MindSpore's Add in turn.
//
// How: every float32 value v is cut into three bfloat16 parts, hi = bf16(v), mid = bf16(v - hi),
// lo = bf16(v - hi - mid) (round to nearest; the subtractions are exact), so v = hi + mid + lo to within
// 2^-24 |v|, the rounding of float32 itself. A product a * b is then the six part products down to
// 2^-16 |a b| (hi*hi, hi*mid, mid*hi, hi*lo, mid*mid, lo*hi); the three left out are below 2^-23 |a b|.
// Each part product is exact in float32 and TDPBF16PS adds them into float32 accumulators, so a
// K-term dot product has the error of a float32 one (K * 2^-24 scale), not bf16's 2^-8.
// Six tile products per term against one float32 FMA: the tile unit does 1024 bf16 flops per cycle
// and core, AVX-512 float32 FMA 64, so the ceiling is 2.7x float32's. Weights given as bfloat16 (their
// bits, a bf16 checkpoint's) are their own hi part: three tile products per term, the same sums.
//
// Blocking: one operand is converted into its three parts once per call, rows / columns padded to 32
// and K to 32 (zeros); the other is converted piece by piece, each piece once, into a per-thread buffer
// that stays in cache beside the tiles it is multiplied with:
// - through the columns (wide products, and any whose w parts do not fit in L2): all of x's parts, then
//   each thread takes panels of up to 128 columns of w and, chunk by chunk of up to 1024 values of K,
//   converts the panel's chunk (768 KiB, in L2 with the 192 KiB of x a block reads);
// - through the rows (tall products, M > N, whose w parts fit in L2: the vision tower's): all of w's
//   parts, then each thread takes an even share of the 32 x 32 output blocks, row block by row block,
//   and converts each 32-row block of x it meets chunk by chunk of K (where L2 holds two, the next one
//   under the current one's tile products). x, the larger operand, is then read once (twice for a row
//   block two threads share), not once per panel of w.
// For each 32-row block of x and 32-column block of w the 2 x 2 tiles of sums (C) stay in the tile
// registers over the chunk: per 32 values of K, 24 tile products on 2 A tiles and 2 B tiles reloaded
// part by part. Each chunk's sums start from zero and are added to y in float32, so a long K is summed
// in chunks, as blocked float32 GEMMs do, not in one running sum; both ways give the same bits.
// Built by cogvlm2/cogvlm2_cpu_kernels.py (g++ -O3 -march=native ...): compiled only where the compiler
// targets AMX-BF16 (else AmxMatMulAvailable() is 0); at run time the process must be granted the tile
// state by the kernel (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16+).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cpu_common.h"
#include "gelu.h"
#include "layer_norm.h"
#include "silu.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define COGVLM2_AMX 1
#endif

extern "C" int RowsMatMul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra);   // rows_matmul.cc

namespace {

// Fewer rows than this go to the rows kernel: the tile path pads rows to 32, and a product of a few
// rows is bound by reading w, which the rows kernel does once (prefill's lm_head row, short prompts).
constexpr int64_t kMinRows = 16;

// What a product's stored sums get after the bias: GELU of each value, the residual plus the LayerNorm
// of each (whole) row, or silu of the gate sums times each value.
struct Epilogue {
  bool gelu = false;
  const float *residual = nullptr;                     // (M, N): residual + LayerNorm, with these
  const float *norm_weight = nullptr, *norm_bias = nullptr;
  double eps = 0;
  const float *gate = nullptr;                         // y[m, n] *= silu(gate[m * gate_stride + n - gate_n0])
  int64_t gate_stride = 0, gate_n0 = 0;
  bool any() const { return gelu || residual != nullptr || gate != nullptr; }
};

// w (and w_up) as the op gets it: float32 values or bfloat16 bit patterns.
struct Weights {
  const void *data = nullptr;
  bool bits = false;
};

constexpr int64_t kRowWorkPerThread = 1 << 14;   // values of a LayerNorm pass after a product per thread

// The epilogue of y's rows [m0, m0 + rows), columns [n0, n0 + width) (whole rows for the LayerNorm), in place.
void epilogue_rows(const Epilogue &e, float *y, int64_t N, int64_t m0, int64_t n0, int64_t width, int64_t rows) {
  for (int64_t m = m0; m < m0 + rows; ++m) {
    float *row = y + m * N + n0;
    if (e.gelu)
      cogvlm2::gelu::gelu_span(row, row, width);
    else if (e.gate != nullptr)
      cogvlm2::silu::silu_mul_span(e.gate + m * e.gate_stride + n0 - e.gate_n0, row, row, width);
    else
      cogvlm2::layer_norm::normalize_row(row, e.norm_weight, e.norm_bias, row, width, e.eps, e.residual + m * N);
  }
}

// slice() calls per step of K in block_sums (block_sums_bf16: kSlicesPerStepBf16), one after each group of
// four tile products but the first:
// fc1's GELU a row at a time over 5 slices per step, the first step's skipped, cost 1.08x less than two
// rows at a time over 2 slices per step (through ctypes; skipping two or four steps' slices, two rows at a
// time, cost more than either).
constexpr int kSlicesPerStep = 5;

// Row work done a row or a few at a time between the tile products of the next blocks (`slice`,
// kSlicesPerStep or kSlicesPerStepBf16 times per step of K): the vector units are idle while the tile unit
// multiplies, so it costs little there, where the same work between blocks stalls the tile unit (GELU of fc1's sums at
// store time: no faster than the product and the GELU kernel in turn). `rows(i)` does row i of `count`;
// they are spread evenly over `slices` slices but the first step's `per_step` (the next block's first step).
template <typename Rows>
struct Spread {
  Rows rows;
  int count = 0, done = 0;
  int64_t slots = 0, slot = 0;    // the slices that do rows, and those passed (the first step's skip)

  // what still waited is done first
  void start(const Rows &rows_, int count_, int64_t slices, int per_step) {
    finish();
    rows = rows_;
    count = count_;
    done = 0;
    slot = slices > per_step ? -per_step : 0;
    slots = std::max<int64_t>(slices + std::min<int64_t>(slot, 0), 1);
  }
  // not inlined into block_sums, whose tile loop it would otherwise crowd (1.1x slower for fc1's GELU)
  __attribute__((noinline)) void run(int n) {
    for (; n > 0 && done < count; --n, ++done) rows(done);
  }
  void slice() {
    if (done < count && ++slot > 0) {
      const int due = static_cast<int>(std::min<int64_t>((slot * count + slots - 1) / slots, count));
      if (due > done) run(due - done);
    }
  }
  void finish() { run(count - done); }
};

// Stored rows of y whose epilogue waits: row i is y's row m0 + i, columns [n0, n0 + width).
struct EpilogueRows {
  const Epilogue *epilogue = nullptr;
  float *y = nullptr;
  int64_t N = 0, m0 = 0, n0 = 0, width = 0;
  void operator()(int i) const { epilogue_rows(*epilogue, y, N, m0 + i, n0, width, 1); }
};
using Pending = Spread<EpilogueRows>;

#ifdef COGVLM2_AMX

constexpr int kTile = 16;          // rows of a tile; columns of a C tile (16 floats = 64 bytes)
constexpr int64_t kStep = 32;      // values of K per tile row (32 bf16 = 64 bytes)
constexpr int64_t kBlock = 32;     // rows / columns of a block of sums (2 x 2 tiles)
constexpr int kParts = 3;          // hi, mid, lo
constexpr int64_t kPanel = 128;    // columns of w a thread converts at once
constexpr int64_t kChunk = 32;     // steps of 32 values of K per chunk

using cogvlm2::round_up;

typedef uint16_t bf16;

// The process may use the tile registers: the CPU has them and Linux grants their state.
bool amx_ready() {
  static const bool ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                    18 /* XFEATURE_XTILEDATA */) == 0;
  return ready;
}

// Tile configuration: palette 1, tiles 0-7 all 16 rows x 64 bytes. Per thread (ldtilecfg).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = kTile;
    }
  }
};

// 16 floats -> the next bf16 part (round to nearest even), and v minus it (exact).
inline __m256i take_part(__m512 &v) {
  const __m256i part = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  v = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(part), 16)));
  return part;
}

inline __mmask16 lanes(int64_t valid) {
  return valid >= 16 ? __mmask16(0xFFFF) : valid <= 0 ? __mmask16(0) : __mmask16((1u << valid) - 1);
}

// Both operands are stored as whole tiles, 16 rows x 64 bytes contiguous (1 KiB), so a tile load reads
// 16 consecutive cache lines. A tile of x: 16 rows x 32 values of K; a tile of w: 16 (k, k + 1) pairs x
// 16 columns. For a 16-row (16-column) strip, step s (values 32 s .. 32 s + 31 of K), part p:
// strip + (s * parts + p) * kTileSize, parts = kParts, or 1 for w given as bfloat16 (its values are their
// own hi part; mid and lo are zero and their products are left out: `block_sums_bf16`).
constexpr int64_t kTileSize = kTile * kStep;        // bf16 values per tile

// Values [k0, k0 + 32 * steps) of x row m -> a, the parts of rows from r0 (a multiple of 16) in 16-row
// strips (strip t at a + t * steps * kParts * kTileSize); a row beyond M and values beyond K are zeros.
inline void convert_row(const float *x, int64_t M, int64_t K, int64_t k0, int64_t steps, int64_t m, int64_t r0,
                        bf16 *a) {
  bf16 *strip = a + ((m - r0) / kTile) * steps * kParts * kTileSize + (m % kTile) * kStep;
  for (int64_t k = 0; k < steps * kStep; k += 16) {
    __m512 v = m < M ? _mm512_maskz_loadu_ps(lanes(K - k0 - k), x + m * K + k0 + k) : _mm512_setzero_ps();
    bf16 *at = strip + (k / kStep) * kParts * kTileSize + k % kStep;
    for (int p = 0; p < kParts; ++p)
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(at + p * kTileSize), take_part(v));
  }
}

// Rows [r0, r1) of x (r0 a multiple of 16) -> a, as convert_row.
void convert_rows(const float *x, int64_t M, int64_t K, int64_t k0, int64_t steps, int64_t r0, int64_t r1,
                  bf16 *a) {
  for (int64_t m = r0; m < r1; ++m) convert_row(x, M, K, k0, steps, m, r0, a);
}

// The next block of x's rows, split into its parts while the current block's tile products run: row i is
// x's row m0 + i (values [k0, k0 + 32 * steps)) into a.
struct XRows {
  const float *x = nullptr;
  int64_t M = 0, K = 0, k0 = 0, steps = 0, m0 = 0;
  bf16 *a = nullptr;
  void operator()(int i) const { convert_row(x, M, K, k0, steps, m0 + i, m0, a); }
};

// What runs under rows_through's tile products: the stored blocks' epilogue and the next block of x.
struct Background {
  Pending pending;
  Spread<XRows> ahead;
  void slice() {
    pending.slice();
    ahead.slice();
  }
};

// 16 values of w from index `at` (lanes beyond `valid` zero), as float32
inline __m512 load_w(const Weights &w, int64_t at, __mmask16 valid) {
  if (w.bits) {
    const __m256i bits = _mm256_maskz_loadu_epi16(valid, static_cast<const uint16_t *>(w.data) + at);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
  }
  return _mm512_maskz_loadu_ps(valid, static_cast<const float *>(w.data) + at);
}

inline const char *address_w(const Weights &w, int64_t at) {
  return static_cast<const char *>(w.data) + at * (w.bits ? int64_t{sizeof(uint16_t)} : int64_t{sizeof(float)});
}

// The parts a value of w is cut into: three, or one for bfloat16 weights.
inline int w_parts(const Weights &w) { return w.bits ? 1 : kParts; }

// Rows [k0, k0 + 32 * steps) x columns [n0, n0 + width) of w -> b in 16-column strips (strip j at
// b + j * steps * w_parts(w) * kTileSize), each tile row holding 16 columns' (k, k + 1) pairs. Columns
// beyond N and rows beyond K are zeros.
constexpr int64_t kAhead = 8;     // rows of w prefetched ahead

void convert_panel(const Weights &w, int64_t K, int64_t N, int64_t k0, int64_t steps, int64_t n0, int64_t width,
                   bf16 *b) {
  const int parts = w_parts(w);
  for (int64_t kp = 0; kp < steps * kTile; ++kp) {
    const int64_t k = k0 + 2 * kp;
    bf16 *row = b + (kp / kTile) * parts * kTileSize + (kp % kTile) * kStep;
    for (int64_t c = 0; c < width; c += 16) {
      // w is usually not in cache (other ops ran since its last use) and is read down its rows
      if (k + kAhead + 1 < K) {
        _mm_prefetch(address_w(w, (k + kAhead) * N + n0 + c), _MM_HINT_T0);
        _mm_prefetch(address_w(w, (k + kAhead + 1) * N + n0 + c), _MM_HINT_T0);
      }
      const __mmask16 valid = lanes(N - n0 - c);
      __m512 even = k < K ? load_w(w, k * N + n0 + c, valid) : _mm512_setzero_ps();
      __m512 odd = k + 1 < K ? load_w(w, (k + 1) * N + n0 + c, valid) : _mm512_setzero_ps();
      bf16 *at = row + (c / 16) * steps * parts * kTileSize;
      for (int p = 0; p < parts; ++p) {
        const __m512i lo = _mm512_cvtepu16_epi32(take_part(even));
        const __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(take_part(odd)), 16);
        _mm512_storeu_si512(at + p * kTileSize, _mm512_or_si512(lo, hi));
      }
    }
  }
}

// Tiles: 0-3 the sums C[r][c] (tile 2r + c), 4-5 the A strips r = 0, 1, 6-7 the B strips c = 0, 1.
// Tiles are not renamed: a load waits until the products reading the tile it replaces are done, and a
// product waits for its loads. So each load is issued as soon as its tile's last product is, with two
// products on the other tiles to run meanwhile.
// The 32 x 32 sums over `steps` steps of two A strips (a0, a0 + a_strip) and two B strips (b0,
// b0 + b_strip), from zero, into the C tiles; kSlicesPerStep slices of `work` (Pending, Background) per step.
template <typename Work>
inline void block_sums(const bf16 *a0, int64_t a_strip, const bf16 *b0, int64_t b_strip, int64_t steps, Work &work) {
  const bf16 *a1 = a0 + a_strip, *b1 = b0 + b_strip;
  constexpr int64_t kMid = kTileSize, kLo = 2 * kTileSize, kNext = kParts * kTileSize;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a0, 64);
  _tile_loadd(5, a1, 64);
  _tile_loadd(6, b0, 64);
  _tile_loadd(7, b1, 64);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t at = s * kNext;
    const bf16 *ah = a0 + at, *ah1 = a1 + at, *bh = b0 + at, *bh1 = b1 + at;
    // hi x hi
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    _tile_loadd(6, bh + kMid, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(7, bh1 + kMid, 64);
    // hi x mid
    work.slice();
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    _tile_loadd(6, bh + kLo, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(7, bh1 + kLo, 64);
    // hi x lo
    work.slice();
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(4, ah + kMid, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_loadd(6, bh + kMid, 64);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(5, ah1 + kMid, 64);
    _tile_loadd(7, bh1 + kMid, 64);
    // mid x mid
    work.slice();
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    _tile_loadd(6, bh, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(7, bh1, 64);
    // mid x hi
    work.slice();
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(4, ah + kLo, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(5, ah1 + kLo, 64);
    // lo x hi, then the next step's hi parts
    work.slice();
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (s + 1 < steps) _tile_loadd(4, ah + kNext, 64);
    _tile_dpbf16ps(2, 5, 6);
    if (s + 1 < steps) _tile_loadd(6, bh + kNext, 64);
    _tile_dpbf16ps(3, 5, 7);
    if (s + 1 < steps) {
      _tile_loadd(5, ah1 + kNext, 64);
      _tile_loadd(7, bh1 + kNext, 64);
    }
  }
}

// w given as bfloat16 (one part, its values; b_strip and the steps as convert_panel lays them out): the
// three products hi x w, mid x w, lo x w, in the order block_sums takes them among its six. The three it
// adds besides are products with w's mid and lo parts, zero here: the same sums, half the tile products.
// kSlicesPerStepBf16 slices of `work` per step.
constexpr int kSlicesPerStepBf16 = 2;

template <typename Work>
inline void block_sums_bf16(const bf16 *a0, int64_t a_strip, const bf16 *b0, int64_t b_strip, int64_t steps,
                            Work &work) {
  const bf16 *a1 = a0 + a_strip, *b1 = b0 + b_strip;
  constexpr int64_t kMid = kTileSize, kLo = 2 * kTileSize, kNextA = kParts * kTileSize, kNextB = kTileSize;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a0, 64);
  _tile_loadd(5, a1, 64);
  _tile_loadd(6, b0, 64);
  _tile_loadd(7, b1, 64);
  for (int64_t s = 0; s < steps; ++s) {
    const bf16 *ah = a0 + s * kNextA, *ah1 = a1 + s * kNextA, *bh = b0 + s * kNextB, *bh1 = b1 + s * kNextB;
    // hi x w
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(4, ah + kMid, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(5, ah1 + kMid, 64);
    // mid x w
    work.slice();
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(4, ah + kLo, 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(5, ah1 + kLo, 64);
    // lo x w, then the next step's hi parts and w
    work.slice();
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (s + 1 < steps) _tile_loadd(4, ah + kNextA, 64);
    _tile_dpbf16ps(2, 5, 6);
    if (s + 1 < steps) _tile_loadd(6, bh + kNextB, 64);
    _tile_dpbf16ps(3, 5, 7);
    if (s + 1 < steps) {
      _tile_loadd(5, ah1 + kNextA, 64);
      _tile_loadd(7, bh1 + kNextB, 64);
    }
  }
}

// The block's sums for w's parts: block_sums, or block_sums_bf16 for bfloat16 weights.
template <typename Work>
inline void sums_for(const Weights &w, const bf16 *a0, int64_t a_strip, const bf16 *b0, int64_t b_strip,
                     int64_t steps, Work &work) {
  if (w.bits)
    block_sums_bf16(a0, a_strip, b0, b_strip, steps, work);
  else
    block_sums(a0, a_strip, b0, b_strip, steps, work);
}

// The slices of `work` sums_for gives per step of K.
inline int slices_per_step(const Weights &w) { return w.bits ? kSlicesPerStepBf16 : kSlicesPerStep; }

// C tiles -> the block at `out` (rows `stride` floats apart), its first `rows` rows and `cols` columns (at
// most 32 each); added to it unless `first`; plus bias[0 .. cols) if `bias` (given with the last chunk of K).
inline void store_block(float *out, int64_t stride, int64_t rows, int64_t cols, bool first, const float *bias) {
  if (first && bias == nullptr && rows == kBlock && cols == kBlock) {
    const int bytes = static_cast<int>(stride * 4);
    _tile_stored(0, out, bytes);
    _tile_stored(1, out + kTile, bytes);
    _tile_stored(2, out + kTile * stride, bytes);
    _tile_stored(3, out + kTile * stride + kTile, bytes);
    return;
  }
  alignas(64) float c[kBlock * kBlock];
  _tile_stored(0, c, kBlock * 4);
  _tile_stored(1, c + kTile, kBlock * 4);
  _tile_stored(2, c + kTile * kBlock, kBlock * 4);
  _tile_stored(3, c + kTile * kBlock + kTile, kBlock * 4);
  __m512 b[kBlock / 16];                                     // bias[0 ..], zeros beyond cols
  for (int64_t j = 0; j < kBlock; j += 16)
    b[j / 16] = bias != nullptr ? _mm512_maskz_loadu_ps(lanes(cols - j), bias + j) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    float *row = out + r * stride;
    const float *sums = c + r * kBlock;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 valid = lanes(cols - j);
      __m512 v = _mm512_load_ps(sums + j);
      if (!first) v = _mm512_add_ps(_mm512_maskz_loadu_ps(valid, row + j), v);
      if (bias != nullptr) v = _mm512_add_ps(v, b[j / 16]);
      _mm512_mask_storeu_ps(row + j, valid, v);
    }
  }
}

// C tiles -> y rows [m0, m0 + 32) x columns [n, n + 32), clipped to M x N (see store_block).
inline void store_sums(float *y, int64_t M, int64_t N, int64_t m0, int64_t n, bool first, const float *bias) {
  store_block(y + m0 * N + n, N, std::min(kBlock, M - m0), std::min(kBlock, N - n), first,
              bias != nullptr ? bias + n : nullptr);
}

// A per-thread buffer of at least `size` values, 64-byte aligned (a tile row that straddles two cache
// lines halves the tile unit's rate), kept for the thread's next call (no page faults per call).
template <typename T>
struct Buffer {
  struct Free {
    void operator()(T *p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data;
  size_t size = 0;
  T *grown(size_t wanted) {
    if (size < wanted) {
      data.reset(static_cast<T *>(std::aligned_alloc(64, round_up(wanted * sizeof(T), 64))));
      size = wanted;
    }
    return data.get();
  }
};

// x's parts once for the whole call; each thread then takes panels of up to 128 columns of w and
// converts them chunk by chunk of K: w, the larger operand of a wide product (N >= M), is read once.
// Also the products whose w parts would not stay in L2.
// Gated (`w_up` given: y = silu(x @ w) * (x @ w_up)): panels of 64 columns of both, whose parts stay in L2
// together; each block's gate sums go to a per-thread buffer of the panel's columns, the same block's up
// sums to y, and on the last chunk of K the block's silu(gate) * up waits under the next blocks' products.
void columns_through(const float *x, const Weights &w, const Weights &w_up, const float *bias, const Epilogue &epilogue,
                     float *y, int64_t M, int64_t K, int64_t N, int64_t steps) {
  const int64_t Mp = round_up(M, kBlock), strip = steps * kParts * kTileSize;
  static thread_local Buffer<bf16> a_buffer;                        // x's parts
  bf16 *a = a_buffer.grown(static_cast<size_t>(Mp / kTile * strip));
  const int64_t row_strips = Mp / kTile;
  cogvlm2::parallel(row_strips, [&](int t, int n) {
    const int64_t r0 = row_strips * t / n * kTile, r1 = row_strips * (t + 1) / n * kTile;
    convert_rows(x, M, K, 0, steps, r0, r1, a + r0 / kTile * strip);
  });
  const bool gated = w_up.data != nullptr;
  const int64_t panel_width = gated ? kPanel / 2 : kPanel, panels = (N + panel_width - 1) / panel_width;
  cogvlm2::parallel(panels, [&](int t, int n) {
    static thread_local Buffer<bf16> b_buffer, up_buffer;           // a panel of w's (and w_up's) parts
    static thread_local Buffer<float> gate_buffer;                  // gated: the panel's gate sums (Mp, 64)
    static thread_local TileConfig config;
    _tile_loadconfig(&config);
    const int parts = w_parts(w), per_step = slices_per_step(w);
    const size_t panel_values = static_cast<size_t>(panel_width / kTile * std::min(steps, kChunk) * parts * kTileSize);
    bf16 *b = b_buffer.grown(panel_values), *b_up = gated ? up_buffer.grown(panel_values) : nullptr;
    float *gate = gated ? gate_buffer.grown(static_cast<size_t>(Mp * panel_width)) : nullptr;
    Epilogue after = epilogue;                                // gated: silu of this thread's gate sums
    after.gate = gate;
    after.gate_stride = panel_width;
    Pending pending;                                          // a block's GELU or silu(gate) * up
    for (int64_t panel = t; panel < panels; panel += n) {
      const int64_t n0 = panel * panel_width, width = std::min(panel_width, round_up(N - n0, kBlock));
      if (gated) {
        pending.finish();                                     // its gate sums are the last panel's
        after.gate_n0 = n0;
      }
      for (int64_t s0 = 0; s0 < steps; s0 += kChunk) {
        const int64_t chunk = std::min(kChunk, steps - s0), b_strip = chunk * parts * kTileSize;
        convert_panel(w, K, N, s0 * kStep, chunk, n0, width, b);
        if (gated) convert_panel(w_up, K, N, s0 * kStep, chunk, n0, width, b_up);
        const bool last = s0 + chunk == steps;
        for (int64_t m0 = 0; m0 < Mp; m0 += kBlock)
          for (int64_t j = 0; j < width; j += kBlock) {
            const bf16 *a_block = a + m0 / kTile * strip + s0 * kParts * kTileSize;
            const int rows = static_cast<int>(std::min(kBlock, M - m0));
            const int64_t cols = std::min(kBlock, N - n0 - j);
            if (gated) {
              sums_for(w, a_block, strip, b + j / kTile * b_strip, b_strip, chunk, pending);
              store_block(gate + m0 * panel_width + j, panel_width, rows, cols, s0 == 0, nullptr);
              sums_for(w_up, a_block, strip, b_up + j / kTile * b_strip, b_strip, chunk, pending);
            } else {
              sums_for(w, a_block, strip, b + j / kTile * b_strip, b_strip, chunk, pending);
            }
            store_sums(y, M, N, m0, n0 + j, s0 == 0, last ? bias : nullptr);
            if (last && (after.gelu || gated))
              pending.start(EpilogueRows{&after, y, N, m0, n0 + j, cols}, rows,
                            (gated ? 2 : 1) * per_step * chunk, per_step);
          }
      }
    }
    pending.finish();
    _tile_release();
  });
  if (epilogue.residual != nullptr)                         // rows are whole only now
    cogvlm2::parallel((M * N + kRowWorkPerThread - 1) / kRowWorkPerThread, [&](int t, int n) {
      epilogue_rows(epilogue, y, N, M * t / n, 0, N, M * (t + 1) / n - M * t / n);
    });
}

// The L2 cache of a core in bytes (2 MiB if the system does not say).
int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long size = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return size > 0 ? static_cast<int64_t>(size) : int64_t{2} << 20;
  }();
  return bytes;
}

// w's parts once for the whole call (they stay in L2); each thread then takes its share of the output
// blocks, converts each 32-row block of x it meets chunk by chunk of K and multiplies it by the block's
// 32-column blocks. For the tall products (M > N, the vision tower's): x, the larger operand, is read
// once instead of once per panel.
void rows_through(const float *x, const Weights &w, const float *bias, const Epilogue &epilogue, float *y,
                  int64_t M, int64_t K, int64_t N, int64_t steps) {
  const int parts = w_parts(w), per_step = slices_per_step(w);
  const int64_t Np = round_up(N, kBlock), strip = steps * parts * kTileSize;   // of w's parts
  static thread_local Buffer<bf16> b_buffer;                        // w's parts
  bf16 *b = b_buffer.grown(static_cast<size_t>(Np / kTile * strip));
  const int64_t column_blocks = Np / kBlock;
  cogvlm2::parallel(column_blocks, [&](int t, int n) {
    const int64_t c0 = column_blocks * t / n * kBlock, c1 = column_blocks * (t + 1) / n * kBlock;
    if (c1 > c0) convert_panel(w, K, N, 0, steps, c0, c1 - c0, b + c0 / kTile * strip);
  });
  // the (32-row block, 32-column block) units split evenly: a thread's first and last row blocks may be
  // shared with its neighbours (each converts that block of x), so the 49 row blocks of 1542 rows do not
  // leave one thread a block behind (1.02-1.05x on the tower's products, ctypes)
  const int64_t row_blocks = round_up(M, kBlock) / kBlock, units = row_blocks * column_blocks;
  int threads = 1;
  cogvlm2::parallel(row_blocks, [&](int t, int n) {
    static thread_local Buffer<bf16> a_buffer;                      // a block of x's parts
    static thread_local TileConfig config;
    _tile_loadconfig(&config);
    if (t == 0) threads = n;
    const size_t block_values = static_cast<size_t>(kBlock / kTile * std::min(steps, kChunk) * kParts * kTileSize);
    bf16 *a = a_buffer.grown(2 * block_values), *a_next = a + block_values;   // this block of x, the next
    // the next block of x is split under this one's tile products where w's parts and both blocks stay in
    // L2 (qkv and dense of the bench tower: 1.05-1.1x for qkv through ctypes); beside fc1's and fc2's
    // 1.5 MiB of w parts they do not (fc2 ahead: 0.93-0.95x), so there the next block is split after this
    // one's products, into the same buffer
    const bool ahead = (Np / kTile * strip + 2 * static_cast<int64_t>(block_values)) * int64_t{sizeof(bf16)} <=
                       l2_bytes() * 3 / 4;
    Background work;                  // a block's GELU, or a row block's residual + LayerNorm; the next x
    const int64_t u0 = units * t / n, u1 = units * (t + 1) / n;
    const int64_t first = u0 / column_blocks, end = (u1 + column_blocks - 1) / column_blocks;
    // this thread's (row block, chunk of K) pairs in turn: each one's x is split under the previous
    // pair's tile products, but the first's
    if (first < end) convert_rows(x, M, K, 0, std::min(kChunk, steps), first * kBlock, first * kBlock + kBlock, a);
    for (int64_t block = first; block < end; ++block) {
      const int64_t m0 = block * kBlock;
      const int rows = static_cast<int>(std::min(kBlock, M - m0));
      const int64_t n_begin = std::max(u0 - block * column_blocks, int64_t{0}) * kBlock;
      const int64_t n_end = std::min(u1 - block * column_blocks, column_blocks) * kBlock;
      for (int64_t s0 = 0; s0 < steps; s0 += kChunk) {
        const int64_t chunk = std::min(kChunk, steps - s0), a_strip = chunk * kParts * kTileSize;
        const bool last = s0 + chunk == steps;
        const int64_t next_block = last ? block + 1 : block, next_s0 = last ? 0 : s0 + kChunk;
        const XRows next{x, M, K, next_s0 * kStep, std::min(kChunk, steps - next_s0), next_block * kBlock,
                         ahead ? a_next : a};
        if (ahead && next_block < end)
          work.ahead.start(next, static_cast<int>(kBlock), per_step * chunk * ((n_end - n_begin) / kBlock), per_step);
        for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlock) {
          sums_for(w, a, a_strip, b + n0 / kTile * strip + s0 * parts * kTileSize, strip, chunk, work);
          store_sums(y, M, N, m0, n0, s0 == 0, last ? bias : nullptr);
          if (last && epilogue.gelu)
            work.pending.start(EpilogueRows{&epilogue, y, N, m0, n0, std::min(kBlock, N - n0)}, rows,
                               per_step * chunk, per_step);
        }
        if (ahead) {
          work.ahead.finish();
          std::swap(a, a_next);
        } else if (next_block < end) {
          convert_rows(x, M, K, next.k0, next.steps, next.m0, next.m0 + kBlock, a);
        }
      }
      // the rows are whole (unless shared): their LayerNorm runs under the next row block's products
      if (epilogue.residual != nullptr && n_begin == 0 && n_end == Np)
        work.pending.start(EpilogueRows{&epilogue, y, N, m0, 0, N}, rows, per_step * steps * column_blocks, per_step);
    }
    work.pending.finish();
    _tile_release();
  });
  if (epilogue.residual != nullptr)                         // the shared row blocks' LayerNorm
    for (int t = 1; t < threads; ++t) {
      const int64_t boundary = units * t / threads;
      if (boundary % column_blocks == 0) continue;
      const int64_t m0 = boundary / column_blocks * kBlock;
      epilogue_rows(epilogue, y, N, m0, 0, N, std::min(kBlock, M - m0));
    }
}

// Fewer rows than this stay through the columns: 70 x 2100 x 40 was 1.1x slower through its three row
// blocks, which split unevenly over the threads.
constexpr int64_t kMinRowsThrough = 8 * kBlock;

void amx_matmul(const float *x, const Weights &w, const Weights &w_up, const float *bias, const Epilogue &epilogue,
                float *y, int64_t M, int64_t K, int64_t N) {
  const int64_t steps = round_up(K, kStep) / kStep;
  // Tall products whose w parts stay in L2 beside a block of x (the vision tower's, 1542 x 256 x 768 and
  // 1542 x 1024 x 256 at 6 frames) go through their rows: 1.15-1.27x faster (through ctypes); with w's
  // parts beyond L2 (1575 x 1024 x 1024) they are 1.1x slower than through the columns.
  const int64_t w_parts_bytes = round_up(N, kBlock) * steps * kStep * w_parts(w) * int64_t{sizeof(bf16)};
  // Gated products go through the columns (SwiGLU's: 384-413 rows against 2816 columns at the bench config).
  if (w_up.data == nullptr && N < M && M >= kMinRowsThrough && w_parts_bytes <= l2_bytes() * 3 / 4)
    rows_through(x, w, bias, epilogue, y, M, K, N, steps);
  else
    columns_through(x, w, w_up, bias, epilogue, y, M, K, N, steps);
}

#endif  // COGVLM2_AMX

}  // namespace

// 1 if this library has the AMX path and the process may use the tile registers, else 0.
extern "C" int AmxMatMulAvailable() {
#ifdef COGVLM2_AMX
  return amx_ready() ? 1 : 0;
#else
  return 0;
#endif
}

namespace {

// The kernels of this file and their params (y last):
// kProduct {x, w, y}: y = x @ w; kLinear {x, w, bias, y}: y = x @ w + bias; kLinearGelu (the same):
// GELU of it; kLinearNormAdd {x, w, bias, norm_weight, norm_bias, eps (1,), residual (M, N), y}:
// residual + LayerNorm of it; kGated {x, w_gate, w_up, y}: silu(x @ w_gate) * (x @ w_up).
enum Op { kProduct, kLinear, kLinearGelu, kLinearNormAdd, kGated };
constexpr int kParams[] = {3, 4, 4, 8, 4};

int amx_product(Op op, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                void *extra) {
  if (nparam != kParams[op] || ndims[0] != 2 || ndims[1] != 2 || ndims[nparam - 1] != 2) return 1;
  const bool gated = op == kGated;
  for (int i = 0; i < nparam; ++i)   // w (and w_up) float32 or bfloat16 bits, the rest float32
    if (!cogvlm2::is_float32(dtypes[i]) && !((i == 1 || (gated && i == 2)) && cogvlm2::is_bf16_bits(dtypes[i])))
      return 2;
  const int64_t M = shapes[0][0], K = shapes[0][1], N = shapes[1][1];
  int64_t *out = shapes[nparam - 1];
  const auto vector_of = [&](int i, int64_t size) { return ndims[i] == 1 && shapes[i][0] == size; };
  if (shapes[1][0] != K || out[0] != M || out[1] != N || (op != kProduct && !gated && !vector_of(2, N))) return 3;
  if (gated && (ndims[2] != 2 || shapes[2][0] != K || shapes[2][1] != N)) return 3;
  if (op == kLinearNormAdd && (!vector_of(3, N) || !vector_of(4, N) || !vector_of(5, 1) || ndims[6] != 2 ||
                               shapes[6][0] != M || shapes[6][1] != N))
    return 3;
  float *y = static_cast<float *>(params[nparam - 1]);
  const float *bias = op != kProduct && !gated ? static_cast<const float *>(params[2]) : nullptr;
  const Weights w{params[1], cogvlm2::is_bf16_bits(dtypes[1])};
  const Weights w_up = gated ? Weights{params[2], cogvlm2::is_bf16_bits(dtypes[2])} : Weights{};
  if (gated && w_up.bits != w.bits) return 2;                 // their parts share the panel layout
  Epilogue epilogue;
  epilogue.gelu = op == kLinearGelu;
  if (op == kLinearNormAdd) {
    epilogue.norm_weight = static_cast<const float *>(params[3]);
    epilogue.norm_bias = static_cast<const float *>(params[4]);
    epilogue.eps = static_cast<const float *>(params[5])[0];
    epilogue.residual = static_cast<const float *>(params[6]);
  }
  if (M < kMinRows || K == 0) {   // the rows kernel's product (zeros if K is 0), then the bias and epilogue
    const auto rows_product = [&](void *w, float *into) {
      void *product[3] = {params[0], w, into};
      int64_t *product_shapes[3] = {shapes[0], shapes[1], out};
      const char *product_dtypes[3] = {dtypes[0], dtypes[1], dtypes[nparam - 1]};
      int product_ndims[3] = {2, 2, 2};
      return RowsMatMul(3, product, product_ndims, product_shapes, product_dtypes, stream, extra);
    };
    std::vector<float> gate_sums;                         // gated: x @ w_gate, and y = x @ w_up
    if (gated) {
      gate_sums.resize(static_cast<size_t>(M * N));
      const int status = rows_product(params[1], gate_sums.data());
      if (status != 0) return status;
      epilogue.gate = gate_sums.data();
      epilogue.gate_stride = N;
    }
    const int status = rows_product(params[gated ? 2 : 1], y);
    if (status != 0) return status;
    if (bias != nullptr)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) y[m * N + n] += bias[n];
    if (epilogue.any()) epilogue_rows(epilogue, y, N, 0, 0, N, M);
    return 0;
  }
#ifdef COGVLM2_AMX
  if (!amx_ready()) return 4;
  if (N == 0) return 0;
  amx_matmul(static_cast<const float *>(params[0]), w, w_up, bias, epilogue, y, M, K, N);
  return 0;
#else
  return 4;
#endif
}

}  // namespace

// params {x (M, K), w (K, N), y (M, N)}: y = x @ w.
extern "C" int AmxMatMul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  return amx_product(kProduct, nparam, params, ndims, shapes, dtypes, stream, extra);
}

// params {x (M, K), w (K, N), bias (N,), y (M, N)}: y = x @ w + bias, the bias added as each block's
// sums are stored (a biased Linear in one pass, not a product and a BiasAdd).
extern "C" int AmxLinear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  return amx_product(kLinear, nparam, params, ndims, shapes, dtypes, stream, extra);
}

// params {x (M, K), w (K, N), bias (N,), y (M, N)}: y = GELU(x @ w + bias).
extern "C" int AmxLinearGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  return amx_product(kLinearGelu, nparam, params, ndims, shapes, dtypes, stream, extra);
}

// params {x (M, K), w (K, N), bias (N,), norm_weight (N,), norm_bias (N,), eps (1,), residual (M, N),
// y (M, N)}: y = residual + LayerNorm(x @ w + bias).
extern "C" int AmxLinearNormAdd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  return amx_product(kLinearNormAdd, nparam, params, ndims, shapes, dtypes, stream, extra);
}

// params {x (M, K), w_gate (K, N), w_up (K, N), y (M, N)}: y = silu(x @ w_gate) * (x @ w_up), SwiGLU's
// gate and up products and silu_mul.cc's step in one kernel, the same bits.
extern "C" int AmxGated(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  return amx_product(kGated, nparam, params, ndims, shapes, dtypes, stream, extra);
}

// Output shape for MindSpore's graph compiler and its dynamic-shape runtime: (M, N).
extern "C" std::vector<int64_t> AmxMatMulInferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)ndims;
  (void)extra;
  return {shapes[0][0], shapes[1][1]};
}

extern "C" std::vector<int64_t> AmxLinearInferShape(int *ndims, int64_t **shapes, void *extra) {
  return AmxMatMulInferShape(ndims, shapes, extra);
}

extern "C" std::vector<int64_t> AmxLinearGeluInferShape(int *ndims, int64_t **shapes, void *extra) {
  return AmxMatMulInferShape(ndims, shapes, extra);
}

extern "C" std::vector<int64_t> AmxLinearNormAddInferShape(int *ndims, int64_t **shapes, void *extra) {
  return AmxMatMulInferShape(ndims, shapes, extra);
}

extern "C" std::vector<int64_t> AmxGatedInferShape(int *ndims, int64_t **shapes, void *extra) {
  return AmxMatMulInferShape(ndims, shapes, extra);
}
