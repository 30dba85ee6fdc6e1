// Each token through its own adapter, reading the adapter's weights where they lie (punica's BGMV, for the CPU).
//
// Why: with as many adapters present as tokens (16 requests over 100 adapters), every way to run the step
// with torch ops either launches small matmuls per adapter (call-bound) or copies each token's weights into
// a stack first (copy-bound: the copy moves the bytes the matmul then reads again). Here one call per LoRA
// linear walks the tokens; a token reads its adapter's A and B in place and accumulates in float32, and
// tokens that share an adapter run together in blocks (up to 8), so a block reads the weights once: one
// adapter over a whole decode batch costs its flops, where oneDNN would need two matmuls and an add.
//
// Inputs (checked by the caller, lora_ops/token_step.py, which also keeps every weight alive):
//   y (T, out) += scale * (x (T, in) @ A_t) @ B_t, per token t, where
//   forms (T, 3 + S) int64, one row per token (lora_ops.fused.AdapterLinear.kernel_row):
//     [0] the address of token t's A, (in, W) row-major, W = S x packed; 0: no adapter (the row is skipped)
//     [1] packed: the rows per slice of token t's adapter (its rank rounded up)
//     [2] rows: the rows of each slice that are written (the rest are zero and are not read)
//     [3 + s] the address of slice s's B, (packed, out_s) row-major
//   outs (S,): out_s; slice s's columns of y start at the sum of the outs before it
// x, y and the weights share one dtype (float32, bfloat16 or float16); rows of x and y may be strided.
// Rows with the same A address are one adapter's (a form's A is its own tensor).
//
// bfloat16 on a CPU with AVX512_BF16 (native_bf16, the default) multiplies pairs of bf16 values into float32
// sums (vdpbf16ps) instead of widening every weight to float32 first: half the instructions a column, and no
// conversion. The pairs run along the sum (two rows of A or B at once, interleaved in a register), so the
// weights keep their layout. The expand's inputs (the shrink's sums, scaled) are rounded to bf16 for it, as
// PEFT's bf16 layers round lora_A's output before lora_B.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Built once for every machine type it may run on (the image's CPU is not the node's): the hot loops are
// cloned per instruction set and the loader picks one at load time. Vectors are GCC's generic ones, 16
// floats: one AVX-512 register, two AVX2 ones, four SSE ones, whichever the clone compiles for.
#define CLONED __attribute__((target_clones("avx512f", "avx2", "default")))
#define INLINE inline __attribute__((always_inline))

constexpr int64_t V = 16;
typedef float vf __attribute__((vector_size(4 * V)));
typedef int32_t vi __attribute__((vector_size(4 * V)));
typedef uint32_t vu __attribute__((vector_size(4 * V)));
typedef uint16_t vh __attribute__((vector_size(2 * V)));

// Tokens on one adapter run in blocks of 8, 4, 2 or 1 (a block's size is a template argument, so its sums
// stay in registers): 13 tokens are 8 + 4 + 1.
constexpr int BLOCK = 8;

