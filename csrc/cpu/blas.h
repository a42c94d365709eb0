// The BLAS torch links, for the CPU kernels' small GEMMs (attention's per-head products, Muon's
// Newton-Schulz): sgemm_/dgemm_ (MKL on x86 Linux), declared weak so a torch without them still
// loads; blas_linked() says whether they are there. Called from inside at::parallel_for regions,
// where they run single-threaded.
#pragma once

#include <cstdint>

namespace fastlm {

#if defined(__linux__)
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}
inline bool blas_linked(float*) { return sgemm_ != nullptr; }
inline bool blas_linked(double*) { return dgemm_ != nullptr; }
// Row-major C[m x n] = alpha op(A) op(B) + beta C; op(A) is m x k (A stored m x k, or k x m when
// ta), op(B) is k x n (B stored k x n, or n x k when tb). Column-major BLAS computes C^T = op(B)^T op(A)^T.
inline void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* A,
                    int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
  const int M = int(m), N = int(n), K = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
  sgemm_(&b, &a, &N, &M, &K, &alpha, B, &lb, A, &la, &beta, C, &lc);
}
inline void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* A,
                    int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
  const int M = int(m), N = int(n), K = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
  dgemm_(&b, &a, &N, &M, &K, &alpha, B, &lb, A, &la, &beta, C, &lc);
}
#else
template <typename T>
inline bool blas_linked(T*) { return false; }
template <typename T>
inline void gemm_rm(bool, bool, int64_t, int64_t, int64_t, T, const T*, int64_t, const T*, int64_t, T, T*,
                    int64_t) {}
#endif

}  // namespace fastlm
