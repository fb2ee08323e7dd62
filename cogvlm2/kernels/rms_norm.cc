// y = x * rsqrt(mean(x^2) + eps) * weight over the last axis (the decoder's Llama RMSNorm), one row at
// a time.
//
// x (..., H) float32, weight (H,), eps (1,) float32, y like x. A MindSpore "aot" Custom CPU kernel:
// FusedRMSNorm(nparam=4, {x, weight, eps, y}).
//
// Why: the portable RMSNorm (cogvlm2_layers.RMSNorm) is eight MindSpore kernels (square, a mat-vec
// for the mean, add, rsqrt, two broadcasts, two multiplies): 2.1 ms per 413 x 1024 activation in a
// chain of them with dynamic shapes, nine of them per prefill step of the bench model. A row of up to
// 8192 floats fits in L1, so this is one pass to sum and one to write. The squares are summed in double
// and the row is scaled in double and rounded once to float32.
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace {

using cogvlm2::dvec;

constexpr int64_t kElementsPerThread = 1 << 14;   // a second thread from 16 Ki elements

void rms_norm_row(const float *x, const float *weight, float *y, int64_t H, double eps) {
  const int64_t whole = H / 8 * 8;
  double squares = cogvlm2::sum8(x, whole, [](dvec v) { return v * v; });
  for (int64_t i = whole; i < H; ++i) squares += static_cast<double>(x[i]) * x[i];
  const double scale = 1.0 / std::sqrt(squares / static_cast<double>(H) + eps);
  for (int64_t i = 0; i < whole; i += cogvlm2::kDoubleLanes)
    cogvlm2::stored(y + i, cogvlm2::loadd(x + i) * scale * cogvlm2::loadd(weight + i));
  for (int64_t i = whole; i < H; ++i) y[i] = static_cast<float>(x[i] * scale * weight[i]);
}

}  // namespace

extern "C" int FusedRMSNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4 || ndims[0] < 1 || ndims[1] != 1 || ndims[2] != 1 || ndims[3] != ndims[0]) return 1;
  for (int i = 0; i < 4; ++i)
    if (!cogvlm2::is_float32(dtypes[i])) return 2;
  const int64_t H = shapes[0][ndims[0] - 1];
  if (shapes[1][0] != H || shapes[2][0] != 1) return 3;
  int64_t rows = 1;
  for (int d = 0; d < ndims[0]; ++d) {
    if (shapes[3][d] != shapes[0][d]) return 3;
    if (d < ndims[0] - 1) rows *= shapes[0][d];
  }
  if (rows == 0 || H == 0) return 0;
  const float *x = static_cast<const float *>(params[0]);
  const float *weight = static_cast<const float *>(params[1]);
  const double eps = static_cast<const float *>(params[2])[0];
  float *y = static_cast<float *>(params[3]);
  cogvlm2::parallel((rows * H + kElementsPerThread - 1) / kElementsPerThread, [&](int t, int threads) {
    for (int64_t r = rows * t / threads; r < rows * (t + 1) / threads; ++r)
      rms_norm_row(x + r * H, weight, y + r * H, H, eps);
  });
  return 0;
}

// Output shape: x's.
extern "C" std::vector<int64_t> FusedRMSNormInferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)extra;
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}
