// The softmax-attention core the vision tower's kernel (vision_attention.cc) and the decoder's prefill
// kernel (prefill_attention.cc) share: one (sequence, head) at a time, its keys packed transposed
// (d, Sp) and its values (S, dp) once, then groups of up to kGroup blocks of kRows query rows get their
// scores, softmax and output. Each block's sums stay in registers; the group goes through the keys and
// values panel by panel (16 KiB at d = 64), so a panel is read from L1 by every block of the group, not
// from L2 by each (1.19x on the bench tower's attention, ctypes, the same bits).
// Arithmetic is float32 as in the portable path (cogvlm2_layers.attention): q is multiplied by the scale
// first, scores are d-term dot products (plus the bias, where the caller has one), softmax is
// exp(s - max) / sum with a vectorised exp (Cephes' expf polynomial, within 2 ulp: cpu_common.h), then
// the S-term sums of p * v, each taken in position order.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace cogvlm2 {
namespace attention {

// A block's kRows x kBlock vectors of sums stay in registers beside kBlock vectors of keys or values and a
// broadcast query or probability: 4 x 4 (16 + 4 + 1 of AVX-512's 32 registers); AVX2 has 16, so 6 x 2
// there (12 + 2 + 1): the bench tower's attention (6 frames x 4 heads of 257 x 64) went 8.3-9.4 ms ->
// 5.1-8.0 ms on an AVX2 EPYC (4 x 4 spilled; 4 x 2, 5 x 2, 8 x 2, 12 x 1, 4 x 3 were 6.3-11.6 ms), the same
// bits: a score is still a d-term sum in column order and an output an S-term sum in position order.
// The macros are there to time other shapes.
#ifndef COGVLM2_ATTENTION_ROWS
#define COGVLM2_ATTENTION_ROWS (kLanes == 16 ? 4 : 6)
#endif
#ifndef COGVLM2_ATTENTION_BLOCK
#define COGVLM2_ATTENTION_BLOCK (kLanes == 16 ? 4 : 2)
#endif
constexpr int kRows = COGVLM2_ATTENTION_ROWS;    // query rows per block
constexpr int kBlock = COGVLM2_ATTENTION_BLOCK;  // vectors of keys (scores) or of output columns per pass
static_assert(kBlock >= 1 && kBlock <= 4, "score_group has cases for 1-4 vectors");
constexpr int kGroup = 16;       // blocks per group: each panel of keys or values is read by all of them
constexpr int kGroupRows = kGroup * kRows;
constexpr int64_t kPad = kBlock * kLanes;   // head columns are padded to whole passes
constexpr int64_t kPanel = 64;   // positions of values per panel

using cogvlm2::round_up;

// One (sequence, head)'s operands, reused across calls by each thread.
struct Scratch {
  std::vector<float> keys;     // (d, Sp): k transposed, zero beyond S
  std::vector<float> values;   // (S, dp): v, zero beyond d
  std::vector<float> scores;   // (kGroupRows, Sp)
  std::vector<float> queries;  // (kGroupRows, d): q * scale, zero rows beyond the group's
  std::vector<float> sums;     // (kGroupRows, dp): the output sums between panels of values

  // keys and values of S positions whose rows sit `stride` floats apart (head_dim d each); sizes the
  // score, query and sum rows
  void pack(const float *k, const float *v, int64_t stride, int64_t S, int64_t d) {
    const int64_t Sp = round_up(S, kLanes), dp = round_up(d, kPad);
    keys.assign(d * Sp, 0.f);
    values.assign(S * dp, 0.f);
    scores.resize(kGroupRows * Sp);
    queries.resize(kGroupRows * d);
    sums.resize(kGroupRows * dp);
    for (int64_t j = 0; j < S; ++j) std::memcpy(&values[j * dp], v + j * stride, sizeof(float) * d);
    // keys transposed in 16 x 16 tiles, so each tile's writes fill whole cache lines
    for (int64_t j0 = 0; j0 < S; j0 += 16)
      for (int64_t c0 = 0; c0 < d; c0 += 16)
        for (int64_t j = j0; j < std::min(S, j0 + 16); ++j) {
          const float *key = k + j * stride;
          for (int64_t c = c0; c < std::min(d, c0 + 16); ++c) keys[c * Sp + j] = key[c];
        }
  }