INLINE float widen(float v) { return v; }
INLINE float widen(c10::Half v) { return static_cast<float>(v); }
// bfloat16 is float32's upper half: a shift (c10's conversion goes through memcpy).
INLINE float widen(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
INLINE vf load(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vu bits = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
INLINE vf load(const c10::Half* p) {
  float f[V];
  for (int64_t k = 0; k < V; ++k) f[k] = static_cast<float>(p[k]);
  return load(f);
}

INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// Rounded to nearest even, NaN kept a (quiet) NaN: bit for bit what c10's float -> bfloat16 conversion gives.
INLINE void store(c10::BFloat16* p, vf v) {
  vu bits;
  std::memcpy(&bits, &v, sizeof bits);
  const vu rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vu nan = reinterpret_cast<vu>(v != v);  // all ones where v is NaN
  const vh h = __builtin_convertvector((nan & 0x7FC0u) | (~nan & rounded), vh);
  std::memcpy(p, &h, sizeof h);
}
INLINE void store(c10::Half* p, vf v) {
  float f[V];
  store(f, v);
  for (int64_t k = 0; k < V; ++k) p[k] = static_cast<c10::Half>(f[k]);
}

// h[:, w0 : w0 + NV x 16] of h (NB, W) = xb (NB, in) @ A (in, W): NB tokens' rows of x (widened) against one
// adapter's A, NV vectors of columns (the NB x NV sums held in registers).
template <int NB, int NV, typename T>
INLINE void shrink_cols(float* h, const float* xb, const T* a, int64_t in, int64_t W, int64_t w0) {
  vf acc[NB][NV] = {};
  for (int64_t i = 0; i < in; ++i) {
    vf av[NV];
    for (int v = 0; v < NV; ++v) av[v] = load(a + i * W + w0 + v * V);
    for (int b = 0; b < NB; ++b) {
      const float xv = xb[b * in + i];
      for (int v = 0; v < NV; ++v) acc[b][v] += xv * av[v];
    }
  }
  for (int b = 0; b < NB; ++b) {
    for (int v = 0; v < NV; ++v) store(h + b * W + w0 + v * V, acc[b][v]);
  }
}

// h (NB, W) = xb (NB, in) @ A (in, W), A read once for the block: 2 vectors of columns a pass, then one, then
// column by column (a width that is not a multiple of 16: a max rank that is not a power of two).
template <int NB, typename T>
INLINE void shrink_block(float* h, const float* xb, const T* a, int64_t in, int64_t W) {
  int64_t w0 = 0;
  for (; w0 + 2 * V <= W; w0 += 2 * V) shrink_cols<NB, 2>(h, xb, a, in, W, w0);
  for (; w0 + V <= W; w0 += V) shrink_cols<NB, 1>(h, xb, a, in, W, w0);
  for (; w0 < W; ++w0) {
    for (int b = 0; b < NB; ++b) {
      float sum = 0.0f;
      for (int64_t i = 0; i < in; ++i) sum += xb[b * in + i] * widen(a[i * W + w0]);
      h[b * W + w0] = sum;
    }
  }
}

// y[b][o : o + NV x 16] += c (NB, rows) @ B[:, o : o + NV x 16] (B: (rows, n) row-major), c already scaled;
// y is read, added to and written once.
template <int NB, int NV, typename T>
INLINE void expand_cols(T* const* y, const float* c, const T* bw, int64_t rows, int64_t n, int64_t o) {
  vf acc[NB][NV] = {};
  for (int64_t r = 0; r < rows; ++r) {
    vf bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(bw + r * n + o + v * V);
    for (int b = 0; b < NB; ++b) {
      const float cv = c[b * rows + r];
      for (int v = 0; v < NV; ++v) acc[b][v] += cv * bv[v];
    }
  }
  for (int b = 0; b < NB; ++b) {
    for (int v = 0; v < NV; ++v) store(y[b] + o + v * V, load(y[b] + o + v * V) + acc[b][v]);
  }
}

// y[b] (n) += c (NB, rows) @ B (rows, n): one slice's expand for NB tokens whose output rows start at y[b],
// B read once for the block: 2 vectors of columns a pass, then one, then column by column.
template <int NB, typename T>
INLINE void expand_block(T* const* y, const float* c, const T* bw, int64_t rows, int64_t n) {
  int64_t o = 0;
  for (; o + 2 * V <= n; o += 2 * V) expand_cols<NB, 2>(y, c, bw, rows, n, o);
  for (; o + V <= n; o += V) expand_cols<NB, 1>(y, c, bw, rows, n, o);
  for (; o < n; ++o) {
    for (int b = 0; b < NB; ++b) {
      float sum = widen(y[b][o]);
      for (int64_t r = 0; r < rows; ++r) sum += c[b * rows + r] * widen(bw[r * n + o]);
      y[b][o] = static_cast<T>(sum);
    }
  }
}

// One block: NB tokens on one form. Scratch: xb (BLOCK x in), h (BLOCK x W), c (BLOCK x rows).
struct Block {
  const int64_t* form;  // the form's row of the table
  int count;
  int64_t tokens[BLOCK];
};

struct Call {
  int64_t in, x_stride, y_stride, slices;
  const int64_t* outs;
  const int64_t* starts;  // slice s's first column of y
  float scale;
};

template <int NB, typename T>
INLINE void run_block(const Call& call, const Block& blk, const T* x, T* y, float* xb, float* h, float* c) {
  const int64_t packed = blk.form[1], used = blk.form[2], W = call.slices * packed, in = call.in;
  for (int b = 0; b < NB; ++b) {
    const T* xt = x + blk.tokens[b] * call.x_stride;
    for (int64_t i = 0; i < in; ++i) xb[b * in + i] = widen(xt[i]);
  }
  shrink_block<NB>(h, xb, reinterpret_cast<const T*>(blk.form[0]), in, W);
  for (int64_t s = 0; s < call.slices; ++s) {
    for (int b = 0; b < NB; ++b) {  // this slice's written rows of h, scaled
      for (int64_t r = 0; r < used; ++r) c[b * used + r] = h[b * W + s * packed + r] * call.scale;
    }
    T* rows[NB];
    for (int b = 0; b < NB; ++b) rows[b] = y + blk.tokens[b] * call.y_stride + call.starts[s];
    expand_block<NB>(rows, c, reinterpret_cast<const T*>(blk.form[3 + s]), used, call.outs[s]);
  }
}

template <typename T>
INLINE void run_any(const Call& call, const Block& blk, const T* x, T* y, float* xb, float* h, float* c) {
  switch (blk.count) {
    case 8: return run_block<8>(call, blk, x, y, xb, h, c);
    case 4: return run_block<4>(call, blk, x, y, xb, h, c);
    case 2: return run_block<2>(call, blk, x, y, xb, h, c);
    default: return run_block<1>(call, blk, x, y, xb, h, c);
  }
}

CLONED void run(const Call& call, const Block& blk, const float* x, float* y, float* xb, float* h, float* c) {
  run_any(call, blk, x, y, xb, h, c);
}
CLONED void run(const Call& call, const Block& blk, const c10::BFloat16* x, c10::BFloat16* y, float* xb, float* h,
                float* c) {
  run_any(call, blk, x, y, xb, h, c);
}
CLONED void run(const Call& call, const Block& blk, const c10::Half* x, c10::Half* y, float* xb, float* h, float* c) {
  run_any(call, blk, x, y, xb, h, c);
}

// ---------------------------------------------------------------- bfloat16 pairs (AVX512_BF16)
#define NATIVE_BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

// Rows r0 and r1 of 16 bf16 columns each as one register of pairs: (r0[j], r1[j]) in lane j.
NATIVE_BF16 INLINE __m512i pairs(const uint16_t* r0, const uint16_t* r1) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21,
                                       5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i lo = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0)));
  const __m512i both = _mm512_inserti64x4(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1)), 1);
  return _mm512_permutexvar_epi16(idx, both);
}

