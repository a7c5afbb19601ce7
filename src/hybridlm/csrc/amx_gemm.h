// A bf16 matrix product on the AMX tiles, for the attention kernel's small block products:
//   C (M x N, fp32, ld_c) (+)= A (M x K, bf16 row-major, ld_a) . B (K x N, bf16 VNNI pairs [K/2][N][2])
// oneDNN's brgemm (at::native::cpublas::brgemm) computes the same, but for our 64 x 64 x 64 blocks
// it measured 1.4 us a call on an AMX Xeon, a quarter of which is tile work: the rest is its kernel
// lookup per call and the tile reconfiguration whenever the shape changes between calls. Here
// one fixed tile configuration serves every shape: 8 tiles of 16 rows x 64 bytes, C in 2 x 2
// tiles of 16 x 16 fp32, two A tiles (16 rows x 32 bf16) and two B tiles (16 pair rows x 16 columns).
#pragma once
#include <immintrin.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <c10/util/Exception.h>

namespace amx {

using bf16 = uint16_t;

// Whether this CPU has AMX-BF16 and Linux lets this process use the tile state (asked once: the
// permission is per process, and without it the first tile instruction faults).
inline bool available() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = d & (1u << 24), bf16_ops = d & (1u << 22);
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return tile && bf16_ops && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Load the one configuration on this thread: at the start of every worker's task, since other
// code on the same thread (oneDNN, PyTorch's flash attention) configures the tiles its own way.
__attribute__((target("amx-tile"))) inline void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  asm volatile("" : : "r"(&cfg) : "memory");  // GCC 12 does not see ldtilecfg read cfg and drops its stores
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) inline void release() { _tile_release(); }

