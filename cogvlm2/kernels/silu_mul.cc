// y = silu(gate) * up = gate * sigmoid(gate) * up, element-wise: the SwiGLU of the decoder's MLP and the
// adapter's GLU in one pass.
//
// gate, up float32 of one shape, y like them. A MindSpore "aot" Custom CPU kernel:
// SiluMul(nparam=3, {gate, up, y}).
//
// Why: ops.silu(gate) * up is two MindSpore kernels with a 413 x 2816 intermediate written and read
// again: 2.5 ms per call in a chain of them with dynamic shapes, four per prefill step of the bench
// model. Here each element is read once (silu.h; float32 throughout).
#include <cstdint>
#include <vector>

#include "cpu_common.h"
#include "silu.h"

namespace {

using cogvlm2::kLanes;
using cogvlm2::silu::silu_mul_span;

constexpr int64_t kElementsPerThread = 1 << 15;   // a second thread from 32 Ki elements

}  // namespace

extern "C" int SiluMul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                       void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || ndims[1] != ndims[0] || ndims[2] != ndims[0]) return 1;
  for (int i = 0; i < 3; ++i)
    if (!cogvlm2::is_float32(dtypes[i])) return 2;
  int64_t n = 1;
  for (int d = 0; d < ndims[0]; ++d) {
    if (shapes[1][d] != shapes[0][d] || shapes[2][d] != shapes[0][d]) return 3;
    n *= shapes[0][d];
  }
  if (n == 0) return 0;
  const float *gate = static_cast<const float *>(params[0]);
  const float *up = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  cogvlm2::parallel((n + kElementsPerThread - 1) / kElementsPerThread, [&](int t, int threads) {
    // whole vectors per thread, so only the last span has a tail
    const int64_t begin = n * t / threads / kLanes * kLanes;
    const int64_t end = t + 1 == threads ? n : n * (t + 1) / threads / kLanes * kLanes;
    silu_mul_span(gate + begin, up + begin, y + begin, end - begin);
  });
  return 0;
}

// Output shape: gate's.
extern "C" std::vector<int64_t> SiluMulInferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)extra;
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}
