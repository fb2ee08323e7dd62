// One decode step's attention on the slot KV cache: this step's key and value are written into the cache
// in place, then each row attends over its slot's positions. No concat, no copy of the cache.
//
// q (B, Hq, d) float32, already multiplied by head_dim^-0.5; k, v (B, Hkv, d): this step's keys and
// values; k_cache, v_cache (S, Hkv, C, d): the slot cache, numpy-backed tensors the engine owns
// (``cogvlm2_kv_cache.SlotKVCache``; MindSpore passes a CPU input's memory to the kernel, so the write
// lands in the engine's arrays); slots (B,) int32: each row's slot, all different; positions (B,) int32:
// where this token goes in its slot (= the tokens already cached). out (B, Hq, d): for query head hq
// (kv head hq / (Hq / Hkv)), softmax over positions 0..positions[b] of q . k, then the weighted sum of v.
// Scores and softmax are float32: exp(s - max) / sum, as MindSpore's Softmax.
// A MindSpore "aot" Custom CPU kernel: DecodeAttention(nparam=8, params={q, k, v, k_cache, v_cache,
// slots, positions, out}).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

using cogvlm2::kLanes;
using cogvlm2::vec;

float dot(const float *a, const float *b, int64_t d) {
  vec acc = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    acc += *reinterpret_cast<const vec *>(a + i) * *reinterpret_cast<const vec *>(b + i);
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// out += p * v over d
void axpy(float p, const float *v, float *out, int64_t d) {
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    *reinterpret_cast<vec *>(out + i) += p * *reinterpret_cast<const vec *>(v + i);
  for (; i < d; ++i) out[i] += p * v[i];
}

// The `group` query heads of row b that share kv head h, over `n` positions of one slot's k, v (C, d).
void head(const float *q, const float *k, const float *v, float *out, int group, int64_t n, int64_t d) {
  static thread_local std::vector<float> scores;
  scores.resize(static_cast<size_t>(n));
  for (int g = 0; g < group; ++g) {
    const float *qg = q + g * d;
    float top = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
      scores[t] = dot(qg, k + t * d, d);
      top = std::max(top, scores[t]);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      scores[t] = std::exp(scores[t] - top);
      sum += scores[t];
    }
    float *og = out + g * d;
    std::memset(og, 0, sizeof(float) * d);
    for (int64_t t = 0; t < n; ++t) axpy(scores[t] / sum, v + t * d, og, d);
  }
}

}  // namespace

extern "C" int DecodeAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  (void)stream;
  (void)extra;
  (void)dtypes;
  if (nparam != 8 || ndims[0] != 3 || ndims[1] != 3 || ndims[2] != 3 || ndims[3] != 4 || ndims[4] != 4 ||
      ndims[5] != 1 || ndims[6] != 1)
    return 1;
  const int64_t B = shapes[0][0], Hq = shapes[0][1], d = shapes[0][2];
  const int64_t S = shapes[3][0], Hkv = shapes[3][1], C = shapes[3][2];
  if (Hkv == 0 || Hq % Hkv != 0 || shapes[3][3] != d || shapes[5][0] != B || shapes[6][0] != B) return 2;
  for (int i = 0; i < 3; ++i)
    if (shapes[1][i] != (i == 1 ? Hkv : i == 0 ? B : d) || shapes[2][i] != shapes[1][i]) return 2;
  for (int i = 0; i < 4; ++i)
    if (shapes[4][i] != shapes[3][i]) return 2;
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  float *k_cache = static_cast<float *>(params[3]);
  float *v_cache = static_cast<float *>(params[4]);
  const int32_t *slots = static_cast<const int32_t *>(params[5]);
  const int32_t *positions = static_cast<const int32_t *>(params[6]);
  float *out = static_cast<float *>(params[7]);
  int64_t cached = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (slots[b] < 0 || slots[b] >= S || positions[b] < 0 || positions[b] >= C) return 3;
    for (int64_t a = 0; a < b; ++a)
      if (slots[a] == slots[b]) return 4;
    cached += positions[b] + 1;
  }
  const int group = static_cast<int>(Hq / Hkv);
  const int64_t tasks = B * Hkv;
  auto task = [&](int64_t i) {   // row b, kv head h: write this token, then attend over its slot
    const int64_t b = i / Hkv, h = i % Hkv, n = positions[b] + 1;
    const int64_t cache = (static_cast<int64_t>(slots[b]) * Hkv + h) * C * d;
    std::memcpy(k_cache + cache + positions[b] * d, k + (b * Hkv + h) * d, sizeof(float) * d);
    std::memcpy(v_cache + cache + positions[b] * d, v + (b * Hkv + h) * d, sizeof(float) * d);
    head(q + (b * Hq + h * group) * d, k_cache + cache, v_cache + cache, out + (b * Hq + h * group) * d, group,
         n, d);
  };
  // a second thread once the step reads more than 1 MB of cache (every kv head of every row)
  const int64_t bytes = cached * Hkv * d * 2 * static_cast<int64_t>(sizeof(float));
  cogvlm2::parallel(std::min(tasks, bytes >> 20), [&](int t, int n) {
    for (int64_t i = t; i < tasks; i += n) task(i);
  });
  return 0;
}

// Output shape: q's (B, Hq, d).
extern "C" std::vector<int64_t> DecodeAttentionInferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)extra;
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}
