// The vision tower's attention straight from its fused qkv projection: per frame and head,
// out = softmax((q * scale) k^T) v, non-causal, scale = head_dim^-0.5.
//
// qkv (T, L, 3C) float32: [q | k | v] along the last axis, head h at columns h*d .. (h+1)*d of each
// (d = C / heads); heads (1,) int32; out (T, L, C), head h at columns h*d .. (h+1)*d.
// A MindSpore "aot" Custom CPU kernel: VisionAttention(nparam=3, {qkv, heads, out}).
//
// Why: the portable path (cogvlm2_layers.attention) splits q, k and v, transposes each to
// (T, heads, L, d), runs two BatchMatMuls and a softmax, and transposes back: 18 ms of a 6-frame
// encode of the bench tower in the profiler. Here each (frame, head) is one task: its keys are packed
// transposed (d, L) and its values (L, d) once, then blocks of 4 query rows get their scores, softmax
// and output with the sums in registers. Arithmetic is float32 as in the portable path: q is
// multiplied by the scale first, scores are d-term dot products, softmax is exp(s - max) / sum with a
// vectorised exp (Cephes' expf polynomial, within 2 ulp), then the L-term sums of p * v.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

using cogvlm2::kLanes;
using cogvlm2::vec;
typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

constexpr int kRows = 4;         // query rows per block (their sums stay in registers)
constexpr int kBlock = 4;        // vectors of keys (scores) or of output columns per pass
constexpr int64_t kPad = kBlock * kLanes;   // head columns are padded to whole passes

