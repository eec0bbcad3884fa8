// CPU implementations (ATen parallel_for, OpenMP underneath) and the pybind11 bindings.
#include "ops.h"

#include <ATen/Parallel.h>
#include <cmath>

namespace {

void check(bool ok, const char* msg) { TORCH_CHECK(ok, "nsvit_fast._C: ", msg); }

// One pass per row over logits and probabilities already computed: the distance, its gradient and
// the squared probability shift. The softmaxes come from ATen (prob_shift_cpu), whose vectorised
// exp is several times faster than a scalar std::exp loop at 1000 classes.
template <typename T>
void prob_shift_rows(const T* zn, const T* zc, const T* pn, const T* pc, T* grad, T* dist, T* sq, int64_t rows,
                     int64_t B, int64_t K) {
  constexpr int L = 8;  // independent accumulators: lets the compiler vectorise the reductions
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* n = zn + row * K;
      const T* c = zc + (row % B) * K;
      const T* q = pn + row * K;
      const T* p = pc + (row % B) * K;
      T d2v[L] = {}, sv[L] = {};
      int64_t k = 0;
      for (; k + L <= K; k += L)
        for (int j = 0; j < L; ++j) {
          T d = n[k + j] - c[k + j], dp = q[k + j] - p[k + j];
          d2v[j] += d * d;
          sv[j] += dp * dp;
        }
      T d2 = 0, s = 0;
      for (; k < K; ++k) {
        T d = n[k] - c[k], dp = q[k] - p[k];
        d2 += d * d;
        s += dp * dp;
      }
      for (int j = 0; j < L; ++j) {
        d2 += d2v[j];
        s += sv[j];
      }
      T dd = std::sqrt(d2);
      // grad of mean_b ||d||; 0 at d = 0; a NaN row stays NaN throughout, as the torch reference's
      T scale = (dd > 0 || std::isnan(dd)) ? T(1) / (dd * T(B)) : T(0);
      T* g = grad + row * K;
      for (k = 0; k < K; ++k) g[k] = (n[k] - c[k]) * scale;
      dist[row] = dd;
      sq[row] = s;
    }
  });
}

}  // namespace

std::vector<at::Tensor> prob_shift_cpu(const at::Tensor& zn_in, const at::Tensor& zc_in, const at::Tensor& pc_in,
                                       double eps) {
  check(zn_in.dim() == 3 && zc_in.dim() == 2, "prob_shift: z_noisy must be (M, B, K) and z_clean (B, K)");
  check(zn_in.size(1) == zc_in.size(0) && zn_in.size(2) == zc_in.size(1), "prob_shift: shapes do not match");
  check(!pc_in.defined() || pc_in.sizes() == zc_in.sizes(), "prob_shift: p_clean must have z_clean's shape");
  auto dtype = zn_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto zn = zn_in.to(dtype).contiguous(), zc = zc_in.to(dtype).contiguous();
  at::Tensor pc = pc_in.defined() ? pc_in.to(dtype).contiguous() : at::Tensor();
  const int64_t M = zn.size(0), B = zn.size(1), K = zn.size(2);
  auto grad = at::empty_like(zn);
  auto dist = at::empty({M * B}, zn.options()), sq = at::empty({M * B}, zn.options());
  auto pn = at::softmax(zn, -1);
  if (!pc.defined()) pc = at::softmax(zc, -1);
  AT_DISPATCH_FLOATING_TYPES(zn.scalar_type(), "prob_shift_cpu", [&] {
    prob_shift_rows<scalar_t>(zn.data_ptr<scalar_t>(), zc.data_ptr<scalar_t>(), pn.data_ptr<scalar_t>(),
                              pc.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), dist.data_ptr<scalar_t>(),
                              sq.data_ptr<scalar_t>(), M * B, B, K);
  });
  auto loss = dist.view({M, B}).sum(1) / double(B);  // fixed-order sums: deterministic
  auto mse = sq.view({M, B}).sum(1) / double(B);
  // float32 as every backend, but float64 stays float64 (the reference's precision)
  return {loss.to(dtype), mse.to(dtype), mse.lt(eps), grad};
}

