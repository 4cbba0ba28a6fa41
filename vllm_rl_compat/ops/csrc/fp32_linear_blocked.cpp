// fp32 logits from bf16 operands on any CPU: out[T, V] = x[T, H] @ w[V, H]^T.
//
// Why: oneDNN's bf16 brgemm micro-kernel (fp32_linear_cpu.cpp) needs AMX.
// Without it PyTorch has no bf16 x bf16 -> fp32 matmul, and the chunked torch
// path streams a 4096-row fp32 copy of the weight through memory on every
// step.  Here the bf16 -> fp32 conversion happens where the data already is:
//
// * T <= kGemvTokens (decode with few sequences): a fused matrix-vector loop.
//   Each weight row is read once, widened to fp32 in registers (a 16-bit
//   shift, exact) and multiplied into T fp32 accumulators (AVX2 FMA where the
//   CPU has it, scalar otherwise).  Memory-bound like the bf16 head itself.
// * larger T: each thread widens a block of weight rows into a buffer that
//   stays in its L2 cache and hands it to the BLAS sgemm PyTorch links (MKL on
//   x86) for all T rows at once, writing straight into the output columns.
//
// Exactness: a bf16 x bf16 product has at most 16 significant bits, so it is
// exact in fp32; both routes only round in the fp32 accumulation (the same
// bound as the other fp32_linear paths).  No fp32 copy of the weight exists
// beyond one block per thread.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

constexpr int64_t kGemvTokens = 8;              // fused loop up to this many rows of x
constexpr int64_t kBlockBytes = 128 * 1024;     // fp32 weight block per thread (L2)

inline float widen(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <int T>
void gemv_rows_scalar(const float* x, int64_t H, const uint16_t* w, int64_t ldw, int64_t v0,
                      int64_t v1, float* out, int64_t ldo) {
  for (int64_t v = v0; v < v1; ++v) {
    const uint16_t* row = w + v * ldw;
    float acc[T] = {};
    for (int64_t h = 0; h < H; ++h) {
      const float wv = widen(row[h]);
      for (int t = 0; t < T; ++t) acc[t] += wv * x[t * H + h];  // product exact
    }
    for (int t = 0; t < T; ++t) out[t * ldo + v] = acc[t];
  }
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One weight row at a time, so each thread streams one contiguous range of w
// (interleaving 4 rows to share the x loads was 1.4x slower on the 56 MB
// SmolLM2 head: DRAM-bound, and the prefetcher prefers one stream). 16 bf16
// weights are one 256-bit load; as eight 32-bit lanes, a left shift by 16
// gives the even elements as fp32 and masking the low half gives the odd
// ones (no cross-lane conversion), with one FMA chain each. x comes pre-split
// the same way (xs: per group of 16, its 8 even then its 8 odd elements; Hs =
// H rounded down to 16); the tail of each row is scalar.
template <int T>
__attribute__((target("avx2,fma"))) void gemv_rows_avx2(const float* x, int64_t H,
                                                        const uint16_t* w, int64_t ldw,
                                                        int64_t v0, int64_t v1, float* out,
                                                        int64_t ldo) {
  const int64_t Hs = H / 16 * 16;
  std::vector<float> xs(T * Hs);
  for (int t = 0; t < T; ++t)
    for (int64_t h = 0; h < Hs; h += 16)
      for (int i = 0; i < 8; ++i) {
        xs[t * Hs + h + i] = x[t * H + h + 2 * i];
        xs[t * Hs + h + 8 + i] = x[t * H + h + 2 * i + 1];
      }
  const __m256i high = _mm256_set1_epi32(int(0xFFFF0000u));
  for (int64_t v = v0; v < v1; ++v) {
    const uint16_t* row = w + v * ldw;
    __m256 acc_even[T], acc_odd[T];
    for (int t = 0; t < T; ++t) acc_even[t] = acc_odd[t] = _mm256_setzero_ps();
    for (int64_t h = 0; h < Hs; h += 16) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + h));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(raw, high));
      for (int t = 0; t < T; ++t) {
        acc_even[t] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xs.data() + t * Hs + h), acc_even[t]);
        acc_odd[t] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xs.data() + t * Hs + h + 8), acc_odd[t]);
      }
    }
    for (int t = 0; t < T; ++t) {
      float sum = hsum(_mm256_add_ps(acc_even[t], acc_odd[t]));
      for (int64_t k = Hs; k < H; ++k) sum += widen(row[k]) * x[t * H + k];
      out[t * ldo + v] = sum;
    }
  }
}

bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

template <int T>
void gemv_rows(const float* x, int64_t H, const uint16_t* w, int64_t ldw, int64_t v0, int64_t v1,
               float* out, int64_t ldo) {
#if defined(__x86_64__)
  if (has_avx2_fma()) return gemv_rows_avx2<T>(x, H, w, ldw, v0, v1, out, ldo);
#endif
  gemv_rows_scalar<T>(x, H, w, ldw, v0, v1, out, ldo);
}

void gemv(const float* x, int64_t T, int64_t H, const uint16_t* w, int64_t ldw, int64_t V,
          float* out) {
  using Fn = void (*)(const float*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*,
                      int64_t);
  static constexpr Fn kByTokens[kGemvTokens] = {gemv_rows<1>, gemv_rows<2>, gemv_rows<3>,
                                                gemv_rows<4>, gemv_rows<5>, gemv_rows<6>,
                                                gemv_rows<7>, gemv_rows<8>};
  const Fn fn = kByTokens[T - 1];
  at::parallel_for(0, V, 256, [&](int64_t v0, int64_t v1) { fn(x, H, w, ldw, v0, v1, out, V); });
}

void blocked_gemm(const float* x, int64_t T, int64_t H, const uint16_t* w, int64_t ldw, int64_t V,
                  float* out) {
  // Rows per block: fill kBlockBytes, a multiple of 16, at least 16.
  const int64_t rows = std::max<int64_t>(16, kBlockBytes / (H * 4) / 16 * 16);
  const int64_t blocks = (V + rows - 1) / rows;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(rows * H);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * rows, m = std::min(rows, V - v0);
      for (int64_t i = 0; i < m; ++i) {
        const uint16_t* src = w + (v0 + i) * ldw;
        float* dst = buf.data() + i * H;
        for (int64_t h = 0; h < H; ++h) dst[h] = widen(src[h]);
      }
      // Column-major BLAS view: out^T[v0:v0+m, :T] = buf (H x m)^T * x^T (H x T).
      const int mm = int(m), nn = int(T), kk = int(H), ld_out = int(V);
      const float one = 1.f, zero = 0.f;
      sgemm_("T", "N", &mm, &nn, &kk, &one, buf.data(), &kk, x, &kk, &zero, out + v0, &ld_out);
    }
  });
}

at::Tensor bf16_linear_f32_blocked(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "bf16_linear_f32_blocked: x and w must be bfloat16");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "bf16_linear_f32_blocked: expected x [T, H] and w [V, H]");
  TORCH_CHECK(w.stride(1) == 1, "bf16_linear_f32_blocked: w must be unit-stride along H");
  const int64_t T = x.size(0), H = x.size(1), V = w.size(0);
  TORCH_CHECK(std::max({T, H, V}) <= INT32_MAX,
              "bf16_linear_f32_blocked: sizes exceed 32-bit BLAS indices");
  auto out = at::empty({T, V}, x.options().dtype(at::kFloat));
  if (T == 0 || V == 0) return out;
  if (H == 0) return out.zero_();
  const auto x32 = x.to(at::kFloat).contiguous();  // exact; T x H, small
  const auto* wd = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  if (T <= kGemvTokens) {
    gemv(x32.data_ptr<float>(), T, H, wd, w.stride(0), V, out.data_ptr<float>());
  } else {
    blocked_gemm(x32.data_ptr<float>(), T, H, wd, w.stride(0), V, out.data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rl_compat, m) {
  m.def("bf16_linear_f32_blocked(Tensor x, Tensor w) -> Tensor");
  m.impl("bf16_linear_f32_blocked", c10::DispatchKey::CPU, TORCH_FN(bf16_linear_f32_blocked));
}
