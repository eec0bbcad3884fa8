// CUDA implementations. Compiled with nvcc when NSVIT_BUILD_EXT=cuda; not run on this project's
// CPU-only machines (compile-checked in CI).
#include "ops.h"

#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ T block_reduce(T v, T* shm, bool is_max) {
  const int tid = threadIdx.x;
  shm[tid] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) shm[tid] = is_max ? max(shm[tid], shm[tid + s]) : shm[tid] + shm[tid + s];
    __syncthreads();
  }
  T r = shm[0];
  __syncthreads();
  return r;
}

// one block per (m, b) row
template <typename T>
__global__ void rows_kernel(const T* zn, const float* zc, const float* pc, float* grad, float* dist, float* sq, int B,
                            int K) {
  __shared__ float shm[kThreads];
  const int row = blockIdx.x, b = row % B;
  const T* n = zn + (int64_t)row * K;
  const float* c = zc + (int64_t)b * K;
  float mn = -INFINITY, mc = -INFINITY, d2 = 0.f;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    float a = float(n[k]), e = float(c[k]);
    mn = fmaxf(mn, a);
    mc = fmaxf(mc, e);
    d2 += (a - e) * (a - e);
  }
  mn = block_reduce(mn, shm, true);
  mc = block_reduce(mc, shm, true);
  d2 = block_reduce(d2, shm, false);
  float sn = 0.f, sc = 0.f;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    sn += __expf(float(n[k]) - mn);
    sc += __expf(float(c[k]) - mc);
  }
  sn = block_reduce(sn, shm, false);
  sc = block_reduce(sc, shm, false);
  const float dd = sqrtf(d2);
  const float scale = (dd > 0.f || isnan(dd)) ? 1.f / (dd * B) : 0.f;  // a NaN row stays NaN, as the reference
  float s = 0.f;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    float a = float(n[k]), e = float(c[k]);
    float p = pc ? float(pc[(int64_t)b * K + k]) : __expf(e - mc) / sc;
    float dp = __expf(a - mn) / sn - p;
    s += dp * dp;
    grad[(int64_t)row * K + k] = (a - e) * scale;
  }
  s = block_reduce(s, shm, false);
  if (threadIdx.x == 0) {
    dist[row] = dd;
    sq[row] = s;
  }
}

// one thread per noise m: fixed-order sums over its B rows (deterministic), stop flag on device
__global__ void reduce_kernel(const float* dist, const float* sq, float* loss, float* mse, bool* stop, int M, int B,
                              float eps) {
  const int m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m >= M) return;
  float a = 0.f, s = 0.f;
  for (int b = 0; b < B; ++b) {
    a += dist[m * B + b];
    s += sq[m * B + b];
  }
  loss[m] = a / B;
  mse[m] = s / B;
  stop[m] = s / B < eps;
}

// patches in the compute type A (fp32, fp64 for fp64 images), read from images of type T
template <typename T, typename A>
__global__ void gather_kernel(const T* x, A* patches, int64_t P, int C, int H, int W, int rh, int rw, int gh, int gw) {
  const int64_t n = (int64_t)C * rh * rw;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < P * n; idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx / n, j = idx % n;
    const int64_t b = p / (gh * gw), gy = (p / gw) % gh, gx = p % gw;
    const int c = j / (rh * rw), dy = (j / rw) % rh, dx = j % rw;
    patches[idx] = static_cast<A>(x[b * C * H * W + (int64_t)c * H * W + (gy * rh + dy) * W + gx * rw + dx]);
  }
}

// the result rounded once to the images' type T
template <typename T, typename A>
__global__ void scatter_kernel(const A* proj, const A* patches, T* out, int64_t P, int C, int H, int W, int rh, int rw,
                               int gh, int gw, bool keep) {
  const int64_t n = (int64_t)C * rh * rw;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < P * n; idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t p = idx / n, j = idx % n;
    const int64_t b = p / (gh * gw), gy = (p / gw) % gh, gx = p % gw;
    const int c = j / (rh * rw), dy = (j / rw) % rh, dx = j % rw;
    out[b * C * H * W + (int64_t)c * H * W + (gy * rh + dy) * W + gx * rw + dx] =
        static_cast<T>(keep ? proj[idx] : patches[idx] - proj[idx]);
  }
}

}  // namespace