at::Tensor nullspace_project_cpu(const at::Tensor& x_in, const at::Tensor& q_in, int64_t rh, int64_t rw, bool keep) {
  check(x_in.dim() == 4 && q_in.dim() == 2, "nullspace_project: x must be (B, C, H, W) and the basis (k, n)");
  const int64_t B = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  check(rh > 0 && rw > 0, "nullspace_project: patch sizes must be >= 1");
  check(H % rh == 0 && W % rw == 0, "nullspace_project: image size is not a multiple of the patch");
  const int64_t n = C * rh * rw, gh = H / rh, gw = W / rw, P = B * gh * gw;
  check(q_in.size(1) == n, "nullspace_project: basis width != C * rh * rw");
  // fp16 / bf16 images are projected in fp32 (as every other backend accumulates) and cast back
  auto dtype = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto x = x_in.to(dtype).contiguous();
  auto q = q_in.to(dtype).contiguous();
  auto patches = at::empty({P, n}, x.options());
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nullspace_project_cpu", [&] {
    const scalar_t* xs = x.data_ptr<scalar_t>();
    scalar_t* ps = patches.data_ptr<scalar_t>();
    // gather: patch p, element j = (c, dy, dx) -> image offset (the conv weight's layout)
    at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / (gh * gw), gy = (p / gw) % gh, gx = p % gw;
        const scalar_t* src = xs + b * C * H * W + gy * rh * W + gx * rw;
        scalar_t* dst = ps + p * n;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t dy = 0; dy < rh; ++dy)
            for (int64_t dx = 0; dx < rw; ++dx) *dst++ = src[c * H * W + dy * W + dx];
      }
    });
    auto proj = at::mm(at::mm(patches, q.t()), q);  // BLAS; an empty basis (k = 0) gives zeros
    const scalar_t* pr = proj.data_ptr<scalar_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    // scatter back, subtracting for the complement
    at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = p / (gh * gw), gy = (p / gw) % gh, gx = p % gw;
        const int64_t base = b * C * H * W + gy * rh * W + gx * rw;
        const scalar_t* a = pr + p * n;
        const scalar_t* orig = ps + p * n;
        int64_t j = 0;
        for (int64_t c = 0; c < C; ++c)
          for (int64_t dy = 0; dy < rh; ++dy)
            for (int64_t dx = 0; dx < rw; ++dx, ++j)
              os[base + c * H * W + dy * W + dx] = keep ? a[j] : orig[j] - a[j];
      }
    });
  });
  return out.to(x_in.scalar_type());
}

// -- dispatch by device and bindings --
std::vector<at::Tensor> prob_shift(const at::Tensor& zn, const at::Tensor& zc, const c10::optional<at::Tensor>& pc,
                                   double eps) {
  at::Tensor p = pc.has_value() ? *pc : at::Tensor();
  if (zn.is_cuda()) {
#ifdef WITH_CUDA
    return prob_shift_cuda(zn, zc, p, eps);
#else
    TORCH_CHECK(false, "nsvit_fast._C was built without CUDA");
#endif
  }
  return prob_shift_cpu(zn, zc, p, eps);
}

at::Tensor nullspace_project(const at::Tensor& x, const at::Tensor& q, int64_t rh, int64_t rw, bool keep) {
  if (x.is_cuda()) {
#ifdef WITH_CUDA
    return nullspace_project_cuda(x, q, rh, rw, keep);
#else
    TORCH_CHECK(false, "nsvit_fast._C was built without CUDA");
#endif
  }
  return nullspace_project_cpu(x, q, rh, rw, keep);
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nsvit-fast compiled ops (CPU: ATen parallel_for / OpenMP; CUDA when built with it)";
  m.def("prob_shift", &prob_shift, "probability-shift loss: (loss, mse, stop, grad)", py::arg("z_noisy"),
        py::arg("z_clean"), py::arg("p_clean") = py::none(), py::arg("eps"));
  m.def("nullspace_project", &nullspace_project, "batched patch projection", py::arg("x"), py::arg("basis"),
        py::arg("rh"), py::arg("rw"), py::arg("keep"));
  m.def("has_cuda", &has_cuda);
  m.def("num_threads", []() { return at::get_num_threads(); });
}
