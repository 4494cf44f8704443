// badnet-jax: the direct 2-D convolution for XLA:CPU, an XLA FFI custom call (built and bound by direct.py).
//
//   out[n, y, x, f] = bias[f] + sum over (dy, dx, c) of in[n, y*sh + dy*dh, x*sw + dx*dw, c] * k[dy, dx, c, f]
//
// NHWC float32 images, an HWIO kernel, no padding (the caller pads). Every output starts from its bias and adds
// its terms in (dy, dx, c) order with fused multiply-adds: a fixed order, so a run computes the same bits on
// any number of threads.
//
// Why a kernel of its own: XLA's CPU convolution packs an image patch matrix whose inner dimension is the
// input channels, which for an RGB first layer (3 channels) leaves the matrix kernel idle (DeepID's conv_1,
// 3 -> 20 channels 4x4, ran at ~20% of the machine's matmul peak). Here the output channels are the vector
// lanes (F channels in vectors of VL lanes, zero-padded) and a register tile holds XT output pixels x FG
// channel vectors: each step of the inner loop loads FG weight vectors, broadcasts one input value per pixel
// and issues XT * FG fused multiply-adds, whatever the input's channel count.
#include <algorithm>
#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;   // float lanes per vector
constexpr int ACC = 24;  // accumulator registers of the 32 (the rest hold weights and a broadcast)
#else
constexpr int VL = 8;
constexpr int ACC = 12;  // of 16 (AVX2) registers
#endif
constexpr int MAX_FG = 4;  // channel vectors per tile: 4 x 16 = 64 channels on AVX-512

// Unaligned vectors: the weights' rows and the output's pixels start at any float.
typedef float vf __attribute__((vector_size(VL * sizeof(float)), aligned(alignof(float))));

struct Geometry {
  int64_t n, h, w, c;          // input
  int64_t kh, kw, f;           // kernel
  int64_t ho, wo;              // output
  int64_t sh, sw, dh, dw;      // strides and dilation
  int64_t fv;                  // channel vectors: ceil(f / VL)
};

// One tile: XT output pixels of row y starting at column x0, channel vectors fg0 .. fg0 + FG - 1.
template <int FG, int XT>
void Tile(const float* __restrict in, const float* __restrict wpad, const float* __restrict bpad,
          float* __restrict out, const Geometry& g, int64_t y, int64_t x0, int64_t fg0) {
  vf acc[XT][FG];
  for (int j = 0; j < FG; ++j) {
    const vf b = *reinterpret_cast<const vf*>(bpad + (fg0 + j) * VL);
    for (int p = 0; p < XT; ++p) acc[p][j] = b;
  }
  const int64_t fstride = g.fv * VL;
  const int64_t pstride = g.sw * g.c;  // input floats between neighbouring output pixels
  for (int64_t dy = 0; dy < g.kh; ++dy) {
    const float* row = in + ((y * g.sh + dy * g.dh) * g.w + x0 * g.sw) * g.c;
    const float* wrow = wpad + dy * g.kw * g.c * fstride + fg0 * VL;
    for (int64_t dx = 0; dx < g.kw; ++dx) {
      const float* col = row + dx * g.dw * g.c;
      const float* wcol = wrow + dx * g.c * fstride;
      for (int64_t ci = 0; ci < g.c; ++ci) {
        vf wv[FG];
        for (int j = 0; j < FG; ++j) wv[j] = *reinterpret_cast<const vf*>(wcol + ci * fstride + j * VL);
        for (int p = 0; p < XT; ++p) {
          const float s = col[p * pstride + ci];
          for (int j = 0; j < FG; ++j) acc[p][j] += s * wv[j];
        }
      }
    }
  }
  for (int p = 0; p < XT; ++p) {
    float* o = out + (y * g.wo + x0 + p) * g.f + fg0 * VL;
    for (int j = 0; j < FG; ++j) {
      const int64_t left = g.f - (fg0 + j) * VL;
      if (left >= VL) {
        *reinterpret_cast<vf*>(o + j * VL) = acc[p][j];
      } else {
        for (int64_t l = 0; l < left; ++l) o[j * VL + l] = acc[p][j][l];
      }
    }
  }
}

using TileFn = void (*)(const float*, const float*, const float*, float*, const Geometry&, int64_t, int64_t,
                        int64_t);

// TILES<FG>[xt] = Tile<FG, xt> for xt = 1 .. ACC / FG (index 0 unused).
template <int FG, int... XT>
constexpr std::array<TileFn, sizeof...(XT) + 1> MakeTiles(std::integer_sequence<int, XT...>) {
  return {nullptr, &Tile<FG, XT + 1>...};
}
template <int FG>
constexpr auto TILES = MakeTiles<FG>(std::make_integer_sequence<int, ACC / FG>{});