NATIVE_BF16 INLINE __m512 dot_pairs(__m512 acc, __m512i w, uint32_t v) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(w), reinterpret_cast<__m512bh>(_mm512_set1_epi32(v)));
}

INLINE uint32_t pair_of(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

INLINE float widen_bits(uint16_t b) { return widen(c10::BFloat16(b, c10::BFloat16::from_bits())); }

// 16 floats rounded to bf16 as store(c10::BFloat16*) rounds them, bit for bit, in one instruction
// (vcvtneps2bf16, round to nearest even) where it agrees with c10: it flushes denormals to zero and keeps a
// NaN's payload, so a vector holding either (vfpclassps: NaN or denormal; rare in a model's activations)
// takes store()'s integer rounding instead. The expand writes every output through this, and the scaled sums
// it multiplies: at rank 16 the integer rounding took about as many instructions as the multiplies it follows.
NATIVE_BF16 INLINE __m256i round_bf16(__m512 v) {
  if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0x01 | 0x20 | 0x80) != 0, 0)) {  // QNaN, denormal, SNaN
    alignas(32) c10::BFloat16 out[V];
    store(out, reinterpret_cast<const vf&>(v));
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(out));
  }
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
}

// h[:, w0 : w0 + NV x 16] = x rows (NB, in) @ A (in, W), two rows of A a step (a last odd row widened).
template <int NB, int NV>
NATIVE_BF16 INLINE void shrink_pairs(float* h, const uint16_t* const* xr, const uint16_t* a, int64_t in, int64_t W,
                                     int64_t w0) {
  __m512 acc[NB][NV];
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < NV; ++v) acc[b][v] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 2 <= in; i += 2) {
    __m512i av[NV];
    for (int v = 0; v < NV; ++v) av[v] = pairs(a + i * W + w0 + v * V, a + (i + 1) * W + w0 + v * V);
    for (int b = 0; b < NB; ++b) {
      const uint32_t xv = pair_of(xr[b] + i);
      for (int v = 0; v < NV; ++v) acc[b][v] = dot_pairs(acc[b][v], av[v], xv);
    }
  }
  for (; i < in; ++i) {
    for (int v = 0; v < NV; ++v) {
      const vf av = load(reinterpret_cast<const c10::BFloat16*>(a + i * W + w0 + v * V));
      for (int b = 0; b < NB; ++b) acc[b][v] += widen_bits(xr[b][i]) * reinterpret_cast<const __m512&>(av);
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(h + b * W + w0 + v * V, acc[b][v]);
}

// y[b][o : o + NV x 16] += c (NB, rows) @ B[:, o : o + NV x 16], c as bf16 pairs (cp: NB x rows / 2) and, for a
// last odd row, as floats (c: NB x rows).
template <int NB, int NV>
NATIVE_BF16 INLINE void expand_pairs(c10::BFloat16* const* y, const uint32_t* cp, const float* c, const uint16_t* bw,
                                     int64_t rows, int64_t n, int64_t o) {
  const int64_t half = rows / 2;
  __m512 acc[NB][NV];
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < NV; ++v) acc[b][v] = _mm512_setzero_ps();
  for (int64_t r = 0; r < half; ++r) {
    __m512i bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = pairs(bw + 2 * r * n + o + v * V, bw + (2 * r + 1) * n + o + v * V);
    for (int b = 0; b < NB; ++b) {
      for (int v = 0; v < NV; ++v) acc[b][v] = dot_pairs(acc[b][v], bv[v], cp[b * half + r]);
    }
  }
  if (rows % 2) {
    for (int v = 0; v < NV; ++v) {
      const vf bv = load(reinterpret_cast<const c10::BFloat16*>(bw + (rows - 1) * n + o + v * V));
      for (int b = 0; b < NB; ++b) acc[b][v] += c[b * rows + rows - 1] * reinterpret_cast<const __m512&>(bv);
    }
  }
  for (int b = 0; b < NB; ++b) {
    for (int v = 0; v < NV; ++v) {
      const vf sum = load(y[b] + o + v * V) + reinterpret_cast<const vf&>(acc[b][v]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[b] + o + v * V), round_bf16(reinterpret_cast<const __m512&>(sum)));
    }
  }
}