std::vector<at::Tensor> prob_shift_cuda(const at::Tensor& zn_in, const at::Tensor& zc_in, const at::Tensor& pc_in,
                                        double eps) {
  TORCH_CHECK(zn_in.is_cuda() && zn_in.dim() == 3 && zc_in.dim() == 2,
              "nsvit_fast._C: prob_shift: z_noisy must be a CUDA (M, B, K) tensor and z_clean (B, K)");
  TORCH_CHECK(zn_in.size(1) == zc_in.size(0) && zn_in.size(2) == zc_in.size(1),
              "nsvit_fast._C: prob_shift: z_clean does not match z_noisy's (B, K)");
  TORCH_CHECK(!pc_in.defined() || pc_in.sizes() == zc_in.sizes(), "nsvit_fast._C: prob_shift: p_clean must be (B, K)");
  // the kernel reads every input through zn's device: a CPU p_clean would be a host pointer there
  TORCH_CHECK(zc_in.device() == zn_in.device() && (!pc_in.defined() || pc_in.device() == zn_in.device()),
              "nsvit_fast._C: prob_shift: z_noisy, z_clean and p_clean must be on one device");
  const c10::cuda::CUDAGuard guard(zn_in.device());
  // fp64 logits are computed in fp32 here: nsvit_fast.ops hands them to the torch reference
  // the clean logits in fp32 whatever z_noisy's dtype: rounded to bf16 they moved the loss (as the reference does not)
  auto zn = zn_in.contiguous(), zc = zc_in.to(at::kFloat).contiguous();
  at::Tensor pc = pc_in.defined() ? pc_in.to(at::kFloat).contiguous() : at::Tensor();
  const int M = zn.size(0), B = zn.size(1), K = zn.size(2);
  auto f32 = zn.options().dtype(at::kFloat);
  auto grad = at::empty({M, B, K}, f32), dist = at::empty({M * B}, f32), sq = at::empty({M * B}, f32);
  auto loss = at::empty({M}, f32), mse = at::empty({M}, f32);
  auto stop = at::empty({M}, zn.options().dtype(at::kBool));
  auto stream = at::cuda::getCurrentCUDAStream();
  // a zero-size grid is a launch error: an empty input launches nothing (no rows: the means
  // below are 0 / 0 = NaN, as torch's mean over an empty batch)
  if (M > 0 && B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zn.scalar_type(), "prob_shift_cuda", [&] {
      rows_kernel<scalar_t><<<M * B, kThreads, 0, stream>>>(zn.data_ptr<scalar_t>(), zc.data_ptr<float>(),
                                                          pc.defined() ? pc.data_ptr<float>() : nullptr,
                                                          grad.data_ptr<float>(), dist.data_ptr<float>(),
                                                          sq.data_ptr<float>(), B, K);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (M > 0) {
    reduce_kernel<<<(M + 127) / 128, 128, 0, stream>>>(dist.data_ptr<float>(), sq.data_ptr<float>(),
                                                       loss.data_ptr<float>(), mse.data_ptr<float>(),
                                                       stop.data_ptr<bool>(), M, B, float(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {loss, mse, stop, grad};
}

at::Tensor nullspace_project_cuda(const at::Tensor& x_in, const at::Tensor& q_in, int64_t rh, int64_t rw, bool keep) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 4 && q_in.dim() == 2,
              "nsvit_fast._C: nullspace_project: x must be a CUDA (B, C, H, W) tensor and the basis (k, n)");
  TORCH_CHECK(rh > 0 && rw > 0 && x_in.size(2) % rh == 0 && x_in.size(3) % rw == 0,
              "nsvit_fast._C: nullspace_project: image size is not a multiple of the patch");
  TORCH_CHECK(q_in.size(1) == x_in.size(1) * rh * rw, "nsvit_fast._C: nullspace_project: basis width is not C * rh * rw");
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  // fp32 compute (fp64 for fp64 images), as the C++ op: the basis is not rounded to fp16 / bf16,
  // the patches are gathered into the compute type and the result is rounded once to x's dtype
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto q = q_in.to(x.options().dtype(compute)).contiguous();
  const int B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int gh = H / rh, gw = W / rw;
  const int64_t P = (int64_t)B * gh * gw, n = (int64_t)C * rh * rw;
  auto out = at::empty_like(x);
  if (P * n == 0) return out;  // empty images: nothing to launch (a zero-size grid is an error)
  auto patches = at::empty({P, n}, x.options().dtype(compute));
  auto stream = at::cuda::getCurrentCUDAStream();
  const int blocks = (int)std::min<int64_t>((P * n + 255) / 256, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nullspace_project_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;  // float, double for double
    gather_kernel<scalar_t, acc_t><<<blocks, 256, 0, stream>>>(x.data_ptr<scalar_t>(), patches.data_ptr<acc_t>(), P, C,
                                                                H, W, rh, rw, gh, gw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto proj = at::mm(at::mm(patches, q.t()), q);  // cuBLAS; an empty basis (k = 0) gives zeros
    scatter_kernel<scalar_t, acc_t><<<blocks, 256, 0, stream>>>(proj.data_ptr<acc_t>(), patches.data_ptr<acc_t>(),
                                                                 out.data_ptr<scalar_t>(), P, C, H, W, rh, rw, gh, gw,
                                                                 keep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}
