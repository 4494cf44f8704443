// badnet-jax: the direct 2-D convolution for XLA:CPU, an XLA FFI custom call (built by native.py, bound by
// direct.py).
//
//   out[n, y, x, f] = bias[f] + sum over (dy, dx, c) of in[n, y*sh + dy*dh, x*sw + dx*dw, c] * k[dy, dx, c, f]
//
// NHWC float32 images, an HWIO kernel, no padding (the caller pads). Every output starts from its bias and adds
// its terms in (dy, dx, c) order with fused multiply-adds: a fixed order, so a run computes the same bits on
// any number of threads. An optional epilogue takes the max over ph x pw windows (stride = window, VALID) and
// then a ReLU: the max pool and ReLU of a CNN stage, without writing the convolution's output to memory.
//
// Why a kernel of its own: XLA's CPU convolution packs an image patch matrix whose inner dimension is the
// input channels, which for an RGB first layer (3 channels) leaves the matrix kernel idle (DeepID's conv_1,
// 3 -> 20 channels 4x4, runs at ~20% of the matmul peak in XLA's form). Here the output channels are the vector
// lanes (F channels in vectors of VL lanes, zero-padded) and a register tile holds XT output pixels x FG
// channel vectors: each step of the inner loop loads FG weight vectors, broadcasts one input value per pixel
// and issues XT * FG fused multiply-adds, whatever the input's channel count. For few output channels the
// columns form (below) makes neighbouring output columns the lanes instead; both add the same terms in the same
// order, so the `form` attribute (0: the rule in ColumnsPay, 1: channels, 2: columns) never changes a bit, but
// for one case the defense never meets (pixels and weights are checked finite): a NaN pixel times a NaN weight
// gives a NaN either way, with the payload of whichever operand the compiler put first in that instruction.
#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include <immintrin.h>

#include "parallel_for.h"
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
// Channel vectors per tile: 4 x 16 = 64 channels on AVX-512 (6 pixels: 24 accumulators, the 4 weight vectors and
// a broadcast in registers). On AVX2 (12 accumulators) 3 or 4 vectors leave tiles of 4 or 3 pixels, and GCC 12
// takes the weight from memory in each multiply-add of a tile of at most 4 pixels: 15-16 loads per 12
// multiply-adds, against 8 in the 2 x 6 tile, and the stage was load-bound (DeepID's conv_2 on a 2-core Zen 3:
// 92-116 -> 79-82 ms per 1024 images). Tiles of at most 4 pixels (a row's last, or a short row's) hold their
// weights in registers by an empty asm in Tile, on 8 lanes and 16 (a 3 x 4 tile with it, 16 registers, is not
// measured).
constexpr int MAX_FG = VL == 16 ? 4 : 2;
static_assert(MAX_FG >= 1 && MAX_FG <= 4, "ConvRow's remainder covers at most 3 channel vectors");

// Values in registers (and their spills) are whole vectors; memory is read and written through `vu`, the same
// vector at a float's alignment (the weights' rows and the output's pixels start at any float). Clang spills a
// reduced-alignment value type with aligned stores to an unaligned stack slot, so the two are kept apart.
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef float vu __attribute__((vector_size(VL * sizeof(float)), aligned(alignof(float))));

struct Geometry {
  int64_t n, h, w, c;          // input
  int64_t kh, kw, f;           // kernel
  int64_t ho, wo;              // output
  int64_t sh, sw, dh, dw;      // strides and dilation
  int64_t fv;                  // channel vectors: ceil(f / VL)
  int64_t ph, pw, relu;        // the epilogue: max over ph x pw windows (1 x 1: none), then max(., 0) if relu
  int64_t hq, wq;              // the written output's rows and columns (ho / ph, wo / pw)
  int64_t width;               // the convolution's columns the output needs (wo, or wq * pw with an epilogue)
  int64_t wp;                  // the columns form's planar rows: w + VL (zeros past the image)
};