// run_block's arithmetic in bf16 pairs: the shrink from x's own rows (no widened copy), the expand from the
// scaled sums rounded to bf16; columns past the last multiple of 16 as in run_block.
template <int NB>
NATIVE_BF16 INLINE void run_block_pairs(const Call& call, const Block& blk, const c10::BFloat16* x, c10::BFloat16* y,
                                        float* h, float* c, uint32_t* cp) {
  const int64_t packed = blk.form[1], used = blk.form[2], W = call.slices * packed, in = call.in;
  const uint16_t* xr[NB];
  for (int b = 0; b < NB; ++b) xr[b] = reinterpret_cast<const uint16_t*>(x + blk.tokens[b] * call.x_stride);
  const auto* a = reinterpret_cast<const uint16_t*>(blk.form[0]);
  int64_t w0 = 0;
  if (W % (3 * V) == 0)  // three vectors a pass (a rank-16 qkv): a lone vector's pass waits on its shuffles
    for (; w0 < W; w0 += 3 * V) shrink_pairs<NB, 3>(h, xr, a, in, W, w0);
  for (; w0 + 2 * V <= W; w0 += 2 * V) shrink_pairs<NB, 2>(h, xr, a, in, W, w0);
  for (; w0 + V <= W; w0 += V) shrink_pairs<NB, 1>(h, xr, a, in, W, w0);
  for (; w0 < W; ++w0) {
    for (int b = 0; b < NB; ++b) {
      float sum = 0.0f;
      for (int64_t i = 0; i < in; ++i) sum += widen_bits(xr[b][i]) * widen_bits(a[i * W + w0]);
      h[b * W + w0] = sum;
    }
  }
  const int64_t half = used / 2;
  for (int64_t s = 0; s < call.slices; ++s) {
    for (int b = 0; b < NB; ++b) {  // this slice's written rows of h, scaled; the even count of them as bf16 pairs
      auto* pair_rows = reinterpret_cast<uint16_t*>(cp + b * half);
      for (int64_t r0 = 0; r0 < used; r0 += V) {
        const int64_t n = std::min<int64_t>(V, used - r0), in_pairs = std::min<int64_t>(n, 2 * half - r0);
        const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);
        const __m512 scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, h + b * W + s * packed + r0),
                                            _mm512_set1_ps(call.scale));
        _mm512_mask_storeu_ps(c + b * used + r0, lanes, scaled);
        if (in_pairs > 0)
          _mm256_mask_storeu_epi16(pair_rows + r0, static_cast<__mmask16>((1u << in_pairs) - 1), round_bf16(scaled));
      }
    }
    c10::BFloat16* rows[NB];
    for (int b = 0; b < NB; ++b) rows[b] = y + blk.tokens[b] * call.y_stride + call.starts[s];
    const auto* bw = reinterpret_cast<const uint16_t*>(blk.form[3 + s]);
    const int64_t n = call.outs[s];
    int64_t o = 0;
    for (; o + 2 * V <= n; o += 2 * V) expand_pairs<NB, 2>(rows, cp, c, bw, used, n, o);
    for (; o + V <= n; o += V) expand_pairs<NB, 1>(rows, cp, c, bw, used, n, o);
    for (; o < n; ++o) {
      for (int b = 0; b < NB; ++b) {
        float sum = widen(rows[b][o]);
        for (int64_t r = 0; r < used; ++r) sum += c[b * used + r] * widen_bits(bw[r * n + o]);
        rows[b][o] = static_cast<c10::BFloat16>(sum);
      }
    }
  }
}

