// nsvit-fast compiled ops: declarations shared by the CPU (ops.cpp) and CUDA (ops_cuda.cu) sources.
#pragma once
#include <torch/extension.h>
#include <vector>

// Probability-shift loss. zn (M, B, K), zc (B, K), pc (B, K) or undefined. Returns
// {loss (M), mse (M), stop (M, bool), grad (M, B, K)}; grad is d(sum_m loss[m]) / d zn.
std::vector<at::Tensor> prob_shift_cpu(const at::Tensor& zn, const at::Tensor& zc, const at::Tensor& pc, double eps);
// Nullspace projection of every rh x rw patch of x (B, C, H, W) with orthonormal rows q (k, n).
at::Tensor nullspace_project_cpu(const at::Tensor& x, const at::Tensor& q, int64_t rh, int64_t rw, bool keep);

#ifdef WITH_CUDA
std::vector<at::Tensor> prob_shift_cuda(const at::Tensor& zn, const at::Tensor& zc, const at::Tensor& pc, double eps);
at::Tensor nullspace_project_cuda(const at::Tensor& x, const at::Tensor& q, int64_t rh, int64_t rw, bool keep);
#endif