  // the group's `rows` query rows (q[r]: d floats each) times scale; zeros up to whole blocks
  void load_queries(const float *const *q, int rows, int64_t d, float scale) {
    for (int r = 0; r < rows; ++r)
      for (int64_t c = 0; c < d; ++c) queries[r * d + c] = q[r][c] * scale;
    std::fill(queries.begin() + rows * d, queries.begin() + round_up(rows, kRows) * d, 0.f);
  }
};

// scores[r][j0 .. j0 + NB * kLanes) = q_r . keys for a block's kRows query rows q (the sums stay in
// registers); keys and scores rows are Sp floats long
template <int NB>
void score_block(const float *keys, const float *q, float *scores, int64_t d, int64_t Sp, int64_t j0) {
  vec acc[kRows][NB] = {};
  for (int64_t c = 0; c < d; ++c) {
    vec k[NB];
    for (int b = 0; b < NB; ++b) k[b] = *reinterpret_cast<const vec *>(&keys[c * Sp + j0 + b * kLanes]);
    for (int r = 0; r < kRows; ++r) {
      const float qr = q[r * d + c];
      for (int b = 0; b < NB; ++b) acc[r][b] += qr * k[b];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int b = 0; b < NB; ++b) *reinterpret_cast<vec *>(scores + r * Sp + j0 + b * kLanes) = acc[r][b];
}

// The scores of a group's `blocks` blocks, block b's rows against keys 0..ends[b] (whole vectors,
// <= Sp): panel by panel of kPad keys, each panel (d x kPad, in L1) used by every block before the next.
inline void score_group(Scratch &w, int blocks, const int64_t *ends, int64_t d, int64_t Sp) {
  const int64_t last = *std::max_element(ends, ends + blocks);
  for (int64_t j0 = 0; j0 < last; j0 += kPad)
    for (int b = 0; b < blocks; ++b) {
      const float *q = &w.queries[b * kRows * d];
      float *scores = &w.scores[b * kRows * Sp];
      switch (std::min<int64_t>(kBlock, std::max<int64_t>(0, ends[b] - j0) / kLanes)) {
        case 4: score_block<4>(w.keys.data(), q, scores, d, Sp, j0); break;
        case 3: score_block<3>(w.keys.data(), q, scores, d, Sp, j0); break;
        case 2: score_block<2>(w.keys.data(), q, scores, d, Sp, j0); break;
        case 1: score_block<1>(w.keys.data(), q, scores, d, Sp, j0); break;
        default: break;
      }
    }
}

// s[r][0..L) -> softmax in place (exp(s - max) / sum) for the `rows` rows (<= kRows) of a block, rows
// `stride` floats apart; the padding up to Lp becomes 0. The rows go through each pass together, so
// their reductions' latencies overlap; each row's sums are taken in the same order as one row alone.
inline void softmax_rows(float *s, int64_t stride, int rows, int64_t L, int64_t Lp) {
  const int64_t whole = L / kLanes * kLanes;              // vectors entirely inside [0, L)
  const int64_t covered = whole + (whole < L ? kLanes : 0);
  float top[kRows], inverse[kRows];
  vec sums[kRows];
  for (int r = 0; r < rows; ++r) {
    float *row = s + r * stride;
    for (int64_t j = L; j < Lp; ++j) row[j] = -INFINITY;
  }
  for (int r = 0; r < rows; ++r) {
    const float *row = s + r * stride;
    vec tops = splat(-INFINITY);
    for (int64_t j = 0; j < covered; j += kLanes) {
      const vec x = *reinterpret_cast<const vec *>(row + j);
      tops = x > tops ? x : tops;
    }
    float t = tops[0];
    for (int l = 1; l < kLanes; ++l) t = std::max(t, tops[l]);
    top[r] = t;
    sums[r] = vec{};
  }
  for (int64_t j = 0; j < whole; j += kLanes)
    for (int r = 0; r < rows; ++r) {
      vec *at = reinterpret_cast<vec *>(s + r * stride + j);
      const vec e = exp_nonpositive(*at - top[r]);
      *at = e;
      sums[r] += e;
    }
  for (int r = 0; r < rows; ++r) {
    float *row = s + r * stride;
    if (whole < L) {                                        // the vector across L: its padding lanes are 0
      vec e = exp_nonpositive(*reinterpret_cast<vec *>(row + whole) - top[r]);
      for (int l = static_cast<int>(L - whole); l < kLanes; ++l) e[l] = 0.f;
      *reinterpret_cast<vec *>(row + whole) = e;
      sums[r] += e;
    }
    for (int64_t j = covered; j < Lp; ++j) row[j] = 0.f;
  }
  float sum[kRows] = {};
  for (int l = 0; l < kLanes; ++l)
    for (int r = 0; r < rows; ++r) sum[r] += sums[r][l];
  for (int r = 0; r < rows; ++r) inverse[r] = 1.f / sum[r];    // as ATen's softmax: one division per row
  for (int r = 0; r < rows; ++r) {
    const vec scale = splat(inverse[r]);
    for (int64_t j = 0; j < Lp; j += kLanes) *reinterpret_cast<vec *>(s + r * stride + j) *= scale;
  }
}

// out[i][0..d) = p_i . values over positions 0..ends[b] for row i of block b, the first rows[b] of each
// of the group's `blocks` blocks (probability rows Sp floats long): panel by panel of kPanel positions,
// each panel (kPanel x kPad values, in L1) used by every block, the sums kept in w.sums between panels
// (the same sums in the same order as in one pass).
inline void weigh_group(Scratch &w, int blocks, const int *rows, const int64_t *ends, float *const *out,
                        int64_t Sp, int64_t d) {
  const int64_t dp = round_up(d, kPad), last = *std::max_element(ends, ends + blocks);
  for (int64_t c0 = 0; c0 < dp; c0 += kPad)
    for (int64_t j0 = 0; j0 == 0 || j0 < last; j0 += kPanel)
      for (int b = 0; b < blocks; ++b) {
        const int64_t j1 = std::min(ends[b], j0 + kPanel);
        if (j0 > 0 && j1 <= j0) continue;
        const float *probs = &w.scores[b * kRows * Sp];
        float *sums = &w.sums[b * kRows * dp + c0];
        vec acc[kRows][kBlock] = {};
        if (j0 > 0)
          for (int r = 0; r < kRows; ++r)
            for (int v = 0; v < kBlock; ++v) acc[r][v] = *reinterpret_cast<const vec *>(sums + r * dp + v * kLanes);
        for (int64_t j = j0; j < j1; ++j) {
          vec v[kBlock];
          for (int i = 0; i < kBlock; ++i) v[i] = *reinterpret_cast<const vec *>(&w.values[j * dp + c0 + i * kLanes]);
          for (int r = 0; r < kRows; ++r) {
            const float p = probs[r * Sp + j];
            for (int i = 0; i < kBlock; ++i) acc[r][i] += p * v[i];
          }
        }
        for (int r = 0; r < kRows; ++r)
          for (int v = 0; v < kBlock; ++v) *reinterpret_cast<vec *>(sums + r * dp + v * kLanes) = acc[r][v];
      }
  for (int b = 0; b < blocks; ++b)
    for (int r = 0; r < rows[b]; ++r)
      std::memcpy(out[b * kRows + r], &w.sums[(b * kRows + r) * dp], sizeof(float) * d);
}

}  // namespace attention
}  // namespace cogvlm2