NATIVE_BF16 void run_pairs(const Call& call, const Block& blk, const c10::BFloat16* x, c10::BFloat16* y, float* h,
                           float* c, uint32_t* cp) {
  switch (blk.count) {
    case 8: return run_block_pairs<8>(call, blk, x, y, h, c, cp);
    case 4: return run_block_pairs<4>(call, blk, x, y, h, c, cp);
    case 2: return run_block_pairs<2>(call, blk, x, y, h, c, cp);
    default: return run_block_pairs<1>(call, blk, x, y, h, c, cp);
  }
}

bool cpu_has_native_bf16() {  // every extension NATIVE_BF16 compiles for (each CPU with AVX512_BF16 has them all)
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return has;
}

// The blocks of a call: tokens grouped by their form (its A's address), in token order within a form, each
// group cut into blocks of 8, then one of 4, 2 and 1 as its remainder needs. Tokens without an adapter
// (address 0) are in none.
std::vector<Block> blocks_of(const int64_t* forms, int64_t tokens, int64_t cols) {
  std::vector<std::pair<const int64_t*, std::vector<int64_t>>> groups;  // one per form present, few
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t* form = forms + t * cols;
    if (form[0] == 0) continue;
    size_t g = 0;
    while (g < groups.size() && groups[g].first[0] != form[0]) ++g;
    if (g == groups.size()) groups.emplace_back(form, std::vector<int64_t>());
    groups[g].second.push_back(t);
  }
  std::vector<Block> blocks;
  for (const auto& [form, members] : groups) {
    size_t next = 0;
    for (int size = BLOCK; size >= 1; size /= 2) {
      while (members.size() - next >= static_cast<size_t>(size)) {
        Block blk{form, size, {}};
        for (int b = 0; b < size; ++b) blk.tokens[b] = members[next++];
        blocks.push_back(blk);
        if (size < BLOCK) break;  // a remainder needs each smaller size at most once
      }
    }
  }
  return blocks;
}