inline vec splat(float v) { return vec{} + v; }

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// e^x for x <= 0 (softmax arguments s - max): Cephes' expf (range reduction by ln 2 in two parts and
// a degree-6 polynomial), flushing below -87.3 to the smallest normal range.
inline vec exp_nonpositive(vec x) {
  x = x < splat(-87.33654f) ? splat(-87.33654f) : x;
  vec fx = x * 1.44269504088896341f + 0.5f;
  ivec n = __builtin_convertvector(fx, ivec);                  // truncates toward zero
  const vec truncated = __builtin_convertvector(n, vec);
  n -= (truncated > fx) ? ivec{} + 1 : ivec{};                  // floor
  const vec nf = __builtin_convertvector(n, vec);
  x -= nf * 0.693359375f;
  x -= nf * -2.12194440e-4f;
  vec y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  const ivec bits = (n + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

struct Scratch {
  std::vector<float> keys;     // (d, Lp): k transposed, zero beyond L
  std::vector<float> values;   // (L, dp): v, zero beyond d
  std::vector<float> scores;   // (kRows, Lp)
  std::vector<float> queries;  // (kRows, d): q * scale, zero rows beyond the block's
};

// scores[r][j0 .. j0 + NB * kLanes) = q_r . keys for the kRows query rows (the sums stay in registers)
template <int NB>
void score_block(const Scratch &w, float *scores, int64_t d, int64_t Lp, int64_t j0) {
  vec acc[kRows][NB] = {};
  for (int64_t c = 0; c < d; ++c) {
    vec k[NB];
    for (int b = 0; b < NB; ++b) k[b] = *reinterpret_cast<const vec *>(&w.keys[c * Lp + j0 + b * kLanes]);
    for (int r = 0; r < kRows; ++r) {
      const float q = w.queries[r * d + c];
      for (int b = 0; b < NB; ++b) acc[r][b] += q * k[b];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int b = 0; b < NB; ++b) *reinterpret_cast<vec *>(scores + r * Lp + j0 + b * kLanes) = acc[r][b];
}

// scores[r][0..Lp) = q_r . keys for the kRows query rows: blocks of kBlock vectors, then the 1-3 left
void score_rows(const Scratch &w, float *scores, int64_t d, int64_t Lp) {
  int64_t j0 = 0;
  for (; j0 + kPad <= Lp; j0 += kPad) score_block<kBlock>(w, scores, d, Lp, j0);
  switch ((Lp - j0) / kLanes) {
    case 3: score_block<3>(w, scores, d, Lp, j0); break;
    case 2: score_block<2>(w, scores, d, Lp, j0); break;
    case 1: score_block<1>(w, scores, d, Lp, j0); break;
    default: break;
  }
}

// scores[0..L) -> softmax in place (exp(s - max) / sum); the padding beyond L becomes 0
void softmax_row(float *s, int64_t L, int64_t Lp) {
  const int64_t whole = L / kLanes * kLanes;              // vectors entirely inside [0, L)
  for (int64_t j = L; j < Lp; ++j) s[j] = -INFINITY;
  vec tops = splat(-INFINITY);
  for (int64_t j = 0; j < whole + (whole < L ? kLanes : 0); j += kLanes) {
    const vec x = *reinterpret_cast<const vec *>(s + j);
    tops = x > tops ? x : tops;
  }
  float top = tops[0];
  for (int l = 1; l < kLanes; ++l) top = std::max(top, tops[l]);
  vec sums{};
  for (int64_t j = 0; j < whole; j += kLanes) {
    const vec e = exp_nonpositive(*reinterpret_cast<vec *>(s + j) - top);
    *reinterpret_cast<vec *>(s + j) = e;
    sums += e;
  }
  if (whole < L) {                                          // the vector across L: its padding lanes are 0
    vec e = exp_nonpositive(*reinterpret_cast<vec *>(s + whole) - top);
    for (int l = static_cast<int>(L - whole); l < kLanes; ++l) e[l] = 0.f;
    *reinterpret_cast<vec *>(s + whole) = e;
    sums += e;
  }
  for (int64_t j = whole + (whole < L ? kLanes : 0); j < Lp; ++j) s[j] = 0.f;
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += sums[l];
  const float inverse = 1.f / sum;                         // as ATen's softmax: one division per row
  for (int64_t j = 0; j < Lp; j += kLanes) *reinterpret_cast<vec *>(s + j) *= inverse;
}

// out rows (stride C) = p . values for the first `rows` of the kRows rows of probabilities
void weigh_values(const Scratch &w, const float *probs, float *out, int rows, int64_t L, int64_t Lp, int64_t d,
                  int64_t dp, int64_t C) {
  for (int64_t c0 = 0; c0 < dp; c0 += kPad) {
    vec acc[kRows][kBlock] = {};
    for (int64_t j = 0; j < L; ++j) {
      vec v[kBlock];
      for (int b = 0; b < kBlock; ++b) v[b] = *reinterpret_cast<const vec *>(&w.values[j * dp + c0 + b * kLanes]);
      for (int r = 0; r < kRows; ++r) {
        const float p = probs[r * Lp + j];
        for (int b = 0; b < kBlock; ++b) acc[r][b] += p * v[b];
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int b = 0; b < kBlock; ++b) {
        const int64_t c = c0 + b * kLanes;
        if (c < d) std::memcpy(out + r * C + c, &acc[r][b], sizeof(float) * std::min<int64_t>(kLanes, d - c));
      }
  }
}

// One (frame, head): qkv (L, 3C) of the frame, out (L, C) of the frame.
void frame_head(const float *qkv, float *out, int64_t L, int64_t C, int64_t d, int64_t h, float scale, Scratch &w) {
  const int64_t Lp = round_up(L, kLanes), dp = round_up(d, kPad), width = 3 * C;
  w.keys.assign(d * Lp, 0.f);
  w.values.assign(L * dp, 0.f);
  w.scores.resize(kRows * Lp);
  w.queries.resize(kRows * d);
  for (int64_t j = 0; j < L; ++j) std::memcpy(&w.values[j * dp], qkv + j * width + 2 * C + h * d, sizeof(float) * d);
  // keys transposed in 16 x 16 tiles, so each tile's writes fill whole cache lines
  for (int64_t j0 = 0; j0 < L; j0 += 16)
    for (int64_t c0 = 0; c0 < d; c0 += 16)
      for (int64_t j = j0; j < std::min(L, j0 + 16); ++j) {
        const float *key = qkv + j * width + C + h * d;
        for (int64_t c = c0; c < std::min(d, c0 + 16); ++c) w.keys[c * Lp + j] = key[c];
      }
  for (int64_t i0 = 0; i0 < L; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, L - i0));
    for (int r = 0; r < rows; ++r)
      for (int64_t c = 0; c < d; ++c) w.queries[r * d + c] = qkv[(i0 + r) * width + h * d + c] * scale;
    std::fill(w.queries.begin() + rows * d, w.queries.end(), 0.f);   // a last block of 1-3 rows
    score_rows(w, w.scores.data(), d, Lp);
    for (int r = 0; r < rows; ++r) softmax_row(&w.scores[r * Lp], L, Lp);
    weigh_values(w, w.scores.data(), out + i0 * C + h * d, rows, L, Lp, d, dp, C);
  }
}

}  // namespace

extern "C" int VisionAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || ndims[0] != 3 || ndims[1] != 1 || ndims[2] != 3) return 1;
  if (!cogvlm2::is_float32(dtypes[0]) || std::strcmp(dtypes[1], "int32") != 0)
    return 2;
  const int64_t T = shapes[0][0], L = shapes[0][1], width = shapes[0][2];
  const int heads = static_cast<const int32_t *>(params[1])[0];
  if (width % 3 != 0 || shapes[1][0] != 1 || heads <= 0 || (width / 3) % heads != 0) return 3;
  const int64_t C = width / 3, d = C / heads;
  if (shapes[2][0] != T || shapes[2][1] != L || shapes[2][2] != C) return 3;
  if (T == 0 || L == 0 || C == 0) return 0;
  const float *qkv = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[2]);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const int64_t tasks = T * heads;
  cogvlm2::parallel(tasks, [&](int t, int n) {
    thread_local Scratch scratch;
    for (int64_t i = t; i < tasks; i += n) {
      const int64_t frame = i / heads, h = i % heads;
      frame_head(qkv + frame * L * width, out + frame * L * C, L, C, d, h, scale, scratch);
    }
  });
  return 0;
}

// Output shape: (T, L, C) for qkv (T, L, 3C).
extern "C" std::vector<int64_t> VisionAttentionInferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)ndims;
  (void)extra;
  return {shapes[0][0], shapes[0][1], shapes[0][2] / 3};
}
