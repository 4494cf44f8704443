// badnet-jax: dense layers for XLA:CPU, two XLA FFI custom calls (built by kernels/native.py, bound by
// kernels/dense/native_dense.py).
//
//   badnet_dense:      out[m, n] = act(bias[n] + sum_k act_in(x[m, k]) * w[k, n] + add[m, n])
//   badnet_dense_top2: the argmax, top-2 gap and output scale of logits[m, n] = bias[n] + sum_k x[m, k] w[k, n],
//                      without writing the logits to memory
//
// act_in / act: max(., 0) or identity; add: optional (a (1, 1) dummy when absent). Every output starts from its
// bias and adds its terms in k order with fused multiply-adds, then `add`: a fixed order, so a run computes the
// same bits on any number of threads.
//
// Why kernels of their own: a CNN's tail (DeepID's fc_2 and 1283-class output layer) runs once per image and
// pruning step in the sweep, on blocks of a few hundred rows; XLA's dot reaches ~50% of the matmul peak on
// those shapes and the argmax then reads the (M, N) logits several times (max, first index, runner-up). Here
// a register tile of MR rows x NR column vectors accumulates over k (one weight vector load per NR * MR fused
// multiply-adds per row broadcast), and the top-2 logits are kept per lane in registers' worth of state while
// the tiles go by; the top-2 kernel takes its rows through the weights a cache-sized panel of columns at a time.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include <unistd.h>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;  // float lanes per vector
constexpr int MR = 6;   // rows per register tile
constexpr int NR = 4;   // column vectors per register tile: 24 accumulators of 32 registers
#else
constexpr int VL = 8;
constexpr int MR = 6;
constexpr int NR = 2;   // 12 accumulators of 16 registers
#endif

// Values in registers (and their spills) are whole vectors; memory is read and written through `vu`, the same
// vector at a float's alignment (rows start at any float). Clang spills a reduced-alignment value type with
// aligned stores to an unaligned stack slot, so the two are kept apart.
typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));
typedef float vu __attribute__((vector_size(VL * sizeof(float)), aligned(alignof(float))));

// sum_k |x[k]| * wmax[k] in k order, each product rounded before it is added: no fused multiply-add whatever the
// compiler (Clang fuses it under -ffp-contract=fast, GCC did not), so every build gives the output scale's bits.
#if defined(__clang__)
inline float AbsDot(const float* x, const float* wmax, int64_t k) {
#pragma clang fp contract(off)
  float sc = 0.0f;
  for (int64_t i = 0; i < k; ++i) sc += std::fabs(x[i]) * wmax[i];
  return sc;
}
#else
__attribute__((optimize("fp-contract=off"))) inline float AbsDot(const float* x, const float* wmax, int64_t k) {
  float sc = 0.0f;
  for (int64_t i = 0; i < k; ++i) sc += std::fabs(x[i]) * wmax[i];
  return sc;
}
#endif

inline vf Load(const float* p) { return *reinterpret_cast<const vu*>(p); }
inline void Store(float* p, vf v) { *reinterpret_cast<vu*>(p) = v; }

// The weights as column vectors, read one of two ways:
// - in place: the full vectors at row stride N, the last partial one (N % VL columns) from a zero-padded copy, so
//   no load reads past a row;
// - packed: copied once per call into groups of NR column vectors, each group's K rows of NR * VL floats one after
//   the other, zero-padded past column N (the bias likewise). A register tile then reads one contiguous stream,
//   not one short piece per row of the kernel N floats apart: for 1283 classes the pieces start at every 4-byte
//   offset, 5 KB apart, most straddling two cache lines. The top-2 kernel packs where a call has rows enough to
//   repay the copy (PackRows); the dense kernel reads in place: DeepID's fc_2 (960 x 160, rows 640 bytes
//   apart) ran as fast either way in 256-row calls, and slower packed in calls of few rows.
struct Weights {
  int64_t k, n, full;        // full = N / VL whole vectors
  const float* w;            // (K, N)
  const float* bias;         // (N,)
  std::vector<float> wtail;  // in place: (K, VL), columns full * VL .. N - 1, zero-padded
  std::vector<float> btail;  // in place: (VL,)
  std::vector<float> packed; // packed: (groups, K, NR * VL)
  std::vector<float> bpad;   // packed: (groups * NR * VL,)