// One tile: XT output pixels of row y starting at column x0, channel vectors fg0 .. fg0 + FG - 1, written to
// `row_out` (the row's wo x f outputs).
template <int FG, int XT>
void Tile(const float* __restrict in, const float* __restrict wpad, const float* __restrict bpad,
          float* __restrict row_out, const Geometry& g, int64_t y, int64_t x0, int64_t fg0, int64_t ostride) {
  vf acc[XT][FG];
  for (int j = 0; j < FG; ++j) {
    const vf b = *reinterpret_cast<const vu*>(bpad + (fg0 + j) * VL);
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
        for (int j = 0; j < FG; ++j) wv[j] = *reinterpret_cast<const vu*>(wcol + ci * fstride + j * VL);
        if constexpr (XT <= 4) {
          // GCC 12 tuned for Zen (`-mtune=znver3`: what `-march=native` makes of a Zen 3, and of a Zen 4 with
          // 16 lanes) folds each weight's load into every multiply-add of a tile of at most 4 pixels (XT loads of
          // it where 1 does; generic tuning, `x86-64-v4`, in tiles of at most 3): the empty asm puts it in a
          // register (DeepID's conv_3, 8 columns: 40-45 -> 26.5-30 ms per 1024 images on a Zen 3, 28.5-33.7 ->
          // 20.0-20.6 on a Zen 4 with 16 lanes, where 64 -> 64 channels on a 10 x 10 map, pooled, took 33.7-42.9
          // -> 24.5-24.9). Wider tiles, and Intel tunings of short ones, keep their weights in registers as they
          // are (an Intel Xeon's `-march=native`, rocketlake: the same inner loop with the asm and without;
          // DeepID's conv_3 18.6-19.9 ms per 1024 images either way; a Zen-tuned build, `-mtune=znver3`, on that
          // Xeon: 34-39 ms per 2048 with it, 57-60 without). Without AVX a 32-byte vector fits no register (an
          // SSE-only build emulates it): no asm.
#if defined(__AVX__)
          for (int j = 0; j < FG; ++j) __asm__("" : "+v"(wv[j]));
#endif
        }
        // Unrolled whole, so every accumulator is a register: GCC 12 left the 16-lane tiles of a channel vector by
        // 18 to 24 pixels rolled, an accumulator loaded and stored around each multiply-add, and stored those of
        // 17 pixels to the stack and back at every tap column (every AVX-512 tuning; 8 lanes were whole already).
        // On an Intel Xeon (AVX-512) 16 -> 16 channels on a 20 x 20 map ('same', Tile<1, 20>) took 11.6-11.7
        // against 17.9-18.2 ms per 1024 images rolled, 1.5-1.6x; tiles of 16 pixels, whole either way, alike.
        #pragma GCC unroll 32
        for (int p = 0; p < XT; ++p) {
          const float s = col[p * pstride + ci];
          #pragma GCC unroll 32
          for (int j = 0; j < FG; ++j) acc[p][j] += s * wv[j];
        }
      }
    }
  }
  for (int p = 0; p < XT; ++p) {
    float* o = row_out + (x0 + p) * ostride + fg0 * VL;
    for (int j = 0; j < FG; ++j) {
      // A scratch row holds whole vectors per pixel (ostride = fv * VL); the output holds f channels. Written
      // here rather than by StorePart (below): with its masked store inlined, GCC 12 took short tiles' weights
      // from memory and spilled wider tiles' accumulators (test_native's register checks).
      const int64_t left = ostride - (fg0 + j) * VL;
      if (left >= VL) {
        *reinterpret_cast<vu*>(o + j * VL) = acc[p][j];
      } else {
        for (int64_t l = 0; l < left; ++l) o[j * VL + l] = acc[p][j][l];
      }
    }
  }
}

// part(start, count) over [0, total) cut into as few parts of at most `most` as can be, as even as can be (the
// first total % parts one longer: 44 by 12 -> 4 x 11, 20 by 8 -> 7, 7, 6): a register tile's width or channels.
template <typename Part>
inline void EvenParts(int64_t total, int64_t most, Part part) {
  if (total <= 0) return;
  const int64_t parts = (total + most - 1) / most, base = total / parts, wider = total % parts;
  for (int64_t t = 0, start = 0; t < parts; ++t) {
    const int64_t count = base + (t < wider ? 1 : 0);
    part(start, count);
    start += count;
  }
}

using TileFn = void (*)(const float*, const float*, const float*, float*, const Geometry&, int64_t, int64_t,
                        int64_t, int64_t);

// TILES<FG>[xt] = Tile<FG, xt> for xt = 1 .. ACC / FG (index 0 unused).
template <int FG, int... XT>
constexpr std::array<TileFn, sizeof...(XT) + 1> MakeTiles(std::integer_sequence<int, XT...>) {
  return {nullptr, &Tile<FG, XT + 1>...};
}
template <int FG>
constexpr auto TILES = MakeTiles<FG>(std::make_integer_sequence<int, ACC / FG>{});

