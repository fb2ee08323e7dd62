// The softmax-attention core the vision tower's kernel (vision_attention.cc) and the decoder's prefill
// kernel (prefill_attention.cc) share: one (sequence, head) at a time, its keys packed transposed
// (d, Sp) and its values (S, dp) once, then blocks of kRows query rows get their scores, softmax and
// output with the sums in registers. Arithmetic is float32 as in the portable path
// (cogvlm2_layers.attention): q is multiplied by the scale first, scores are d-term dot products (plus
// the bias, where the caller has one), softmax is exp(s - max) / sum with a vectorised exp (Cephes'
// expf polynomial, within 2 ulp: cpu_common.h), then the S-term sums of p * v.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace cogvlm2 {
namespace attention {

constexpr int kRows = 4;         // query rows per block (their sums stay in registers)
constexpr int kBlock = 4;        // vectors of keys (scores) or of output columns per pass
constexpr int64_t kPad = kBlock * kLanes;   // head columns are padded to whole passes

using cogvlm2::round_up;

// One (sequence, head)'s operands, reused across calls by each thread.
struct Scratch {
  std::vector<float> keys;     // (d, Sp): k transposed, zero beyond S
  std::vector<float> values;   // (S, dp): v, zero beyond d
  std::vector<float> scores;   // (kRows, Sp)
  std::vector<float> queries;  // (kRows, d): q * scale, zero rows beyond the block's

  // keys and values of S positions whose rows sit `stride` floats apart (head_dim d each); sizes the
  // score and query rows
  void pack(const float *k, const float *v, int64_t stride, int64_t S, int64_t d) {
    const int64_t Sp = round_up(S, kLanes), dp = round_up(d, kPad);
    keys.assign(d * Sp, 0.f);
    values.assign(S * dp, 0.f);
    scores.resize(kRows * Sp);
    queries.resize(kRows * d);
    for (int64_t j = 0; j < S; ++j) std::memcpy(&values[j * dp], v + j * stride, sizeof(float) * d);
    // keys transposed in 16 x 16 tiles, so each tile's writes fill whole cache lines
    for (int64_t j0 = 0; j0 < S; j0 += 16)
      for (int64_t c0 = 0; c0 < d; c0 += 16)
        for (int64_t j = j0; j < std::min(S, j0 + 16); ++j) {
          const float *key = k + j * stride;
          for (int64_t c = c0; c < std::min(d, c0 + 16); ++c) keys[c * Sp + j] = key[c];
        }
  }

  // the block's `rows` query rows (q[r]: d floats each) times scale; the rest of the kRows zero
  void load_queries(const float *const *q, int rows, int64_t d, float scale) {
    for (int r = 0; r < rows; ++r)
      for (int64_t c = 0; c < d; ++c) queries[r * d + c] = q[r][c] * scale;
    std::fill(queries.begin() + rows * d, queries.end(), 0.f);
  }
};

// scores[r][j0 .. j0 + NB * kLanes) = q_r . keys for the kRows query rows (the sums stay in registers);
// keys and scores rows are Sp floats long
template <int NB>
void score_block(const Scratch &w, float *scores, int64_t d, int64_t Sp, int64_t j0) {
  vec acc[kRows][NB] = {};
  for (int64_t c = 0; c < d; ++c) {
    vec k[NB];
    for (int b = 0; b < NB; ++b) k[b] = *reinterpret_cast<const vec *>(&w.keys[c * Sp + j0 + b * kLanes]);
    for (int r = 0; r < kRows; ++r) {
      const float q = w.queries[r * d + c];
      for (int b = 0; b < NB; ++b) acc[r][b] += q * k[b];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int b = 0; b < NB; ++b) *reinterpret_cast<vec *>(scores + r * Sp + j0 + b * kLanes) = acc[r][b];
}

// scores[r][0..end) = q_r . keys for the kRows query rows (end <= Sp, a multiple of kLanes): blocks of
// kBlock vectors, then the 1-3 left
inline void score_rows(const Scratch &w, float *scores, int64_t d, int64_t Sp, int64_t end) {
  int64_t j0 = 0;
  for (; j0 + kPad <= end; j0 += kPad) score_block<kBlock>(w, scores, d, Sp, j0);
  switch ((end - j0) / kLanes) {
    case 3: score_block<3>(w, scores, d, Sp, j0); break;
    case 2: score_block<2>(w, scores, d, Sp, j0); break;
    case 1: score_block<1>(w, scores, d, Sp, j0); break;
    default: break;
  }
}

// scores[0..L) -> softmax in place (exp(s - max) / sum); the padding up to Lp becomes 0
inline void softmax_row(float *s, int64_t L, int64_t Lp) {
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

// out[r][0..d) = p_r . values over positions 0..L for the first `rows` of the kRows rows of
// probabilities (rows Sp floats long)
inline void weigh_values(const Scratch &w, const float *probs, float *const *out, int rows, int64_t L,
                         int64_t Sp, int64_t d) {
  const int64_t dp = round_up(d, kPad);
  for (int64_t c0 = 0; c0 < dp; c0 += kPad) {
    vec acc[kRows][kBlock] = {};
    for (int64_t j = 0; j < L; ++j) {
      vec v[kBlock];
      for (int b = 0; b < kBlock; ++b) v[b] = *reinterpret_cast<const vec *>(&w.values[j * dp + c0 + b * kLanes]);
      for (int r = 0; r < kRows; ++r) {
        const float p = probs[r * Sp + j];
        for (int b = 0; b < kBlock; ++b) acc[r][b] += p * v[b];
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int b = 0; b < kBlock; ++b) {
        const int64_t c = c0 + b * kLanes;
        if (c < d) std::memcpy(out[r] + c, &acc[r][b], sizeof(float) * std::min<int64_t>(kLanes, d - c));
      }
  }
}

}  // namespace attention
}  // namespace cogvlm2