  Weights(const float* w_, const float* b_, int64_t k_, int64_t n_, bool pack)
      : k(k_), n(n_), full(n_ / VL), w(w_), bias(b_) {
    constexpr int64_t gw = NR * VL;
    if (pack && k > 0) {
      const int64_t groups = (vectors() + NR - 1) / NR;
      packed.assign(groups * k * gw, 0.0f);
      bpad.assign(groups * gw, 0.0f);
      std::memcpy(bpad.data(), b_, n * sizeof(float));
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t c0 = g * gw, cols = std::min<int64_t>(gw, n - c0);
        float* dst = packed.data() + g * k * gw;
        if (cols == gw) {  // a whole group: a copy of constant size, a few vector moves
          for (int64_t i = 0; i < k; ++i) std::memcpy(dst + i * gw, w_ + i * n + c0, gw * sizeof(float));
        } else {
          for (int64_t i = 0; i < k; ++i) std::memcpy(dst + i * gw, w_ + i * n + c0, cols * sizeof(float));
        }
      }
      return;
    }
    const int64_t rest = n - full * VL;
    if (rest) {
      wtail.assign(k * VL, 0.0f);
      btail.assign(VL, 0.0f);
      for (int64_t i = 0; i < k; ++i) std::memcpy(&wtail[i * VL], w_ + i * n + full * VL, rest * sizeof(float));
      std::memcpy(btail.data(), b_ + full * VL, rest * sizeof(float));
    }
  }
  int64_t vectors() const { return full + (n % VL ? 1 : 0); }  // with K = 0 too (then nothing is ever read)
  // Vector v's weights at row 0 and their row stride; vectors v .. v + J - 1 follow it at J * VL floats, where
  // the caller keeps them among the full vectors (in place) or in one group (packed).
  const float* col(int64_t v, int64_t* stride) const {
    if (!packed.empty()) {
      *stride = NR * VL;
      return packed.data() + (v / NR) * k * NR * VL + (v % NR) * VL;
    }
    if (v < full) { *stride = n; return w + v * VL; }
    *stride = VL; return wtail.data();
  }
  const float* bcol(int64_t v) const {
    if (!packed.empty()) return bpad.data() + v * VL;
    return v < full ? bias + v * VL : btail.data();
  }
};

// acc[r][j] = bias + sum_k a[r, k] * W[k, vector v0 + j], for R rows of `a` (row stride lda) and J vectors: all
// full ones and, packed, of one group (Tiles keeps them so), or the padded tail alone (J = 1).
template <int R, int J>
inline void Tile(const float* __restrict a, int64_t lda, const Weights& wt, int64_t v0, vf (&acc)[MR][NR]) {
  int64_t ldw;
  const float* w = wt.col(v0, &ldw);
  const float* b = wt.bcol(v0);
  for (int j = 0; j < J; ++j) {
    const vf bj = Load(b + j * VL);
    for (int r = 0; r < R; ++r) acc[r][j] = bj;
  }
  for (int64_t k = 0; k < wt.k; ++k) {
    vf wv[J];
    for (int j = 0; j < J; ++j) wv[j] = Load(w + k * ldw + j * VL);
    for (int r = 0; r < R; ++r) {
      const float s = a[r * lda + k];
      for (int j = 0; j < J; ++j) acc[r][j] += s * wv[j];
    }
  }
}

// Visit the register tiles of R rows over column vectors [vb, ve) (vb a multiple of NR): fn(v0, J, acc) after each
// group of J <= NR column vectors, in increasing column order.
template <int R, typename Fn>
inline void Tiles(const float* a, int64_t lda, const Weights& wt, int64_t vb, int64_t ve, Fn&& fn) {
  vf acc[MR][NR];
  const int64_t full_end = std::min(ve, wt.full);
  int64_t v = vb;
  for (; v + NR <= full_end; v += NR) {
    Tile<R, NR>(a, lda, wt, v, acc);
    fn(v, NR, acc);
  }
  for (; v < ve; ++v) {  // the vectors left over (the padded tail among them), one at a time
    Tile<R, 1>(a, lda, wt, v, acc);
    fn(v, 1, acc);
  }
}