// Columns 0 .. width - 1 of output row y, channel vectors fg0 .. fg0 + FG - 1: the width cut into tiles as even
// as the register budget allows (44 columns by 12 -> 4 x 11), so no column is computed twice.
template <int FG>
void Row(const float* in, const float* wpad, const float* bpad, float* row_out, const Geometry& g, int64_t y,
         int64_t width, int64_t fg0, int64_t ostride) {
  EvenParts(width, ACC / FG, [&](int64_t x0, int64_t cols) {
    TILES<FG>[cols](in, wpad, bpad, row_out, g, y, x0, fg0, ostride);
  });
}

void ConvRow(const float* in, const float* wpad, const float* bpad, float* row_out, const Geometry& g, int64_t y,
             int64_t width, int64_t ostride) {
  int64_t fg0 = 0;
  for (; fg0 + MAX_FG <= g.fv; fg0 += MAX_FG) Row<MAX_FG>(in, wpad, bpad, row_out, g, y, width, fg0, ostride);
  switch (g.fv - fg0) {
    case 3: Row<3>(in, wpad, bpad, row_out, g, y, width, fg0, ostride); break;
    case 2: Row<2>(in, wpad, bpad, row_out, g, y, width, fg0, ostride); break;
    case 1: Row<1>(in, wpad, bpad, row_out, g, y, width, fg0, ostride); break;
    default: break;
  }
}

// A NaN wins, so a NaN input shows in every window it reaches (XLA's reduce_window may drop it; the defense never
// has one: pixels and weights are checked finite when read).
inline vf Max(vf a, vf b) { return (a > b || a != a) ? a : b; }

// The first `left` floats of v to o (all VL where left >= VL); on AVX-512 one masked store.
inline void StorePart(float* o, vf v, int64_t left) {
  if (left >= VL) {
    *reinterpret_cast<vu*>(o) = v;
    return;
  }
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(o, static_cast<__mmask16>((1u << left) - 1), reinterpret_cast<__m512&>(v));
#else
  for (int64_t l = 0; l < left; ++l) o[l] = v[l];
#endif
}

// The windows of written row q from the convolution's rows in `scratch` (row stride `row`, whole vectors per
// pixel): each window's max and the ReLU. PH, PW as in ColWindows (DeepID's conv_2 and conv_3 stages on the
// same Xeon: 67.5 -> 65.1 and 33.3 -> 32.2 ms per 2048 images, the partial vector's store masked too).
template <int PH, int PW>
void Windows(const float* scratch, float* o, const Geometry& g, int64_t row) {
  const int64_t ph = PH ? PH : g.ph, pw = PW ? PW : g.pw, pix = g.fv * VL;
  const vf zero = {};
  for (int64_t j = 0; j < g.wq; ++j) {
    for (int64_t v = 0; v < g.fv; ++v) {
      const float* first = scratch + j * pw * pix + v * VL;
      vf m = *reinterpret_cast<const vu*>(first);
      #pragma GCC unroll 4
      for (int64_t r = 0; r < ph; ++r) {
        #pragma GCC unroll 4
        for (int64_t s = (r == 0 ? 1 : 0); s < pw; ++s) m = Max(*reinterpret_cast<const vu*>(first + r * row + s * pix), m);
      }
      if (g.relu) m = Max(m, zero);
      StorePart(o + j * g.f + v * VL, m, g.f - v * VL);
    }
  }
}

// Written row q of one image: the convolution's rows q * ph .. q * ph + ph - 1 (only the wq * pw columns the
// windows read; whole vectors per pixel) into `scratch`, a few KB that stay in the L1 cache, then their windows.
// Without an epilogue the convolution's row goes straight to the output.
void OutputRow(const float* in, const float* wpad, const float* bpad, float* out, float* scratch,
               const Geometry& g, int64_t q) {
  if (g.ph == 1 && g.pw == 1 && !g.relu) {
    ConvRow(in, wpad, bpad, out + q * g.wo * g.f, g, q, g.wo, g.f);
    return;
  }
  const int64_t width = g.wq * g.pw, pix = g.fv * VL, row = width * pix;
  for (int64_t r = 0; r < g.ph; ++r) ConvRow(in, wpad, bpad, scratch + r * row, g, q * g.ph + r, width, pix);
  float* o = out + q * g.wq * g.f;
  if (g.ph == 2 && g.pw == 2) {
    Windows<2, 2>(scratch, o, g, row);
  } else {
    Windows<0, 0>(scratch, o, g, row);
  }
}

