// The decoder's attention on the functional KV cache for any number of new tokens (prefill above all):
// per sequence and query head, out = softmax((q * scale) k^T + bias) v, scale = head_dim^-0.5, with
// grouped KV heads (query head h uses kv head h / (Hq / Hkv)).
//
// q (B, Hq, L, d) float32, rotated, not yet scaled; k, v (B, Hkv, S, d): the cache with this step's
// tokens appended; bias (B, 1, L, S) float32: the additive mask (0 where a row may look, MASK_VALUE
// = -1e9 where not: cogvlm2_token_types.causal_bias); out (B, L, Hq * d), query head h at columns
// h*d .. (h+1)*d: the flat-token layout the output projection reads, so no transpose follows.
// A MindSpore "aot" Custom CPU kernel: PrefillAttention(nparam=5, {q, k, v, bias, out}).
//
// Why: the portable path (cogvlm2_layers.attention) materialises the grouped bias and the scores
// (Hq, L, S), then runs two BatchMatMuls, an add and a softmax: 16 ms per layer of the bench model's
// 413-token prefill, all of them over the masked half of a causal prompt too. Here each (sequence,
// kv head) is a task on the core of attention_core.h (the vision kernel's): its keys and values are
// packed once for the query heads that share them, a block of 4 query rows is those heads at one
// position (as the portable path's grouped layout), and it stops at its last visible key.
//
// Masked keys: a bias at or below kMasked marks a key a row must not see. The portable path gives such
// a key exactly zero weight (exp(s - 1e9 - max) is 0 in float32 for any score below 1e7 in size), so
// leaving the keys after a block's last visible one out changes nothing; masked keys before it (left
// padding) are computed with their bias, as there. A row that sees no key at all (a padding row)
// attends over every key, as the portable softmax does.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_core.h"

namespace {

using namespace cogvlm2::attention;

constexpr float kMasked = -1e8f;   // MASK_VALUE is -1e9

// 1 + the last key the row may see; S if it may see none
int64_t visible_end(const float *bias, int64_t S) {
  for (int64_t j = S; j > 0; --j)
    if (bias[j - 1] > kMasked) return j;
  return S;
}

// One (sequence, kv head)'s share of rows: its g query heads' rows taken position by position, row
// r = i * g + j being query head kv * g + j at position i, so the 4 rows of a block share keys and
// mostly a position (a decode token's block is its g heads). Blocks part, part + parts, ... of them, in
// groups of up to kGroup; each block stops at the last key any of its rows sees.
// q (Hq, L, d), bias (L, S) and out (L, C) of the sequence (C = Hq * d), k and v (S, d) of the kv head.
void kv_head_rows(const float *q, const float *k, const float *v, const float *bias, float *out, int64_t kv,
                  int64_t group, int64_t part, int64_t parts, int64_t L, int64_t S, int64_t d, int64_t C, float scale,
                  Scratch &w) {
  const int64_t Sp = round_up(S, cogvlm2::kLanes), total = group * L;
  w.pack(k, v, d, S, d);
  for (int64_t g0 = part * kRows; g0 < total; g0 += kGroup * parts * kRows) {
    const float *queries[kGroupRows], *biases[kGroupRows];
    float *outputs[kGroupRows];
    int block_rows[kGroup];
    int64_t ends[kGroup], padded_ends[kGroup];
    int blocks = 0, rows = 0;                               // only the last block may be short
    for (int64_t r0 = g0; r0 < total && blocks < kGroup; r0 += parts * kRows, ++blocks) {
      block_rows[blocks] = static_cast<int>(std::min<int64_t>(kRows, total - r0));
      int64_t end = 0, last = -1;                           // keys 0..end: what any of the block's rows sees
      for (int r = 0; r < block_rows[blocks]; ++r, ++rows) {
        const int64_t i = (r0 + r) / group, head = kv * group + (r0 + r) % group;
        queries[rows] = q + (head * L + i) * d;
        biases[rows] = bias + i * S;
        outputs[rows] = out + i * C + head * d;
        if (i != last) end = std::max(end, visible_end(biases[rows], S));   // once per position
        last = i;
      }
      ends[blocks] = end;
      padded_ends[blocks] = round_up(end, cogvlm2::kLanes);
    }
    w.load_queries(queries, rows, d, scale);
    score_group(w, blocks, padded_ends, d, Sp);
    for (int b = 0; b < blocks; ++b) {
      for (int r = 0; r < block_rows[b]; ++r) {
        float *s = &w.scores[(b * kRows + r) * Sp];
        for (int64_t j = 0; j < ends[b]; ++j) s[j] += biases[b * kRows + r][j];
      }
      softmax_rows(&w.scores[b * kRows * Sp], Sp, block_rows[b], ends[b], padded_ends[b]);
    }
    weigh_group(w, blocks, block_rows, ends, outputs, Sp, d);
  }
}

}  // namespace

extern "C" int PrefillAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 5 || ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 4 || ndims[3] != 4 || ndims[4] != 3) return 1;
  for (int i = 0; i < 5; ++i)
    if (!cogvlm2::is_float32(dtypes[i])) return 2;
  const int64_t B = shapes[0][0], Hq = shapes[0][1], L = shapes[0][2], d = shapes[0][3];
  const int64_t Hkv = shapes[1][1], S = shapes[1][2];
  if (Hkv <= 0 || Hq % Hkv != 0 || shapes[1][0] != B || shapes[1][3] != d) return 3;
  for (int64_t i = 0; i < 4; ++i)
    if (shapes[2][i] != shapes[1][i]) return 3;
  if (shapes[3][0] != B || shapes[3][1] != 1 || shapes[3][2] != L || shapes[3][3] != S) return 3;
  if (shapes[4][0] != B || shapes[4][1] != L || shapes[4][2] != Hq * d) return 3;
  if (B == 0 || L == 0 || d == 0) return 0;
  if (S == 0) return 3;                                     // new tokens always see at least themselves
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  const float *bias = static_cast<const float *>(params[3]);
  float *out = static_cast<float *>(params[4]);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const int64_t group = Hq / Hkv, C = Hq * d, blocks = (group * L + kRows - 1) / kRows;
  // (sequence, kv head) tasks, each split into interleaved parts when there are fewer than 2 per thread
  static const int threads = cogvlm2::cpu_count();
  const int64_t parts = std::min(blocks, std::max<int64_t>(1, (2 * threads + B * Hkv - 1) / (B * Hkv)));
  const int64_t tasks = B * Hkv * parts;
  cogvlm2::parallel(tasks, [&](int t, int n) {
    thread_local Scratch scratch;
    for (int64_t i = t; i < tasks; i += n) {
      const int64_t b = i / (Hkv * parts), kv = i / parts % Hkv, part = i % parts;
      const int64_t head = (b * Hkv + kv) * S * d;
      kv_head_rows(q + b * Hq * L * d, k + head, v + head, bias + b * L * S, out + b * L * C, kv, group, part, parts,
                   L, S, d, C, scale, scratch);
    }
  });
  return 0;
}

// Output shape: (B, L, Hq * d) for q (B, Hq, L, d).
extern "C" std::vector<int64_t> PrefillAttentionInferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)ndims;
  (void)extra;
  return {shapes[0][0], shapes[0][2], shapes[0][1] * shapes[0][3]};
}