// Dispatch a row count 1 .. MR to its template.
template <template <int> class F, typename... Args>
inline void ForRows(int64_t rows, Args&&... args) {
  switch (rows) {
    case 1: F<1>::run(args...); break;
    case 2: F<2>::run(args...); break;
    case 3: F<3>::run(args...); break;
    case 4: F<4>::run(args...); break;
    case 5: F<5>::run(args...); break;
    default: F<MR>::run(args...); break;
  }
}
static_assert(MR == 6, "ForRows dispatches 1 .. 6 rows");

inline vf Relu(vf v) { return (v < vf{}) ? vf{} : v; }  // NaN stays NaN (a NaN compares false)

// ----- dense
struct DenseArgs {
  const float* x;    // (M, K)
  const float* add;  // (M, N) or null
  float* out;        // (M, N)
  int64_t m, relu_in, relu_out;
};

template <int R>
struct DenseRows {
  static void run(const float* a, int64_t lda, const Weights& wt, const DenseArgs& d, int64_t row0) {
    Tiles<R>(a, lda, wt, 0, wt.vectors(), [&](int64_t v0, int nv, vf (&acc)[MR][NR]) {
      for (int r = 0; r < R; ++r) {
        for (int j = 0; j < nv; ++j) {
          const int64_t col = (v0 + j) * VL, lanes = std::min<int64_t>(VL, wt.n - col);
          vf v = acc[r][j];
          float* o = d.out + (row0 + r) * wt.n + col;
          if (lanes == VL) {
            if (d.add) v += Load(d.add + (row0 + r) * wt.n + col);
            Store(o, d.relu_out ? Relu(v) : v);
          } else {
            for (int64_t l = 0; l < lanes; ++l) {
              float s = v[l];
              if (d.add) s += d.add[(row0 + r) * wt.n + col + l];
              o[l] = (d.relu_out && s < 0.0f) ? 0.0f : s;
            }
          }
        }
      }
    });
  }
};

ffi::Error Dense(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
                 ffi::Buffer<ffi::F32> add, ffi::ResultBuffer<ffi::F32> out, int64_t relu_in, int64_t relu_out,
                 int64_t has_add) {
  const auto xd = x.dimensions(), wd = w.dimensions(), ad = add.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || b.dimensions().size() != 1 || ad.size() != 2 || od.size() != 2 ||
      wd[0] != xd[1] || b.dimensions()[0] != wd[1] || od[0] != xd[0] || od[1] != wd[1] ||
      (has_add && (ad[0] != xd[0] || ad[1] != wd[1]))) {
    return ffi::Error::InvalidArgument("badnet_dense: expects (M,K) inputs, a (K,N) kernel, an (N,) bias, an "
                                       "(M,N) addend (if has_add) and an (M,N) output");
  }
  const int64_t m = xd[0], k = wd[0];
  if (m == 0 || wd[1] == 0) return ffi::Error::Success();
  auto wt = std::make_shared<Weights>(w.typed_data(), b.typed_data(), k, wd[1], /*pack=*/false);
  DenseArgs d{x.typed_data(), has_add ? add.typed_data() : nullptr, out->typed_data(), m, relu_in, relu_out};
  badnet_jax::ParallelFor(pool, (m + MR - 1) / MR, 4, [wt, d, k]() {
    // Each thread's own scratch: a row block through the ReLU once, not once per column tile.
    return [wt, d, k, relu_rows = std::vector<float>(d.relu_in ? MR * k : 0)](int64_t start, int64_t stop) mutable {
      for (int64_t blk = start; blk < stop; ++blk) {
        const int64_t row0 = blk * MR, rows = std::min<int64_t>(MR, d.m - row0);
        const float* a = d.x + row0 * k;
        if (d.relu_in) {
          for (int64_t i = 0; i < rows * k; ++i) relu_rows[i] = (a[i] < 0.0f) ? 0.0f : a[i];
          a = relu_rows.data();
        }
        ForRows<DenseRows>(rows, a, k, *wt, d, row0);
      }
    };
  });
  return ffi::Error::Success();
}

// ----- dense + top-2
// Per row and lane, over the columns that lane sees (in increasing order): the largest logit m1 and its first
// column i1, the runner-up m2 (a second copy of m1 counts: gap 0), the first NaN's column.
struct Top2State {
  vf m1, m2;
  vi i1, nan1;
};

struct Top2Args {
  const float* x;     // (M, K)
  const float* wmax;  // (K,): max_n |w[k, n]|
  float bmax;         // max_n |bias[n]|
  int32_t* arg;
  float* gap;
  float* scale;
  int64_t m;
};

