// fp32 logits from bf16 operands on CPU: out[T, V] = x[T, H] @ w[V, H]^T.
//
// Why: PyTorch's CPU matmul has no bf16 x bf16 -> fp32 output, so an exact
// fp32 head otherwise converts the weight to fp32 on every step.  PyTorch
// does export oneDNN's batch-reduce GEMM micro-kernel (at::native::cpublas::
// brgemm, AMX / AVX512-BF16) with bf16 inputs and an fp32 accumulator, the
// same dot products the bf16 head runs, kept in fp32.
//
// Layout trick: the weight is the A operand (rows = vocabulary, read in place,
// never copied or packed) and the few token rows are the VNNI-packed B operand
// (H x T, packed per call: tiny).  Each thread computes blocks of vocabulary
// rows into a small [block_v, T] fp32 buffer and writes its transpose into
// the output rows.  Tokens are processed 64 at a time so B stays small.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kTokenBlock = 64;  // B columns per call: one packed x^T block

void token_block(const at::BFloat16* x, int64_t ldx, int64_t T, const at::BFloat16* w,
                 int64_t ldw, int64_t V, int64_t H, float* out, int64_t ldo) {
  const int64_t Tp = (T + 15) / 16 * 16;  // pad tokens to a whole AMX tile
  const int64_t block_v = Tp <= 32 ? 256 : 128;
  std::vector<at::BFloat16> xt(H * Tp, at::BFloat16(0.f)), xp(H * Tp);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) xt[h * Tp + t] = x[t * ldx + h];
  at::native::cpublas::pack(H, Tp, Tp, Tp, at::kBFloat16, at::kBFloat16, xt.data(), xp.data());
  const int64_t blocks = (V + block_v - 1) / block_v;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> c(block_v * Tp);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * block_v, m = std::min(block_v, V - v0);
      at::native::cpublas::brgemm(m, Tp, H, ldw, Tp, Tp, /*add_C=*/false, w + v0 * ldw,
                                  xp.data(), c.data(), /*is_vnni=*/true);
      for (int64_t t = 0; t < T; ++t) {
        float* dst = out + t * ldo + v0;
        for (int64_t i = 0; i < m; ++i) dst[i] = c[i * Tp + t];
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  });
}

at::Tensor bf16_linear_f32(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16,
              "bf16_linear_f32: x and w must be bfloat16");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "bf16_linear_f32: expected x [T, H] and w [V, H]");
  TORCH_CHECK(x.stride(1) == 1 && w.stride(1) == 1, "bf16_linear_f32: H must be unit-stride");
  // VNNI packs bf16 pairs along H; an odd H makes the AMX kernel fault (SIGILL).
  TORCH_CHECK(x.size(1) % 2 == 0, "bf16_linear_f32: H must be even");
  const int64_t T = x.size(0), H = x.size(1), V = w.size(0);
  auto out = at::empty({T, V}, x.options().dtype(at::kFloat));
  const auto* xd = x.data_ptr<at::BFloat16>();
  for (int64_t t0 = 0; t0 < T; t0 += kTokenBlock) {
    token_block(xd + t0 * x.stride(0), x.stride(0), std::min(kTokenBlock, T - t0),
                w.data_ptr<at::BFloat16>(), w.stride(0), V, H, out.data_ptr<float>() + t0 * V, V);
  }
  return out;
}

bool bf16_brgemm_supported() { return at::native::cpublas::could_pack(at::kBFloat16); }

}  // namespace

TORCH_LIBRARY(rl_compat, m) {
  m.def("bf16_linear_f32(Tensor x, Tensor w) -> Tensor");
  m.impl("bf16_linear_f32", c10::DispatchKey::CPU, TORCH_FN(bf16_linear_f32));
  m.def("bf16_brgemm_supported() -> bool", &bf16_brgemm_supported);
}