template <typename T>
void token_lora(const at::Tensor& y, const at::Tensor& x, const int64_t* forms, const std::vector<int64_t>& outs,
                double scale, bool native_bf16) {
  const int64_t tokens = x.size(0), in = x.size(1), slices = outs.size(), cols = 3 + slices;
  const std::vector<Block> blocks = blocks_of(forms, tokens, cols);
  int64_t width = 0, rows = 0;
  for (const Block& blk : blocks) width = std::max(width, slices * blk.form[1]), rows = std::max(rows, blk.form[2]);
  std::vector<int64_t> starts(slices + 1, 0);
  for (int64_t s = 0; s < slices; ++s) starts[s + 1] = starts[s] + outs[s];
  const Call call{in, x.stride(0), y.stride(0), slices, outs.data(), starts.data(), static_cast<float>(scale)};
  const T* xs = x.const_data_ptr<T>();
  T* ys = y.data_ptr<T>();
  const bool in_pairs = std::is_same_v<T, c10::BFloat16> && native_bf16 && cpu_has_native_bf16();
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xb(in_pairs ? 0 : BLOCK * in), h(BLOCK * width), c(BLOCK * rows);
    std::vector<uint32_t> cp(in_pairs ? BLOCK * rows / 2 : 0);
    for (int64_t i = begin; i < end; ++i) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (in_pairs) {
          run_pairs(call, blocks[i], xs, ys, h.data(), c.data(), cp.data());
          continue;
        }
      }
      run(call, blocks[i], xs, ys, xb.data(), h.data(), c.data());
    }
  });
}

void token_lora_op(at::Tensor y, const at::Tensor& x, const at::Tensor& forms, const std::vector<int64_t>& outs,
                   double scale, bool native_bf16) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "x and y must be (T, in) and (T, out)");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "x and y rows must be contiguous");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "x and y must share a dtype");
  const int64_t tokens = x.size(0), slices = outs.size();
  TORCH_CHECK(forms.scalar_type() == at::kLong && forms.is_contiguous(), "forms must be a contiguous int64 table");
  TORCH_CHECK(forms.dim() == 2 && forms.size(0) == tokens && forms.size(1) == 3 + slices,
              "forms must hold one row per token: A's address, packed, rows and one B address per slice");
  int64_t total = 0;
  for (int64_t n : outs) total += n;
  TORCH_CHECK(y.size(1) == total, "y's width must be the sum of the slices' widths");
  const int64_t* f = forms.const_data_ptr<int64_t>();
  switch (x.scalar_type()) {
    case at::kFloat: return token_lora<float>(y, x, f, outs, scale, native_bf16);
    case at::kBFloat16: return token_lora<c10::BFloat16>(y, x, f, outs, scale, native_bf16);
    case at::kHalf: return token_lora<c10::Half>(y, x, f, outs, scale, native_bf16);
    default: TORCH_CHECK(false, "token_lora runs float32, bfloat16 or float16, not ", x.scalar_type());
  }
}

}  // namespace

// A Python module, not a torch op: the kernel runs inside our lora_linear op's Python (lora_ops/token_step.py),
// never in a traced graph, and pybind11 calls it without the dispatcher's boxing of every argument, a few us of
// each of a step's 20 calls (python -m loadtests.bench_lora_calls). The GIL is released while it runs, so the
// loading thread's Python (lora_ops/ready.py) is not held up by a long prefill call.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("token_lora", &token_lora_op, py::arg("y"), py::arg("x"), py::arg("forms"), py::arg("outs"), py::arg("scale"),
        py::arg("native_bf16") = true, py::call_guard<py::gil_scoped_release>(),
        "y (T, out) += scale * (x (T, in) @ A_t) @ B_t per token t, A_t and B_t read at forms' addresses");
  // Whether bfloat16 calls run in bf16 pairs on this CPU (one answer for every call: no tensor to look at).
  m.def("native_bf16", &cpu_has_native_bf16);
}