// Weights per column panel: a thread takes all the rows of its range through one panel of the weights before the
// next, so a panel comes from memory once per range (5 row tiles in DeepID's 256-row calls on 2 threads) and then
// from the core's L2, not once per row tile: the 1283-class output layer's 160 x 1283 weights (821 KB) are larger
// than a Zen 3's 512 KB of L2 (on an Intel Xeon with 2 MB of L2 they fit: panels of 48 KB to all the columns ran
// within 5% of each other there). Each row's state carries from panel to panel and the columns still meet it in
// increasing order, so the results are the same bits whatever the panel.
constexpr int64_t kPanelBytes = 96 * 1024;
// Rows from which a top-2 call packs its weights: the copy (one pass over them, by the calling thread) repays
// itself sooner where reading them in place is slow. 160 x 1283 weights (821 KB), 2 threads, GFLOP/s packed
// against in place:
// - a Zen 3, 512 KB of L2 per core: 8 rows 32 / 70, 32 rows 81 / 96, 64 rows 101 / 96, 128 rows 125 / 114,
//   256 rows 125-142 / 123-125;
// - a Zen 4, 1 MB of L2 per core: 64 rows 91-92 / 158-159, 256 rows 148-152 / 172-176, 512 rows 155-163 /
//   173-178, 1024 rows 177-182 / 184-189, 2048 rows 175-188 / 180-190, 4096 rows 182-192 / 174-192;
// - an Intel Xeon with 2 MB of L2 per core: 64 rows 96-103 / 149-152, 96 rows 115 / 181, 128 rows
//   142-149 / 168-170, 192 rows 151 / 191, 256 rows 170-181 / 176-180, 512 rows 207-212 / 184.
// So calls pack from 64 rows where the weights are larger than the core's L2, from 4096 where they fill more
// than half of it (the Zen 4), from 256 where they take at most half (the Xeon). The middle band is measured
// on that Zen 4 alone: a CPU of full-rate 512-bit multiply-adds and about 1 MB of L2 may prefer packing sooner
// (the same bits either way).
constexpr int64_t kPackRows = 64;
constexpr int64_t kPackRowsFilled = 4096;
constexpr int64_t kPackRowsCached = 256;
inline int64_t PackRows(int64_t k, int64_t n) {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  static const int64_t l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);  // <= 0 where the system does not say
#else
  constexpr int64_t l2 = 0;
