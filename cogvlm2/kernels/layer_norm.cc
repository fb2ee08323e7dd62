// y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis (LayerNorm of the vision tower and
// the adapter), one row at a time.
//
// x (..., C) float32, weight (C,), bias (C,), eps (1,) float32, y like x. A MindSpore "aot" Custom CPU
// kernel: FusedLayerNorm(nparam=5, {x, weight, bias, eps, y}).
//
// Why: MindSpore 2.7.2's CPU LayerNorm took 1.0 ms per 771x256 activation, 14% of the bench model's
// vision tower (MindSpore profiler); a row of 256-1792 floats fits in L1, so this is two passes over
// L1 and one write (layer_norm.h: in double, rounded once to float32).
#include <cstdint>
#include <vector>

#include "layer_norm.h"

namespace {

constexpr int64_t kElementsPerThread = 1 << 14;   // a second thread from 16 Ki elements

}  // namespace

extern "C" int FusedLayerNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 5 || ndims[0] < 1 || ndims[1] != 1 || ndims[2] != 1 || ndims[3] != 1 || ndims[4] != ndims[0])
    return 1;
  for (int i = 0; i < 5; ++i)
    if (!cogvlm2::is_float32(dtypes[i])) return 2;
  const int64_t C = shapes[0][ndims[0] - 1];
  if (shapes[1][0] != C || shapes[2][0] != C || shapes[3][0] != 1) return 3;
  int64_t rows = 1;
  for (int d = 0; d < ndims[0]; ++d) {
    if (shapes[4][d] != shapes[0][d]) return 3;
    if (d < ndims[0] - 1) rows *= shapes[0][d];
  }
  if (rows == 0 || C == 0) return 0;
  const float *x = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  const float *bias = static_cast<const float *>(params[2]);
  const double eps = static_cast<const float *>(params[3])[0];
  float *y = static_cast<float *>(params[4]);
  cogvlm2::parallel((rows * C + kElementsPerThread - 1) / kElementsPerThread, [&](int t, int threads) {
    for (int64_t r = rows * t / threads; r < rows * (t + 1) / threads; ++r)
      cogvlm2::layer_norm::normalize_row(x + r * C, weight, bias, y + r * C, C, eps);
  });
  return 0;
}

// Output shape: x's.
extern "C" std::vector<int64_t> FusedLayerNormInferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)extra;
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}