// ---- The columns form: vectors over output columns ----
//
// For few output channels (DeepID's conv_1: 20 channels fill 20 of 32 lanes in the channel form) the vector lanes
// hold VL neighbouring output columns of one channel instead (44 columns fill 44 of 48). The image is first laid
// out planar (row, channel, column; zero-padded by a vector), so a step loads XV column vectors and multiplies
// them by FT broadcast weights: XV * FT fused multiply-adds per XV loads. Each output still starts from its bias
// and adds its terms in (dy, dx, c) order, so both forms compute the same bits. Unit column stride only.

// Row y's columns x0 .. x0 + XV * VL - 1 of channels f0 .. f0 + FT - 1 into conv[f][x] (stride cstride).
// The loops over the tile's registers are unrolled whole before GCC places the accumulators (`#pragma GCC
// unroll`): otherwise it keeps copies of them on the stack, stored and reloaded around the tap loop (63 stack
// accesses in the 3 x 7 tile, none with the pragmas; the channel form's Tile likewise).
template <int XV, int FT>
void ColTile(const float* __restrict planar, const int64_t* __restrict taps, const float* __restrict k,
             const float* __restrict bias, float* __restrict conv, const Geometry& g, int64_t cstride, int64_t y,
             int64_t x0, int64_t f0) {
  vf acc[XV][FT];
  #pragma GCC unroll 32
  for (int t = 0; t < FT; ++t) {
    const vf b = bias[f0 + t] - vf{};  // the bias in every lane, -0.0 kept (+0 + -0 would give +0)
    #pragma GCC unroll 32
    for (int v = 0; v < XV; ++v) acc[v][t] = b;
  }
  // One flat loop over the kh * kw * c taps in (dy, dx, c) order: `taps` holds each one's planar offset, and
  // the kernel's rows for consecutive taps are consecutive (HWIO).
  const float* base = planar + y * g.sh * g.c * g.wp + x0;
  const float* kc = k + f0;
  const int64_t steps = g.kh * g.kw * g.c;
  for (int64_t i = 0; i < steps; ++i, kc += g.f) {
    const float* src = base + taps[i];
    vf iv[XV];
    #pragma GCC unroll 32
    for (int v = 0; v < XV; ++v) iv[v] = *reinterpret_cast<const vu*>(src + v * VL);
    #pragma GCC unroll 32
    for (int t = 0; t < FT; ++t) {
      const float w = kc[t];
      #pragma GCC unroll 32
      for (int v = 0; v < XV; ++v) acc[v][t] += iv[v] * w;
    }
  }
  #pragma GCC unroll 32
  for (int t = 0; t < FT; ++t) {
    #pragma GCC unroll 32
    for (int v = 0; v < XV; ++v) *reinterpret_cast<vu*>(conv + (f0 + t) * cstride + x0 + v * VL) = acc[v][t];
  }
}

using ColTileFn = void (*)(const float*, const int64_t*, const float*, const float*, float*, const Geometry&,
                           int64_t, int64_t, int64_t, int64_t);
// Column vectors per tile. AVX2 has 16 registers: 4 input vectors, 12 accumulators and a broadcast weight would
// need 17, and GCC spills (DeepID's conv_1 stage in this form on a 2-core Zen 3: 66 -> 47 ms per 1024 images).
constexpr int MAX_XV = VL == 16 ? 4 : 3;

// COL_TILES<XV>[ft] = ColTile<XV, ft> for ft = 1 .. ACC / XV (index 0 unused).
template <int XV, int... FT>
constexpr std::array<ColTileFn, sizeof...(FT) + 1> MakeColTiles(std::integer_sequence<int, FT...>) {
  return {nullptr, &ColTile<XV, FT + 1>...};
}
template <int XV>
constexpr auto COL_TILES = MakeColTiles<XV>(std::make_integer_sequence<int, ACC / XV>{});

template <int XV>
void ColChunk(const float* planar, const int64_t* taps, const float* k, const float* bias, float* conv,
              const Geometry& g, int64_t cstride, int64_t y, int64_t x0) {
  EvenParts(g.f, ACC / XV, [&](int64_t f0, int64_t n) {  // the channels as even as the registers allow
    COL_TILES<XV>[n](planar, taps, k, bias, conv, g, cstride, y, x0, f0);
  });
}