#endif
  const int64_t bytes = k * n * static_cast<int64_t>(sizeof(float));
  if (l2 <= 0 || bytes > l2) return kPackRows;
  return 2 * bytes <= l2 ? kPackRowsCached : kPackRowsFilled;
}
inline int64_t PanelVectors(const Weights& wt) {
  const int64_t per_vector = std::max<int64_t>(1, wt.k * VL * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(NR, kPanelBytes / per_vector / NR * NR);
}

inline void Top2Start(Top2State& st, int32_t none) {
  st.m1 = st.m2 = vf{} + -std::numeric_limits<float>::infinity();
  st.i1 = st.nan1 = vi{} + none;
}

// Folds column vectors [vb, ve) of R rows into their states s[0 .. R).
template <int R>
struct Top2Rows {
  static void run(const float* a, int64_t lda, const Weights& wt, int64_t vb, int64_t ve, Top2State* s) {
    constexpr float NEG = -std::numeric_limits<float>::infinity();
    const int32_t none = static_cast<int32_t>(wt.n);
    vi lane;
    for (int l = 0; l < VL; ++l) lane[l] = l;
    Tiles<R>(a, lda, wt, vb, ve, [&](int64_t v0, int nv, vf (&acc)[MR][NR]) {
      for (int j = 0; j < nv; ++j) {
        const int32_t col = static_cast<int32_t>((v0 + j) * VL);
        const vi idx = lane + col;
        const vi valid = idx < none;  // the padded tail's lanes beyond N are no columns
        for (int r = 0; r < R; ++r) {
          const vf v = valid ? acc[r][j] : vf{} + NEG;
          Top2State& st = s[r];
          st.nan1 = (v != v && st.nan1 == none) ? idx : st.nan1;
          const vi gt = v > st.m1;
          const vf low = (v < st.m1) ? v : st.m1;  // min(v, m1): what v leaves for the runner-up
          st.m2 = (low > st.m2) ? low : st.m2;
          st.m1 = gt ? v : st.m1;
          st.i1 = gt ? idx : st.i1;
        }
      }
    });
  }
};

// A row's answers from its lanes' states once every column went by; its output scale.
inline void Top2Finish(const Top2State& st, const float* a_row, const Weights& wt, const Top2Args& t, int64_t row) {
  constexpr float NEG = -std::numeric_limits<float>::infinity();
  const int32_t none = static_cast<int32_t>(wt.n);
  int32_t first_nan = none;
  float top = NEG;
  for (int l = 0; l < VL; ++l) {
    first_nan = std::min(first_nan, st.nan1[l]);
    top = std::max(top, st.m1[l]);
  }
  if (first_nan < none) {
    t.arg[row] = first_nan;
    t.gap[row] = std::numeric_limits<float>::quiet_NaN();
  } else {
    int32_t arg = none;
    for (int l = 0; l < VL; ++l) {
      if (st.m1[l] == top) arg = std::min(arg, st.i1[l]);
    }
    float second = NEG;
    for (int l = 0; l < VL; ++l) {
      second = std::max(second, st.m2[l]);
      if (st.i1[l] != arg) second = std::max(second, st.m1[l]);
    }
    // Every logit -inf: the first column holds the maximum.
    t.arg[row] = arg == none ? 0 : arg;
    t.gap[row] = top - second;
  }
  t.scale[row] = AbsDot(a_row, t.wmax, wt.k) + t.bmax;
}

ffi::Error DenseTop2(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::F32> wmax, ffi::Buffer<ffi::F32> bmax,
                     ffi::ResultBuffer<ffi::S32> arg, ffi::ResultBuffer<ffi::F32> gap,
                     ffi::ResultBuffer<ffi::F32> scale) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || b.dimensions().size() != 1 || wd[0] != xd[1] ||
      b.dimensions()[0] != wd[1] || wmax.element_count() != static_cast<size_t>(wd[0]) || bmax.element_count() != 1 ||
      arg->element_count() != static_cast<size_t>(xd[0]) || gap->element_count() != static_cast<size_t>(xd[0]) ||
      scale->element_count() != static_cast<size_t>(xd[0]) || wd[1] < 1 || wd[1] > (int64_t{1} << 30)) {
    return ffi::Error::InvalidArgument("badnet_dense_top2: expects (M,K) inputs, a (K,N) kernel (N >= 1), an (N,) "
                                       "bias, (K,) and (1,) weight maxima and three (M,) outputs");
  }
  const int64_t m = xd[0], k = wd[0];
  if (m == 0) return ffi::Error::Success();
  auto wt = std::make_shared<Weights>(w.typed_data(), b.typed_data(), k, wd[1], m >= PackRows(k, wd[1]));
  Top2Args t{x.typed_data(), wmax.typed_data(), bmax.typed_data()[0], arg->typed_data(), gap->typed_data(),
             scale->typed_data(), m};
  badnet_jax::ParallelFor(pool, (m + MR - 1) / MR, 4, [wt, t, k]() {
    // Each thread's own row states, for the row blocks of one range at a time.
    return [wt, t, k, states = std::vector<Top2State>()](int64_t start, int64_t stop) mutable {
      const int64_t row_begin = start * MR, row_end = std::min(t.m, stop * MR);
      const int32_t none = static_cast<int32_t>(wt->n);
      states.resize(row_end - row_begin);
      for (Top2State& st : states) Top2Start(st, none);
      const int64_t vectors = wt->vectors(), panel = PanelVectors(*wt);
      for (int64_t vb = 0; vb < vectors; vb += panel) {
        const int64_t ve = std::min(vectors, vb + panel);
        for (int64_t row0 = row_begin; row0 < row_end; row0 += MR) {
          const int64_t rows = std::min<int64_t>(MR, row_end - row0);
          ForRows<Top2Rows>(rows, t.x + row0 * k, k, *wt, vb, ve, &states[row0 - row_begin]);
        }
      }
      for (int64_t row = row_begin; row < row_end; ++row) {
        Top2Finish(states[row - row_begin], t.x + row * k, *wt, t, row);
      }
    };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(badnet_dense, Dense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("relu_in")
                                  .Attr<int64_t>("relu_out")
                                  .Attr<int64_t>("has_add"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(badnet_dense_top2, DenseTop2,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
