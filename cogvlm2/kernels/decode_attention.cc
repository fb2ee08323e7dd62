// One decode step's attention on the slot KV cache, from the step's fused q/k/v projection: q and k are
// rotated (rotary embedding, rotate-half) and q scaled here, this step's key and value are written into the
// cache in place, then each row attends over its slot's positions. No concat, no copy of the cache, and none
// of the ~18 slicing and element-wise kernels per layer the rotation and the split took in the graph.
//
// qkv (B, (Hq + 2 Hkv) d) float32: the language expert's query_key_value output, q | k | v with head h at
// columns h*d .. (h+1)*d of each; cos, sin (B, d): the rotary angles at each row's position; scale (1,):
// head_dim^-0.5; k_cache, v_cache (S, Hkv, C, d): the slot cache, numpy-backed tensors the engine owns
// (``cogvlm2_kv_cache.SlotKVCache``; MindSpore passes a CPU input's memory to the kernel, so the write
// lands in the engine's arrays); slots (B,) int32: each row's slot, all different; positions (B,) int32:
// where this token goes in its slot (= the tokens already cached). out (B, Hq d): for query head hq
// (kv head hq / (Hq / Hkv)), softmax over positions 0..positions[b] of q . k, then the weighted sum of v.
// The rotation rounds as the graph's ops did (x cos, rotate_half(x) sin, their sum, then q's product with
// the scale, each rounded to float32, no fused multiply-add), so the cache holds the same keys. Scores and
// softmax are float32: exp(s - max) / sum, as MindSpore's Softmax.
// A MindSpore "aot" Custom CPU kernel: DecodeAttention(nparam=9, params={qkv, cos, sin, scale, k_cache,
// v_cache, slots, positions, out}).
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

// The value of x as a float32 in a register: the compiler cannot fold the operation that made it into the
// next one (g++ contracts a * b + c into a fused multiply-add even across statements; the graph rounded both).
inline float rounded(float x) {
  asm("" : "+x"(x));
  return x;
}

// x (d) rotated by the angles (cos, sin) (d) into y, times `scale` if given: y = x cos + rotate_half(x) sin
// with rotate_half(x) = (-x[d/2:], x[:d/2]), each product and the sum rounded on its own as the graph's Mul,
// Mul, Add (and Mul by the scale) did.
void rotate(const float *x, const float *cos, const float *sin, const float *scale, float *y, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float turned = i < half ? -x[i + half] : x[i - half];
    const float r = rounded(rounded(x[i] * cos[i]) + rounded(turned * sin[i]));
    y[i] = scale != nullptr ? r * *scale : r;
  }
}

}  // namespace

extern "C" int DecodeAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  (void)stream;
  (void)extra;
  (void)dtypes;
  if (nparam != 9 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2 || ndims[3] != 1 || ndims[4] != 4 ||
      ndims[5] != 4 || ndims[6] != 1 || ndims[7] != 1)
    return 1;
  const int64_t B = shapes[0][0], width = shapes[0][1];
  const int64_t S = shapes[4][0], Hkv = shapes[4][1], C = shapes[4][2], d = shapes[4][3];
  if (Hkv == 0 || d == 0 || d % 2 != 0 || width % d != 0 || width / d <= 2 * Hkv) return 2;
  const int64_t Hq = width / d - 2 * Hkv;
  if (Hq % Hkv != 0 || shapes[3][0] != 1 || shapes[6][0] != B || shapes[7][0] != B) return 2;
  for (int i = 1; i <= 2; ++i)
    if (shapes[i][0] != B || shapes[i][1] != d) return 2;
  for (int i = 0; i < 4; ++i)
    if (shapes[5][i] != shapes[4][i]) return 2;
  const float *qkv = static_cast<const float *>(params[0]);
  const float *cos = static_cast<const float *>(params[1]);
  const float *sin = static_cast<const float *>(params[2]);
  const float *scale = static_cast<const float *>(params[3]);
  float *k_cache = static_cast<float *>(params[4]);
  float *v_cache = static_cast<float *>(params[5]);
  const int32_t *slots = static_cast<const int32_t *>(params[6]);
  const int32_t *positions = static_cast<const int32_t *>(params[7]);
  float *out = static_cast<float *>(params[8]);
  int64_t cached = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (slots[b] < 0 || slots[b] >= S || positions[b] < 0 || positions[b] >= C) return 3;
    for (int64_t a = 0; a < b; ++a)
      if (slots[a] == slots[b]) return 4;
    cached += positions[b] + 1;
  }
  const int group = static_cast<int>(Hq / Hkv);
  const int64_t tasks = B * Hkv;
  auto task = [&](int64_t i) {   // row b, kv head h: rotate, write this token, then attend over its slot
    const int64_t b = i / Hkv, h = i % Hkv, n = positions[b] + 1;
    const float *row = qkv + b * width, *cos_b = cos + b * d, *sin_b = sin + b * d;
    const int64_t cache = (static_cast<int64_t>(slots[b]) * Hkv + h) * C * d;
    rotate(row + (Hq + h) * d, cos_b, sin_b, nullptr, k_cache + cache + positions[b] * d, d);
    std::memcpy(v_cache + cache + positions[b] * d, row + (Hq + Hkv + h) * d, sizeof(float) * d);
    static thread_local std::vector<float> q;                    // this kv head's group of query heads
    q.resize(static_cast<size_t>(group * d));
    for (int g = 0; g < group; ++g) rotate(row + (h * group + g) * d, cos_b, sin_b, scale, q.data() + g * d, d);
    head(q.data(), k_cache + cache, v_cache + cache, out + (b * Hq + h * group) * d, group, n, d);
  };
  // a second thread once the step reads more than 1 MB of cache (every kv head of every row)
  const int64_t bytes = cached * Hkv * d * 2 * static_cast<int64_t>(sizeof(float));
  cogvlm2::parallel(std::min(tasks, bytes >> 20), [&](int t, int n) {
    for (int64_t i = t; i < tasks; i += n) task(i);
  });
  return 0;
}

// Output shape: (B, Hq d), qkv's width less the keys' and values' 2 Hkv d.
extern "C" std::vector<int64_t> DecodeAttentionInferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)ndims;
  (void)extra;
  return {shapes[0][0], shapes[0][1] - 2 * shapes[4][1] * shapes[4][3]};
}