// Convolution row y, all channels, the first g.width columns (rounded up to whole vectors) into conv[f][x].
void ColRow(const float* planar, const int64_t* taps, const float* k, const float* bias, float* conv,
            const Geometry& g, int64_t cstride, int64_t y) {
  const int64_t nv = (g.width + VL - 1) / VL;
  int64_t v0 = 0;
  for (; v0 + MAX_XV <= nv; v0 += MAX_XV) ColChunk<MAX_XV>(planar, taps, k, bias, conv, g, cstride, y, v0 * VL);
  switch (nv - v0) {
    case 3: ColChunk<3>(planar, taps, k, bias, conv, g, cstride, y, v0 * VL); break;
    case 2: ColChunk<2>(planar, taps, k, bias, conv, g, cstride, y, v0 * VL); break;
    case 1: ColChunk<1>(planar, taps, k, bias, conv, g, cstride, y, v0 * VL); break;
    default: break;
  }
}

// Lanes j0 .. j0 + VL - 1 of window column s: row[(j0 + l) * pw + s].
inline vf WindowColumn(const float* row, int64_t pw, int64_t j0, int64_t s) {
  const float* first = row + j0 * pw;
  if (pw == 1) return *reinterpret_cast<const vu*>(first);
  if (pw == 2) {
    const vf a = *reinterpret_cast<const vu*>(first), b = *reinterpret_cast<const vu*>(first + VL);
#if defined(__AVX512F__)
#define BADNET_EVENS 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define BADNET_ODDS 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#else
#define BADNET_EVENS 0, 2, 4, 6, 8, 10, 12, 14
#define BADNET_ODDS 1, 3, 5, 7, 9, 11, 13, 15
#endif
#if defined(__clang__)
    return s == 0 ? __builtin_shufflevector(a, b, BADNET_EVENS) : __builtin_shufflevector(a, b, BADNET_ODDS);
#else
    typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
    return s == 0 ? __builtin_shuffle(a, b, vi{BADNET_EVENS}) : __builtin_shuffle(a, b, vi{BADNET_ODDS});
#endif
#undef BADNET_EVENS
#undef BADNET_ODDS
  }
  vf out;
  for (int l = 0; l < VL; ++l) out[l] = first[l * pw + s];
  return out;
}

