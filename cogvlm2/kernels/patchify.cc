// Frames -> their non-overlapping square patches as rows: the im2col of a convolution whose stride is
// its kernel size (the vision tower's patch embedding), so the convolution becomes one product.
//
// images (T, C, H, W) float32, size (p,) float32 (its length is the patch size p, its values unused: an
// output shape is inferred from shapes alone), H and W multiples of p; patches
// (T * H/p * W/p, C * p * p): row (t, gy, gx) in frame, then raster order; its values in (c, ky, kx)
// order, the order of a PyTorch convolution weight (out, C, p, p) flattened per output channel.
// A MindSpore "aot" Custom CPU kernel: Patchify(nparam=3, {images, size, patches}).
//
// Why: as a MindSpore reshape and 6-axis Transpose this rearrangement moved runs of 14 floats and took
// 1.27 ms per 6-frame call, more than it saved against oneDNN's convolution; here each run is one
// memcpy of p floats, frames split over the threads.
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

extern "C" int Patchify(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  (void)stream;
  (void)extra;
  if (nparam != 3 || ndims[0] != 4 || ndims[1] != 1 || ndims[2] != 2) return 1;
  for (int i = 0; i < 3; ++i)
    if (!cogvlm2::is_float32(dtypes[i])) return 2;
  const int64_t T = shapes[0][0], C = shapes[0][1], H = shapes[0][2], W = shapes[0][3], p = shapes[1][0];
  if (p <= 0 || H % p != 0 || W % p != 0) return 3;
  const int64_t gh = H / p, gw = W / p, width = C * p * p;
  if (shapes[2][0] != T * gh * gw || shapes[2][1] != width) return 3;
  const float *images = static_cast<const float *>(params[0]);
  float *patches = static_cast<float *>(params[2]);
  const int64_t rows = T * gh * gw;
  cogvlm2::parallel(rows * width >= (1 << 15) ? rows : 1, [&](int t, int n) {
    for (int64_t row = rows * t / n; row < rows * (t + 1) / n; ++row) {
      const int64_t frame = row / (gh * gw), gy = row / gw % gh, gx = row % gw;
      float *out = patches + row * width;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t ky = 0; ky < p; ++ky, out += p)
          std::memcpy(out, images + ((frame * C + c) * H + gy * p + ky) * W + gx * p, sizeof(float) * p);
    }
  });
  return 0;
}

// Output shape: (T * H/p * W/p, C * p * p).
extern "C" std::vector<int64_t> PatchifyInferShape(int *ndims, int64_t **shapes, void *extra) {
  (void)ndims;
  (void)extra;
  const int64_t p = shapes[1][0], frames = shapes[0][0];
  return {frames < 0 ? -1 : frames * (shapes[0][2] / p) * (shapes[0][3] / p), shapes[0][1] * p * p};   // -1: dynamic
}
