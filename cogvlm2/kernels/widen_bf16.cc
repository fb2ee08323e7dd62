// y = the float32 values of bfloat16 weights held as their bit patterns (exact): what a Linear whose
// weight is kept in bfloat16 on CPU (model_config param_init_type: bfloat16) hands MindSpore's MatMul
// where no kernel of this library reads the bits itself (gemm: onednn, a LoRA layer's base product).
//
// bits: any shape, uint16; y: the same shape, float32. A MindSpore "aot" Custom CPU kernel:
// WidenBf16(nparam=2, {bits, y}).
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace {

constexpr int64_t kValuesPerThread = 1 << 18;   // a second thread from 256 Ki values (a streaming copy)

}  // namespace

extern "C" int WidenBf16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                         void *stream, void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 2 || ndims[0] != ndims[1]) return 1;
  if (!cogvlm2::is_bf16_bits(dtypes[0]) || !cogvlm2::is_float32(dtypes[1])) return 2;
  int64_t n = 1;
  for (int d = 0; d < ndims[0]; ++d) {
    if (shapes[0][d] != shapes[1][d]) return 3;
    n *= shapes[0][d];
  }
  const uint16_t *bits = static_cast<const uint16_t *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t vectors = n / cogvlm2::kLanes;
  cogvlm2::parallel((n + kValuesPerThread - 1) / kValuesPerThread, [&](int t, int threads) {
    const int64_t begin = vectors * t / threads * cogvlm2::kLanes;
    const int64_t end = t + 1 == threads ? n : vectors * (t + 1) / threads * cogvlm2::kLanes;
    int64_t i = begin;
    for (; i + cogvlm2::kLanes <= end; i += cogvlm2::kLanes) {
      const cogvlm2::vec v = cogvlm2::widen_bf16(bits + i);
      std::memcpy(y + i, &v, sizeof(v));
    }
    for (; i < end; ++i) y[i] = cogvlm2::widen_bf16(bits[i]);
  });
  return 0;
}

// Output shape: the bits' shape.
extern "C" std::vector<int64_t> WidenBf16InferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)extra;
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}
