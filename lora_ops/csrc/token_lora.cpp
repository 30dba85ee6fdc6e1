// Each token through its own adapter, reading the adapter's weights where they lie (punica's BGMV, for the CPU).
//
// Why: with as many adapters present as tokens (16 requests over 100 adapters), every way to run the step
// with torch ops either launches small matmuls per adapter (call-bound) or copies each token's weights into
// a stack first (copy-bound: the copy moves the bytes the matmul then reads again). Here one call per LoRA
// linear walks the tokens; a token reads its adapter's A and B once, in place, and accumulates in float32.
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
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Built once for every machine type it may run on (the image's CPU is not the node's): the hot loops are
// cloned per instruction set and the loader picks one at load time.
#define CLONED __attribute__((target_clones("avx512f", "avx2", "default")))

inline float widen(float v) { return v; }
inline float widen(c10::Half v) { return static_cast<float>(v); }
// bfloat16 is float32's upper half: a shift the compiler vectorizes (c10's conversion goes through memcpy).
inline float widen(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// h (width) = x (in) @ A (in, width): A read row by row, `width` contiguous values per input feature, four
// rows a pass so that h is loaded and stored once per four multiply-adds.
template <typename T>
inline __attribute__((always_inline)) void shrink_loop(float* h, const T* x, const T* a, int64_t in, int64_t width) {
  for (int64_t w = 0; w < width; ++w) h[w] = 0.0f;
  int64_t i = 0;
  for (; i + 4 <= in; i += 4) {
    const float x0 = widen(x[i]), x1 = widen(x[i + 1]), x2 = widen(x[i + 2]), x3 = widen(x[i + 3]);
    const T *r0 = a + i * width, *r1 = r0 + width, *r2 = r1 + width, *r3 = r2 + width;
    for (int64_t w = 0; w < width; ++w) {
      h[w] += x0 * widen(r0[w]) + x1 * widen(r1[w]) + x2 * widen(r2[w]) + x3 * widen(r3[w]);
    }
  }
  for (; i < in; ++i) {
    const float xi = widen(x[i]);
    const T* row = a + i * width;
    for (int64_t w = 0; w < width; ++w) h[w] += xi * widen(row[w]);
  }
}

// d (n) += sum over r < rows of h[r] * k * B[r] (B: (rows, n) row-major), four rows of B a pass.
template <typename T>
inline __attribute__((always_inline)) void expand_loop(float* d, const float* h, const T* b, int64_t rows, int64_t n,
                                                       float k) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float c0 = h[r] * k, c1 = h[r + 1] * k, c2 = h[r + 2] * k, c3 = h[r + 3] * k;
    const T *b0 = b + r * n, *b1 = b0 + n, *b2 = b1 + n, *b3 = b2 + n;
    for (int64_t o = 0; o < n; ++o) {
      d[o] += c0 * widen(b0[o]) + c1 * widen(b1[o]) + c2 * widen(b2[o]) + c3 * widen(b3[o]);
    }
  }
  for (; r < rows; ++r) {
    const float c = h[r] * k;
    const T* row = b + r * n;
    for (int64_t o = 0; o < n; ++o) d[o] += c * widen(row[o]);
  }
}

CLONED void shrink(float* h, const float* x, const float* a, int64_t in, int64_t w) { shrink_loop(h, x, a, in, w); }
CLONED void shrink(float* h, const c10::BFloat16* x, const c10::BFloat16* a, int64_t in, int64_t w) {
  shrink_loop(h, x, a, in, w);
}
CLONED void shrink(float* h, const c10::Half* x, const c10::Half* a, int64_t in, int64_t w) {
  shrink_loop(h, x, a, in, w);
}
CLONED void expand(float* d, const float* h, const float* b, int64_t rows, int64_t n, float k) {
  expand_loop(d, h, b, rows, n, k);
}
CLONED void expand(float* d, const float* h, const c10::BFloat16* b, int64_t rows, int64_t n, float k) {
  expand_loop(d, h, b, rows, n, k);
}
CLONED void expand(float* d, const float* h, const c10::Half* b, int64_t rows, int64_t n, float k) {
  expand_loop(d, h, b, rows, n, k);
}

template <typename T>
void token_lora(const at::Tensor& y, const at::Tensor& x, const int64_t* forms, const std::vector<int64_t>& outs,
                double scale) {
  const int64_t tokens = x.size(0), in = x.size(1), slices = outs.size(), cols = 3 + slices;
  int64_t width = 0;
  for (int64_t t = 0; t < tokens; ++t) width = std::max(width, slices * forms[t * cols + 1]);
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);
  std::vector<int64_t> starts(slices + 1, 0);
  for (int64_t s = 0; s < slices; ++s) starts[s + 1] = starts[s] + outs[s];
  const T* xs = x.const_data_ptr<T>();
  T* ys = y.data_ptr<T>();
  const float k = static_cast<float>(scale);
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(width), d(starts[slices]);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t* form = forms + t * cols;
      const T* a = reinterpret_cast<const T*>(form[0]);
      if (a == nullptr) continue;
      const int64_t packed = form[1], rows = form[2];
      shrink(h.data(), xs + t * x_stride, a, in, slices * packed);
      std::fill(d.begin(), d.end(), 0.0f);
      for (int64_t s = 0; s < slices; ++s) {
        const T* b = reinterpret_cast<const T*>(form[3 + s]);
        expand(d.data() + starts[s], h.data() + s * packed, b, rows, outs[s], k);
      }
      T* yt = ys + t * y_stride;
      for (int64_t o = 0; o < starts[slices]; ++o) yt[o] = static_cast<T>(widen(yt[o]) + d[o]);
    }
  });
}

void token_lora_op(at::Tensor y, const at::Tensor& x, const at::Tensor& forms, at::IntArrayRef outs, double scale) {
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
  std::vector<int64_t> out_list(outs.begin(), outs.end());
  const int64_t* f = forms.const_data_ptr<int64_t>();
  switch (x.scalar_type()) {
    case at::kFloat: return token_lora<float>(y, x, f, out_list, scale);
    case at::kBFloat16: return token_lora<c10::BFloat16>(y, x, f, out_list, scale);
    case at::kHalf: return token_lora<c10::Half>(y, x, f, out_list, scale);
    default: TORCH_CHECK(false, "token_lora runs float32, bfloat16 or float16, not ", x.scalar_type());
  }
}

}  // namespace

// A fragment of the namespace that lora_ops/compiled.py also adds its ops to.
TORCH_LIBRARY_FRAGMENT(loraserve, m) {
  m.def("token_lora(Tensor(a!) y, Tensor x, Tensor forms, int[] outs, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(loraserve, CPU, m) { m.impl("token_lora", token_lora_op); }
