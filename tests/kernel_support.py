"""Which CPU fp32 head kernels must exist here: the tests' own probe of the machine.

The oracle must not guess from CPU flags (an AMD EPYC with AVX512-BF16 has
the flag but oneDNN offers no bf16 brgemm there), and must not reuse the
product's check (a broken check would then agree with itself). So it asks
the machine directly: a child process compiles a few lines of C++ that ask
oneDNN (through PyTorch's ``at::native::cpublas``) whether it can pack bf16,
and if so runs one tiny bf16 brgemm and compares it with a plain loop.

* ``brgemm_expected()``: that probe succeeded, so the product's brgemm route
  must have built and be chosen; elsewhere its tests skip.
* ``blocked_expected()``: a C++ compiler is there (the probe's own build
  proves it), so the ``blocked`` route must have built.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import textwrap

PROBE_CPP = textwrap.dedent("""
    #include <ATen/native/CPUBlas.h>
    #include <cmath>
    #include <vector>
    // 1: oneDNN packs bf16 and a 16x16x32 bf16 brgemm matches a plain loop;
    // 0: it cannot pack bf16; -1: it claims to, but the result is wrong.
    int64_t probe() {
      if (!at::native::cpublas::could_pack(at::kBFloat16)) return 0;
      const int64_t M = 16, N = 16, K = 32;
      std::vector<at::BFloat16> a(M * K), b(K * N), bp(K * N);
      for (int64_t i = 0; i < M * K; ++i) a[i] = at::BFloat16(float((i * 7) % 13) - 6.f);
      for (int64_t i = 0; i < K * N; ++i) b[i] = at::BFloat16(float((i * 5) % 11) - 5.f);
      at::native::cpublas::pack(K, N, N, N, at::kBFloat16, at::kBFloat16, b.data(), bp.data());
      std::vector<float> c(M * N);
      at::native::cpublas::brgemm(M, N, K, K, N, N, false, a.data(), bp.data(), c.data(), true);
      at::native::cpublas::brgemm_release(true);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          float ref = 0.f;
          for (int64_t k = 0; k < K; ++k) ref += float(a[m * K + k]) * float(b[k * N + n]);
          if (std::fabs(ref - c[m * N + n]) > 1e-3f) return -1;
        }
      return 1;
    }
""")

PROBE_SCRIPT = textwrap.dedent("""
    import json, sys
    from torch.utils.cpp_extension import load_inline
    mod = load_inline("rl_compat_test_brgemm_probe", cpp_sources=[sys.argv[1]],
                      functions=["probe"], build_directory=sys.argv[2], verbose=False)
    print("PROBE " + json.dumps({"brgemm": mod.probe()}))
""")


@functools.lru_cache(maxsize=1)
def probe() -> dict:
    """Run the probe once per test session: ``{"compiled": bool, "brgemm": 1|0|-1|None}``.

    The build is kept in the cache directory (keyed by the source and the
    torch version), so only the first session pays for the compile; the
    probe itself runs every session."""
    import torch

    from vllm_rl_compat import envs

    key = hashlib.sha256((PROBE_CPP + torch.__version__).encode()).hexdigest()[:12]
    build = envs.VLLM_RL_COMPAT_CACHE / "test_probe" / key
    build.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, PROBE_CPP, str(build)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_RL_COMPAT": "0"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    if proc.returncode != 0 or not lines:
        return {"compiled": False, "brgemm": None, "log": proc.stderr[-2000:]}
    return {"compiled": True, **json.loads(lines[-1][len("PROBE "):])}


def brgemm_expected() -> bool:
    """oneDNN ran a bf16 brgemm correctly on this machine."""
    return probe()["brgemm"] == 1


def blocked_expected() -> bool:
    """A C++ extension builds here (the probe compiled)."""
    return probe()["compiled"]


def expected_cpu_route() -> str:
    """What ``fp32_linear(impl="auto")`` must run for bf16 x bf16 on this machine."""
    if brgemm_expected():
        return "brgemm"
    return "blocked" if blocked_expected() else "torch"
