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
// transposed (d, L) and its values (L, d) once, then groups of 16 blocks of 4 query rows get their
// scores, softmax and output (attention_core.h, shared with the decoder's prefill kernel).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_core.h"

namespace {

using namespace cogvlm2::attention;

// One (frame, head): qkv (L, 3C) of the frame, out (L, C) of the frame.
void frame_head(const float *qkv, float *out, int64_t L, int64_t C, int64_t d, int64_t h, float scale, Scratch &w) {
  const int64_t Lp = round_up(L, cogvlm2::kLanes), width = 3 * C;
  w.pack(qkv + C + h * d, qkv + 2 * C + h * d, width, L, d);
  for (int64_t i0 = 0; i0 < L; i0 += kGroupRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kGroupRows, L - i0));
    const int blocks = (rows + kRows - 1) / kRows;
    const float *queries[kGroupRows];
    float *outputs[kGroupRows];
    int block_rows[kGroup];
    int64_t ends[kGroup], padded_ends[kGroup];
    for (int r = 0; r < rows; ++r) {
      queries[r] = qkv + (i0 + r) * width + h * d;
      outputs[r] = out + (i0 + r) * C + h * d;
    }
    for (int b = 0; b < blocks; ++b) {
      block_rows[b] = std::min(kRows, rows - b * kRows);
      ends[b] = L;
      padded_ends[b] = Lp;
    }
    w.load_queries(queries, rows, d, scale);
    score_group(w, blocks, padded_ends, d, Lp);
    for (int b = 0; b < blocks; ++b) softmax_rows(&w.scores[b * kRows * Lp], Lp, block_rows[b], L, Lp);
    weigh_group(w, blocks, block_rows, ends, outputs, Lp, d);
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