#if defined(__AVX512F__)
// The 16 x 16 block r[row][lane] transposed in registers (r[l][t] = old r[t][l]): pairs of rows interleaved,
// then pairs of pairs, then 128-bit quarters twice. Pure data movement: every bit (NaN, -0.0) kept.
inline void Transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int b = 0; b < 16; b += 4) {  // r[b + c]: rows b .. b + 3 of columns c, c + 4, c + 8, c + 12
    const __m512d t0 = _mm512_castps_pd(t[b]), t1 = _mm512_castps_pd(t[b + 1]);
    const __m512d t2 = _mm512_castps_pd(t[b + 2]), t3 = _mm512_castps_pd(t[b + 3]);
    r[b] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
    r[b + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
    r[b + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
    r[b + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
  }
  for (int h = 0; h < 16; h += 8) {  // t[h + c]: rows h .. h + 7 of columns c and c + 8 (c < 8)
    for (int c = 0; c < 4; ++c) {
      t[h + c] = _mm512_shuffle_f32x4(r[h + c], r[h + 4 + c], 0x88);
      t[h + 4 + c] = _mm512_shuffle_f32x4(r[h + c], r[h + 4 + c], 0xdd);
    }
  }
  for (int c = 0; c < 8; ++c) {
    r[c] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd);
  }
}
#endif

// rows[t] holds VL output columns of channel t (t < channels): their first `lanes` columns to out[l * stride + t].
// On AVX-512 one register transpose and a masked store per column instead of a scatter per channel (DeepID's
// conv_1 stage: 78-81 -> 68-71 ms per 2048 images on a 2-core Zen 4; on an Intel Xeon the same either way,
// 29.4 ms per 1024, and 32x32x3 'same' -> 16 10.3 against 11.3 ms); elsewhere element by element (an 8 x 8
// transpose on AVX2 gained nothing on a Zen 3).
inline void StoreColumns(float* out, int64_t stride, vf* rows, int64_t channels, int64_t lanes) {
#if defined(__AVX512F__)
  __m512 r[VL];
  for (int t = 0; t < VL; ++t) r[t] = t < channels ? reinterpret_cast<__m512&>(rows[t]) : _mm512_setzero_ps();
  Transpose16(r);
  const __mmask16 keep = static_cast<__mmask16>((1u << channels) - 1);
  for (int64_t l = 0; l < lanes; ++l) _mm512_mask_storeu_ps(out + l * stride, keep, r[l]);
#else
  for (int64_t l = 0; l < lanes; ++l) {
    for (int64_t t = 0; t < channels; ++t) out[l * stride + t] = rows[t][l];
  }
#endif
}

// The windows of written row q from its ph convolution rows in `conv` ([r][f][x]): each window's max (the channel
// form's order: (0, 0) first, then row by row) and the ReLU, VL windows of up to VL channels at a time,
// transposed into the output's (column, channel) order. PH, PW > 0 fix the window when compiled (the 2 x 2 pool
// of most CNNs, and none): the general loops' bookkeeping cost more than the maxima (DeepID's conv_1 stage on a
// 2-core Intel Xeon, AVX-512: the epilogue took a quarter of its time; with the window known 57.6 -> 51.1 ms per
// 2048 images, unpooled 70.3 -> 56.8); 0 takes g's.
template <int PH, int PW>
void ColWindows(const float* conv, float* o, const Geometry& g, int64_t cstride) {
  const int64_t ph = PH ? PH : g.ph, pw = PW ? PW : g.pw, plane = g.f * cstride;
  const vf zero = {};
  vf rows[VL];
  for (int64_t j0 = 0; j0 < g.wq; j0 += VL) {
    for (int64_t f0 = 0; f0 < g.f; f0 += VL) {
      const int64_t channels = std::min<int64_t>(VL, g.f - f0);
      for (int64_t t = 0; t < channels; ++t) {
        const float* first = conv + (f0 + t) * cstride;
        vf m = WindowColumn(first, pw, j0, 0);
        #pragma GCC unroll 4
        for (int64_t r = 0; r < ph; ++r) {
          #pragma GCC unroll 4
          for (int64_t s = (r == 0 ? 1 : 0); s < pw; ++s) m = Max(WindowColumn(first + r * plane, pw, j0, s), m);
        }
        rows[t] = g.relu ? Max(m, zero) : m;
      }
      StoreColumns(o + j0 * g.f + f0, g.f, rows, channels, std::min<int64_t>(VL, g.wq - j0));
    }
  }
}

// Written row q of one image (its planar layout given) by the columns form: the ph convolution rows into
// `conv`, then their windows (ColWindows).
void ColOutputRow(const float* planar, const int64_t* taps, const float* k, const float* bias, float* out,
                  float* conv, const Geometry& g, int64_t cstride, int64_t q) {
  const int64_t plane = g.f * cstride;
  for (int64_t r = 0; r < g.ph; ++r) ColRow(planar, taps, k, bias, conv + r * plane, g, cstride, q * g.ph + r);
  float* o = out + q * g.wq * g.f;
  if (g.ph == 2 && g.pw == 2) {
    ColWindows<2, 2>(conv, o, g, cstride);
  } else if (g.ph == 1 && g.pw == 1) {
    ColWindows<1, 1>(conv, o, g, cstride);
  } else {
    ColWindows<0, 0>(conv, o, g, cstride);
  }
}

#if defined(__AVX512F__)
// A mask of the first m of 16 lanes (none for m <= 0, all for m >= 16).
inline __mmask16 FirstLanes(int64_t m) {
  return static_cast<__mmask16>(m >= 16 ? 0xffffu : (1u << std::max<int64_t>(m, 0)) - 1);
}
#endif

// One image's (h, w, c) pixels as rows of one channel each, (h * c, wp) (the columns past w stay as they are).
// RGB images (c = 3, every CNN's first layer) on AVX-512: 16 pixels' 48 values by three loads, two lane
// permutes per channel and a store instead of element by element (DeepID's conv_1 stage: 68-71 -> 63-65 ms).
void ToPlanar(const float* __restrict image, float* __restrict planar, int64_t h, int64_t w, int64_t c,
              int64_t wp) {
#if defined(__AVX512F__)
  if (c == 3) {
    __m512i from_ab[3], from_xc[3];  // channel k: value i is element 3i + k of the 48, from (a, b) then c
    for (int k = 0; k < 3; ++k) {
      alignas(64) int32_t first[16], second[16];
      for (int i = 0; i < 16; ++i) {
        first[i] = 3 * i + k < 32 ? 3 * i + k : 0;
        second[i] = 3 * i + k < 32 ? i : 16 + 3 * i + k - 32;
      }
      from_ab[k] = _mm512_load_si512(first);
      from_xc[k] = _mm512_load_si512(second);
    }
    for (int64_t y = 0; y < h; ++y) {
      const float* src = image + y * w * 3;
      float* dst = planar + y * 3 * wp;
      for (int64_t x0 = 0; x0 < w; x0 += 16) {
        const int64_t n = std::min<int64_t>(16, w - x0), values = 3 * n;
        const float* p = src + 3 * x0;
        const __m512 va = _mm512_maskz_loadu_ps(FirstLanes(values), p);
        const __m512 vb = _mm512_maskz_loadu_ps(FirstLanes(values - 16), p + 16);
        const __m512 vc = _mm512_maskz_loadu_ps(FirstLanes(values - 32), p + 32);
        for (int k = 0; k < 3; ++k) {
          const __m512 ab = _mm512_permutex2var_ps(va, from_ab[k], vb);
          _mm512_mask_storeu_ps(dst + k * wp + x0, FirstLanes(n), _mm512_permutex2var_ps(ab, from_xc[k], vc));
        }
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < h * c; ++r) {
    const float* src = image + (r / c) * w * c + r % c;
    float* dst = planar + r * wp;
    for (int64_t x = 0; x < w; ++x) dst[x] = src[x * c];
  }
}

// Whether the columns form runs faster, by rules read off grids measured per vector width (docs/benchmarks.md).
// 16 lanes (AVX-512; 3 and 16 input channels, 5 to 36 output channels, 20 to 60 output columns, with the ReLU and
// a 2x2 pool): the columns must fill at least a quarter more of their lanes than the channels do (DeepID's
// conv_1: 44 of 48 against 20 of 32), or, where the channels do not fill one vector (there the channel form ran
// 1.26-3.6x slower), no less than 0.15 fewer. 8 lanes (AVX2, a 2-core Zen 3; 28 stages, 3 to 64 input channels
// into 8 to 100, 8 to 44 output columns, with and without a 2x2 pool): the columns where they fill more of
// their lanes than the channels and the input has fewer than 4 channels (an RGB first layer: DeepID's conv_1,
// 1.2x); elsewhere the columns were at most 1.1x faster and up to 1.4-1.6x slower, whatever the lanes filled
// (DeepID's conv_3, 8 columns: the channels 1.14x faster, their 2 x 4 tiles' weights in registers). It picked
// the faster form or one within 1.1x of it in each of 18 stages with this build (and in two runs of 28 stages
// before the asm in Tile, but for the 8-column rows). Unit column stride only. In integers: the same choice on
// every run.
// Fewer input channels than this: an RGB first layer (kernels/conv2d/api.py's FEW_CHANNELS names the same case for
// its choice between this kernel and XLA's convolution).
constexpr int64_t FEW_INPUT_CHANNELS = 4;

bool ColumnsPay(const Geometry& g) {
  if (g.sw != 1) return false;
  const int64_t fpad = g.fv * VL, wpad = (g.width + VL - 1) / VL * VL;
  const int64_t gain = g.width * fpad - g.f * wpad;  // (columns' share - channels' share) * wpad * fpad
  if (VL == 8) return gain > 0 && g.c < FEW_INPUT_CHANNELS;
  return 4 * gain >= wpad * fpad || (g.f < VL && 20 * gain >= -3 * wpad * fpad);
}

ffi::Error Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> b,
                ffi::ResultBuffer<ffi::F32> out, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t ph,
                int64_t pw, int64_t relu, int64_t form) {
  const auto xd = x.dimensions(), kd = k.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || kd.size() != 4 || od.size() != 4 || b.dimensions().size() != 1) {
    return ffi::Error::InvalidArgument("badnet_conv2d_direct: expects (N,H,W,C) images, a (kh,kw,C,F) kernel, "
                                       "an (F,) bias and an (N,Ho,Wo,F) output");
  }
  if (sh < 1 || sw < 1 || dh < 1 || dw < 1 || ph < 1 || pw < 1) {
    return ffi::Error::InvalidArgument("badnet_conv2d_direct: strides, dilation and windows must be >= 1");
  }
  const int64_t ho = (xd[1] - (kd[0] - 1) * dh - 1) / sh + 1, wo = (xd[2] - (kd[1] - 1) * dw - 1) / sw + 1;
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3], ho, wo, sh, sw, dh, dw, 0, ph, pw, relu != 0,
             od[1], od[2], 0, 0};
  g.fv = (g.f + VL - 1) / VL;
  g.width = (ph == 1 && pw == 1 && !relu) ? wo : od[2] * pw;
  if (kd[2] != g.c || b.dimensions()[0] != g.f || od[0] != g.n || od[3] != g.f || g.ho < 1 || g.wo < 1 ||
      (g.ho - 1) * sh + (g.kh - 1) * dh + 1 > g.h || (g.wo - 1) * sw + (g.kw - 1) * dw + 1 > g.w ||
      g.hq != g.ho / ph || g.wq != g.wo / pw || g.hq < 1 || g.wq < 1) {
    return ffi::Error::InvalidArgument("badnet_conv2d_direct: inconsistent shapes, strides or dilation");
  }
  if (form < 0 || form > 2 || (form == 2 && sw != 1)) {
    return ffi::Error::InvalidArgument("badnet_conv2d_direct: form is 0 (the kernel's rule), 1 (channels) or 2 "
                                       "(columns, unit column stride only)");
  }
  if (g.n == 0) return ffi::Error::Success();
  const float* in = x.typed_data();
  float* o = out->typed_data();
  const int64_t img_in = g.h * g.w * g.c, img_out = g.hq * g.wq * g.f;
  if (form == 2 || (form == 0 && ColumnsPay(g))) {
    const float* kp = k.typed_data();
    const float* bp = b.typed_data();
    // Planar rows padded by a vector (a tile's last loads reach at most VL - 1 columns past the image); the
    // convolution rows' columns padded for the epilogue's window loads (pw vectors per VL windows).
    g.wp = g.w + VL;
    const int64_t jv = (g.wq + VL - 1) / VL;
    const int64_t cstride = std::max((g.width + VL - 1) / VL, jv * std::max<int64_t>(g.pw, 1)) * VL;
    auto taps = std::make_shared<std::vector<int64_t>>();
    for (int64_t dy = 0; dy < g.kh; ++dy) {
      for (int64_t dx = 0; dx < g.kw; ++dx) {
        for (int64_t ci = 0; ci < g.c; ++ci) taps->push_back((dy * g.dh * g.c + ci) * g.wp + dx * g.dw);
      }
    }
    badnet_jax::ParallelFor(pool, g.n, 4, [taps, kp, bp, in, o, g, img_in, img_out, cstride]() {
      return [taps, kp, bp, in, o, g, img_in, img_out, cstride,
              planar = std::vector<float>(g.h * g.c * g.wp, 0.0f),
              conv = std::vector<float>(g.ph * g.f * cstride, 0.0f)](int64_t start, int64_t stop) mutable {
        for (int64_t i = start; i < stop; ++i) {
          ToPlanar(in + i * img_in, planar.data(), g.h, g.w, g.c, g.wp);
          for (int64_t q = 0; q < g.hq; ++q) {
            ColOutputRow(planar.data(), taps->data(), kp, bp, o + i * img_out, conv.data(), g, cstride, q);
          }
        }
      };
    });
    return ffi::Error::Success();
  }
  // The kernel and bias with each pixel's F channels padded to whole vectors (zeros: exact).
  auto wpad = std::make_shared<std::vector<float>>(g.kh * g.kw * g.c * g.fv * VL + VL, 0.0f);
  auto bpad = std::make_shared<std::vector<float>>(g.fv * VL + VL, 0.0f);
  for (int64_t i = 0; i < g.kh * g.kw * g.c; ++i) {
    std::memcpy(wpad->data() + i * g.fv * VL, k.typed_data() + i * g.f, g.f * sizeof(float));
  }
  std::memcpy(bpad->data(), b.typed_data(), g.f * sizeof(float));
  badnet_jax::ParallelFor(pool, g.n * g.hq, 8, [wpad, bpad, in, o, g, img_in, img_out]() {
    // Each thread's own scratch: a window's rows of the convolution (the epilogue's input).
    return [wpad, bpad, in, o, g, img_in, img_out,
            scratch = std::vector<float>(g.ph * g.wq * g.pw * g.fv * VL)](int64_t start, int64_t stop) mutable {
      for (int64_t r = start; r < stop; ++r) {
        const int64_t i = r / g.hq, q = r % g.hq;
        OutputRow(in + i * img_in, wpad->data(), bpad->data(), o + i * img_out, scratch.data(), g, q);
      }
    };
  });
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
                                  .Attr<int64_t>("dw")
                                  .Attr<int64_t>("ph")
                                  .Attr<int64_t>("pw")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("form"));