// One block of C: MT x NT tiles (1 or 2 each) at C, over K (a multiple of 32).
template <int MT, int NT>
__attribute__((target("amx-tile,amx-bf16"))) inline void block(int K, const bf16* A, int64_t ld_a, const bf16* B,
                                                               int64_t ld_b, float* C, int64_t ld_c, bool add) {
  const int64_t sa = ld_a * 2, sb = ld_b * 4, sc = ld_c * 4;  // byte strides; a B pair row is 2 * ld_b bf16
  if (add) {
    _tile_loadd(0, C, sc);
    if (NT > 1) _tile_loadd(1, C + 16, sc);
    if (MT > 1) _tile_loadd(2, C + 16 * ld_c, sc);
    if (MT > 1 && NT > 1) _tile_loadd(3, C + 16 * ld_c + 16, sc);
  } else {
    _tile_zero(0);
    if (NT > 1) _tile_zero(1);
    if (MT > 1) _tile_zero(2);
    if (MT > 1 && NT > 1) _tile_zero(3);
  }
  for (int k = 0; k < K; k += 32) {
    const bf16* b = B + (int64_t)(k / 2) * ld_b * 2;
    _tile_loadd(4, A + k, sa);
    _tile_loadd(6, b, sb);
    if (NT > 1) _tile_loadd(7, b + 32, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (NT > 1) _tile_dpbf16ps(1, 4, 7);
    if (MT > 1) {
      _tile_loadd(5, A + 16 * ld_a + k, sa);
      _tile_dpbf16ps(2, 5, 6);
      if (NT > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, C, sc);
  if (NT > 1) _tile_stored(1, C + 16, sc);
  if (MT > 1) _tile_stored(2, C + 16 * ld_c, sc);
  if (MT > 1 && NT > 1) _tile_stored(3, C + 16 * ld_c + 16, sc);
}

// M and N multiples of 16, K a multiple of 32 (the callers pad; see gemm below for the rest).
inline void gemm_aligned(int M, int N, int K, const bf16* A, int64_t ld_a, const bf16* B, int64_t ld_b, float* C,
                         int64_t ld_c, bool add) {
  for (int m = 0; m < M; m += 32)
    for (int n = 0; n < N; n += 32) {
      const bf16* a = A + (int64_t)m * ld_a;
      const bf16* b = B + n * 2;
      float* c = C + (int64_t)m * ld_c + n;
      const bool two_m = M - m >= 32, two_n = N - n >= 32;
      if (two_m && two_n) block<2, 2>(K, a, ld_a, b, ld_b, c, ld_c, add);
      else if (two_m) block<2, 1>(K, a, ld_a, b, ld_b, c, ld_c, add);
      else if (two_n) block<1, 2>(K, a, ld_a, b, ld_b, c, ld_c, add);
      else block<1, 1>(K, a, ld_a, b, ld_b, c, ld_c, add);
    }
}

constexpr int MAX_K = 512, MAX_TAIL_M = 256;  // the padded copies' sizes: a key chunk, a query block

// M a multiple of 16, N a multiple of 16, K a multiple of 16 (at most MAX_K), ld_b = N. A K tail
// of 16 goes through zero-padded copies of A's last 16 columns and B's last 8 pair rows, so that
// no tile reads past them (a NaN there times a zero pad would still be NaN).
inline void rows_gemm(int M, int N, int K, const bf16* A, int64_t ld_a, const bf16* B, float* C, int64_t ld_c,
                      bool add) {
  const int K32 = K / 32 * 32;
  if (K32 > 0) gemm_aligned(M, N, K32, A, ld_a, B, N, C, ld_c, add);
  if (K32 == K) return;
  TORCH_CHECK(M <= MAX_TAIL_M && N <= 64, "amx::gemm: a K tail needs M <= 256 and N <= 64");
  thread_local bf16 a_pad[MAX_TAIL_M * 32], b_pad[16 * 64 * 2];
  std::memset(b_pad, 0, sizeof(bf16) * 16 * N * 2);
  std::memcpy(b_pad, B + (int64_t)K32 * N, sizeof(bf16) * 8 * N * 2);
  for (int m = 0; m < M; ++m) {
    std::memcpy(a_pad + m * 32, A + (int64_t)m * ld_a + K32, sizeof(bf16) * 16);
    std::memset(a_pad + m * 32 + 16, 0, sizeof(bf16) * 16);
  }
  gemm_aligned(M, N, 32, a_pad, 32, b_pad, N, C, ld_c, add || K32 > 0);
}

// Any M (rows past the last whole tile go through zero-padded copies of A and C, so that no tile
// reads past A or writes past C's M rows), N a multiple of 16 (at most 64), K a multiple of 16.
inline void gemm(int M, int N, int K, int64_t ld_a, const bf16* A, const bf16* B, float* C, int64_t ld_c, bool add) {
  TORCH_CHECK(N % 16 == 0 && N <= 64 && K % 16 == 0, "amx::gemm: N must be 16, 32, 48 or 64 and K a multiple of 16");
  const int M16 = M / 16 * 16;
  if (M16 > 0) rows_gemm(M16, N, K, A, ld_a, B, C, ld_c, add);
  const int rows = M - M16;
  if (rows == 0) return;
  TORCH_CHECK(K <= MAX_K, "amx::gemm: a partial row tile needs K <= 512");
  thread_local bf16 a_rows[16 * MAX_K];
  thread_local float c_rows[16 * 64];
  std::memset(a_rows, 0, sizeof(bf16) * 16 * K);
  for (int r = 0; r < rows; ++r) std::memcpy(a_rows + r * K, A + (int64_t)(M16 + r) * ld_a, sizeof(bf16) * K);
  if (add)
    for (int r = 0; r < rows; ++r) std::memcpy(c_rows + r * N, C + (int64_t)(M16 + r) * ld_c, sizeof(float) * N);
  rows_gemm(16, N, K, a_rows, K, B, c_rows, N, add);
  for (int r = 0; r < rows; ++r) std::memcpy(C + (int64_t)(M16 + r) * ld_c, c_rows + r * N, sizeof(float) * N);
}

}  // namespace amx