// One output row, channel vectors fg0 .. fg0 + FG - 1: the row's width cut into tiles as even as the
// register budget allows (44 columns by 12 -> 4 x 11), so no column is computed twice.
template <int FG>
void Row(const float* in, const float* wpad, const float* bpad, float* out, const Geometry& g, int64_t y,
         int64_t fg0) {
  constexpr int64_t xt = ACC / FG;
  const int64_t tiles = (g.wo + xt - 1) / xt;
  const int64_t base = g.wo / tiles, wider = g.wo % tiles;  // the first `wider` tiles take one more column
  int64_t x0 = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t width = base + (t < wider ? 1 : 0);
    TILES<FG>[width](in, wpad, bpad, out, g, y, x0, fg0);
    x0 += width;
  }
}

void OutputRow(const float* in, const float* wpad, const float* bpad, float* out, const Geometry& g,
               int64_t y) {
  int64_t fg0 = 0;
  for (; fg0 + MAX_FG <= g.fv; fg0 += MAX_FG) Row<MAX_FG>(in, wpad, bpad, out, g, y, fg0);
  switch (g.fv - fg0) {
    case 3: Row<3>(in, wpad, bpad, out, g, y, fg0); break;
    case 2: Row<2>(in, wpad, bpad, out, g, y, fg0); break;
    case 1: Row<1>(in, wpad, bpad, out, g, y, fg0); break;
    default: break;
  }
}

// Work shared by the calling thread and helpers from XLA's intra-op pool: rows handed out in chunks by an
// atomic counter. The caller works too and waits only for chunks already taken, so a helper the pool starts
// late finds nothing left and returns (it holds the state by shared_ptr; it never touches the buffers).
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t total = 0, chunk = 1;
  std::mutex mu;
  std::condition_variable finished;
};

ffi::Error Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> out, int64_t sh, int64_t sw, int64_t dh, int64_t dw) {
  const auto xd = x.dimensions(), kd = k.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || od.size() != 4 || b.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("badnet_conv2d_direct: expects (N,H,W,C) images, a (kh,kw,C,F) kernel, "
                                       "an (F,) bias and an (N,Ho,Wo,F) output");
  }
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], od[1], od[2], sh, sw, dh, dw, 0};
  g.fv = (g.f + VL - 1) / VL;
  if (kd[2] != g.c || b.dimensions()[0] != g.f || od[0] != g.n || od[3] != g.f || sh < 1 || sw < 1 || dh < 1 ||
      dw < 1 || g.ho < 1 || g.wo < 1 || (g.ho - 1) * sh + (g.kh - 1) * dh + 1 > g.h ||
      (g.wo - 1) * sw + (g.kw - 1) * dw + 1 > g.w) {
    return ffi::Error::InvalidArgument("badnet_conv2d_direct: inconsistent shapes, strides or dilation");
  }
  if (g.n == 0) return ffi::Error::Success();
  // The kernel and bias with each pixel's F channels padded to whole vectors (zeros: exact).
  auto wpad = std::make_shared<std::vector<float>>(g.kh * g.kw * g.c * g.fv * VL + VL, 0.0f);
  auto bpad = std::make_shared<std::vector<float>>(g.fv * VL + VL, 0.0f);
  for (int64_t i = 0; i < g.kh * g.kw * g.c; ++i) {
    std::memcpy(wpad->data() + i * g.fv * VL, k.typed_data() + i * g.f, g.f * sizeof(float));
  }
  std::memcpy(bpad->data(), b.typed_data(), g.f * sizeof(float));

  const float* in = x.typed_data();
  float* o = out->typed_data();
  const int64_t img_in = g.h * g.w * g.c, img_out = g.ho * g.wo * g.f;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto work = std::make_shared<Work>();
  work->total = g.n * g.ho;
  work->chunk = std::max<int64_t>(1, work->total / (threads * 8));
  auto run = [work, wpad, bpad, in, o, g, img_in, img_out]() {
    for (;;) {
      const int64_t start = work->next.fetch_add(work->chunk);
      if (start >= work->total) return;
      const int64_t stop = std::min(work->total, start + work->chunk);
      for (int64_t r = start; r < stop; ++r) {
        const int64_t i = r / g.ho, y = r % g.ho;
        OutputRow(in + i * img_in, wpad->data(), bpad->data(), o + i * img_out, g, y);
      }
      if (work->done.fetch_add(stop - start) + (stop - start) == work->total) {
        std::lock_guard<std::mutex> lock(work->mu);
        work->finished.notify_all();
      }
    }
  };
  const int64_t chunks = (work->total + work->chunk - 1) / work->chunk;
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) {
    auto helper = run;
    pool.Schedule(std::move(helper));
  }
  run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->finished.wait(lock, [&] { return work->done.load() == work->total; });
  return ffi::Error::Success();
}

}  // namespace

// The vector width this build uses (Python reads it to model the kernel's lane use).
extern "C" int badnet_conv2d_direct_lanes() { return VL; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(badnet_conv2d_direct, Conv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("dh")
                                  .Attr<int64_t>("dw"));
