"""Ops: every backend against the torch reference that defines the op (Triton under the
interpreter on the CPU, the compiled C++ extension), gradcheck of the references in float64, the
dispatch, and synthesis through forced backends."""

import os

import pytest
import torch

from nsvit_fast import NsvitError, digits, load_model, ops
from nsvit_fast.ops._backends import ext, triton_ok
from nsvit_fast.ops.nullspace_projection import nullspace_project_torch
from nsvit_fast.ops.prob_shift import prob_shift_torch
from nsvit_fast.ops.token_assembly import token_assembly_torch

# each backend is tested on the device it runs on: the C++ ops on the CPU, Triton on CUDA where
# there is a GPU (else the CPU under the interpreter, see conftest.py), the CUDA ops on CUDA
CUDA = torch.cuda.is_available()
DEVICE = {"torch": torch.device("cuda" if CUDA else "cpu"), "cpp": torch.device("cpu"),
          "cuda": torch.device("cuda"), "triton": torch.device("cuda" if CUDA else "cpu")}
# CI sets NSVIT_REQUIRE_EXT=1 and NSVIT_REQUIRE_TRITON=1 (make test): a missing build or a missing
# triton fails there instead of skipping
needs_triton = pytest.mark.skipif(not triton_ok(DEVICE["triton"]) and os.environ.get("NSVIT_REQUIRE_TRITON") != "1",
                                  reason="triton unavailable (no CUDA, no interpreter)")
needs_ext = pytest.mark.skipif(ext() is None and os.environ.get("NSVIT_REQUIRE_EXT") != "1",
                               reason="compiled extension not built (make ext)")
needs_cuda_ext = pytest.mark.skipif(not CUDA or ext() is None or not ext().has_cuda(),
                                    reason="no CUDA device or extension built without CUDA (make ext-cuda)")
LOW = [torch.float16, torch.bfloat16]


def available_backends(op):
    """(backend, device) for every backend of ``op`` that runs here, each on its own device."""
    o = ops.dispatch.OPS[op]
    return [(b, DEVICE[b]) for b in o.impls if o.available[b](DEVICE[b])]


def tol(op, dtype=torch.float32):
    return ops.TOLERANCES[op][dtype]


def orthonormal(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0].T.contiguous()


# -- prob_shift --
PS_SHAPES = [(1, 4, 10), (3, 7, 37), (2, 5, 1500), (4, 1, 3)]


def _ps_check(backend, shape, dtype=torch.float32, with_pc=False):
    """``backend`` against the torch reference, in fp32 on the same inputs for fp16 / bf16 (the
    tolerance table's low-precision rows bound the backend's error, not the reference's)."""
    dev = DEVICE[backend]
    m, b, k = shape
    g = torch.Generator().manual_seed(sum(shape))
    zn = (3 * torch.randn(m, b, k, generator=g)).to(dev, dtype).requires_grad_(True)
    zc = (3 * torch.randn(b, k, generator=g)).to(dev, dtype)
    ref_dtype = torch.float32 if dtype in LOW else dtype
    zr = zn.detach().to(ref_dtype).requires_grad_(True)
    pc = zc.to(ref_dtype).softmax(-1) if with_pc else None
    got = ops.prob_shift(zn, zc, 0.05, None if pc is None else pc.to(dtype), backend=backend)
    ref = prob_shift_torch(zr, zc.to(ref_dtype), 0.05, pc)
    for a, r in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a.float(), r.float(), **tol("prob_shift", dtype))
    assert torch.equal(got[2].cpu(), ref[2].cpu())
    w = torch.arange(1.0, m + 1, device=dev)
    ga, = torch.autograd.grad((got[0] * w).sum(), zn)
    gr, = torch.autograd.grad((ref[0] * w).sum(), zr)
    assert ga.dtype == dtype
    torch.testing.assert_close(ga.float(), gr.float(), **tol("prob_shift", dtype))


@needs_triton
@pytest.mark.parametrize("shape", PS_SHAPES)
def test_prob_shift_triton(shape):
    _ps_check("triton", shape, with_pc=shape[2] == 37)


@needs_triton
@pytest.mark.parametrize("dtype", LOW)
def test_prob_shift_triton_low_precision(dtype):
    _ps_check("triton", (3, 7, 37), dtype, with_pc=True)
    _ps_check("triton", (2, 5, 1500), dtype)


@needs_ext
@pytest.mark.parametrize("shape", PS_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
def test_prob_shift_cpp(shape, dtype):
    _ps_check("cpp", shape, dtype, with_pc=shape[2] == 37)


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_prob_shift_cuda(dtype):
    for shape in PS_SHAPES:
        _ps_check("cuda", shape, dtype, with_pc=shape[2] == 37)


@needs_triton
def test_prob_shift_triton_float64_keeps_its_precision():
    """The kernel accumulates in fp32: fp64 logits go to the torch reference (fp64 tolerance)."""
    _ps_check("triton", (3, 7, 37), torch.float64, with_pc=True)
    _ps_check("triton", (2, 5, 1500), torch.float64)


def test_prob_shift_p_clean_on_another_device_is_refused():
    zn, zc = torch.randn(1, 2, 3), torch.randn(2, 3)
    with pytest.raises(NsvitError, match="prob_shift: p_clean on meta, z_noisy on cpu"):
        ops.prob_shift(zn, zc, 0.1, torch.empty(2, 3, device="meta"))


def test_prob_shift_gradcheck_and_zero_distance():
    zn = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    zc = torch.randn(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: prob_shift_torch(z, zc, 0.1)[0], (zn,))
    # at a zero distance the gradient is 0, not NaN (the official sqrt would give NaN)
    same = zc.expand(1, 3, 5).clone().requires_grad_(True)
    g, = torch.autograd.grad(prob_shift_torch(same, zc, 0.1)[0].sum(), same)
    assert torch.equal(g, torch.zeros_like(g))


def test_prob_shift_no_noises_every_backend():
    for backend, dev in available_backends("prob_shift"):
        loss, mse, stop = ops.prob_shift(torch.randn(0, 4, 10, device=dev), torch.randn(4, 10, device=dev), 0.1,
                                         backend=backend)
        assert loss.shape == mse.shape == stop.shape == (0,), backend


# -- nullspace projection --
PR_CASES = [(2, 3, 32, 32, 8, 96), (3, 3, 24, 40, 8, 17), (1, 1, 12, 12, 4, 5), (2, 3, 64, 64, 32, 100)]


def _pr_check(backend, case, dtype=torch.float32):
    dev = DEVICE[backend]
    b, c, h, w, r, k = case
    q = orthonormal(c * r * r, k, seed=k).to(dev, torch.float32 if dtype != torch.float64 else dtype)
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(k)).to(dev, dtype).requires_grad_(True)
    ref_dtype = torch.float32 if dtype in LOW else dtype
    xr = x.detach().to(ref_dtype).requires_grad_(True)
    for keep in (True, False):
        got = ops.nullspace_project(x, q, (r, r), keep, backend=backend)
        ref = nullspace_project_torch(xr, q, (r, r), keep)
        assert got.dtype == dtype
        torch.testing.assert_close(got.to(ref_dtype), ref, **tol("nullspace_project", dtype))
        gout = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(dev)
        ga, = torch.autograd.grad((got * gout.to(dtype)).sum(), x)
        gr, = torch.autograd.grad((ref * gout.to(dtype).to(ref_dtype)).sum(), xr)
        torch.testing.assert_close(ga.to(ref_dtype), gr, **tol("nullspace_project", dtype))


@needs_triton
@pytest.mark.parametrize("case", PR_CASES)
def test_nullspace_project_triton(case):
    _pr_check("triton", case)


@needs_triton
@pytest.mark.parametrize("dtype", LOW)
def test_nullspace_project_triton_low_precision(dtype):
    for case in PR_CASES[:3]:
        _pr_check("triton", case, dtype)


@needs_triton
def test_nullspace_project_triton_many_basis_chunks_bf16():
    """Patches of n = 768 values (ViT-B/16) against k = 384 (the most PatchNullspace passes, n / 2)
    and k = 700 basis vectors: 6 and 11 chunks of BLOCK_K = 64. The partial sums stay fp32 between
    chunks, so the result is the reference rounded once to bf16 (plus TF32's error on a GPU);
    rounded after every chunk it was 5-27 roundings off and broke the tolerance at k = 700."""
    dev = DEVICE["triton"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(dev, torch.bfloat16)
    q = orthonormal(768, 384, seed=1).float().to(dev)
    for keep in (True, False):
        got = ops.nullspace_project(x, q, (16, 16), keep, backend="triton").float()
        ref = nullspace_project_torch(x.float(), q, (16, 16), keep)
        assert bool(((got - ref).abs() <= 2**-7 * ref.abs() + 5e-3).all()), keep
    _pr_check("triton", (2, 3, 32, 32, 16, 700), torch.bfloat16)


@needs_ext
@pytest.mark.parametrize("case", PR_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW])
def test_nullspace_project_cpp(case, dtype):
    _pr_check("cpp", case, dtype)


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_nullspace_project_cuda(dtype):
    for case in PR_CASES:
        _pr_check("cuda", case, dtype)


def test_nullspace_project_empty_basis_and_empty_batch_every_backend():
    """k = 0 (nothing to project on): keep gives zeros, the complement gives the images back, and
    so do their gradients; an empty batch gives an empty result. Every backend available here."""
    for backend, dev in available_backends("nullspace_project"):
        x = torch.randn(2, 3, 16, 16, device=dev, requires_grad=True)
        empty = torch.zeros(0, 3 * 8 * 8, device=dev)
        for keep in (True, False):
            got = ops.nullspace_project(x, empty, (8, 8), keep, backend=backend)
            want = torch.zeros_like(x) if keep else x
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{backend} keep={keep}")
            gx, = torch.autograd.grad((got * x.detach()).sum(), x)
            torch.testing.assert_close(gx, want.detach(), rtol=0, atol=0, msg=f"{backend} keep={keep} grad")
        out = ops.nullspace_project(torch.randn(0, 3, 16, 16, device=dev), orthonormal(192, 4).float().to(dev),
                                    (8, 8), False, backend=backend)
        assert out.shape == (0, 3, 16, 16), backend


def _tf32(a):
    """Round fp32 to TF32 as the tensor cores' cvt.rna does (10 mantissa bits, ties away)."""
    bits = a.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _emulated_dot(a, b, precision):
    a, b = a.float(), b.float()
    if precision == "ieee":
        return (a.double() @ b.double()).float()
    ah, bh = _tf32(a), _tf32(b)
    out = ah.double() @ bh.double()
    if precision == "tf32x3":  # hi*hi + hi*lo + lo*hi, the lo parts rounded to TF32 again
        out = out + ah.double() @ _tf32(b - bh).double() + _tf32(a - ah).double() @ bh.double()
    return out.float()


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_nullspace_kernel_dot_precision_fits_tolerance(dtype):
    """On sm_80 / sm_90 the kernel's two tl.dot products run at DOT_PRECISION[dtype]; emulate that
    precision on the test cases and hold it to the tolerance table (plain TF32 breaks fp32's)."""
    if os.environ.get("NSVIT_REQUIRE_TRITON") != "1":
        pytest.importorskip("triton")
    from nsvit_fast.kernels.nullspace_projection import DOT_PRECISION
    from nsvit_fast.ops import patchify

    def worst(precision):
        excess = []
        for b, c, h, w, r, k in PR_CASES:
            q = orthonormal(c * r * r, k, seed=k)
            p = patchify(torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(k)).to(dtype).double(), (r, r))
            coef = _emulated_dot(p, q.float().T, precision)
            part = _emulated_dot(coef, q.float(), precision)
            for keep in (True, False):
                out = (part if keep else p.float() - part).to(dtype).double()
                ref = (p @ q.T) @ q if keep else p - (p @ q.T) @ q
                excess.append(((out - ref).abs() - tol("nullspace_project", dtype)["rtol"] * ref.abs()).max().item())
        return max(excess)

    assert worst(DOT_PRECISION[dtype]) <= tol("nullspace_project", dtype)["atol"]
    if dtype == torch.float32:  # the emulation sees the problem "ieee" / "tf32x3" avoid
        assert worst("tf32") > 10 * tol("nullspace_project", dtype)["atol"]


def test_nullspace_project_reference_works_with_forward_mode_and_torch_func():
    # an autograd.Function without setup_context / jvp broke torch.func and forward-mode AD that the
    # plain torch ops had served
    from torch.func import grad, vmap

    q = orthonormal(48, 10, seed=3)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    f = lambda t: nullspace_project_torch(t, q, (4, 4), False)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(f, (x,))
    g = grad(lambda t: f(t).pow(2).sum())(x.detach())
    torch.testing.assert_close(g, 2 * f(x.detach()))  # the complement projection is idempotent and self-adjoint
    torch.testing.assert_close(vmap(f)(x.detach()[None])[0], f(x.detach()))


def test_nullspace_project_gradcheck_and_noncontiguous():
    q = orthonormal(12, 5)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: nullspace_project_torch(t, q, (2, 2), False), (x,))
    xt = torch.randn(1, 3, 4, 4).transpose(2, 3)  # non-contiguous input: made contiguous by each backend
    for backend, dev in available_backends("nullspace_project"):
        xd = xt.to(dev).transpose(2, 3).contiguous().transpose(2, 3)
        torch.testing.assert_close(ops.nullspace_project(xd, q.float().to(dev), (2, 2), True, backend=backend),
                                   nullspace_project_torch(xd, q.float().to(dev), (2, 2), True), rtol=1e-4, atol=1e-5)


# -- token assembly --
TA_CASES = [(2, 5, 24, 3, 1, True, False), (3, 4, 20, 1, 2, False, True), (2, 3, 16, 0, 0, True, True),
            (1, 6, 37, 2, 5, True, True)]


def _ta_inputs(case, dtype=torch.float32, dev=None, frozen=False):
    b, n, d, m, p, emb, clean = case
    g = torch.Generator().manual_seed(d)
    dev = dev or DEVICE["triton"]
    mk = lambda *s, grad=True: torch.randn(*s, generator=g).to(dev, dtype).requires_grad_(grad)  # noqa: E731
    ins = (mk(b, n, d), mk(m, n, d) if m else None, mk(p, d, grad=not frozen),
           mk(p + n if emb else n, d, grad=not frozen), mk(d, grad=not frozen), mk(d, grad=not frozen))
    return ins, emb, clean


def _ta_check(case, dtype=torch.float32, frozen=False, eps=1e-6, zero=False):
    ins, emb, clean = _ta_inputs(case, dtype, frozen=frozen)
    if zero:  # u, v, prefix and pos all zero: every row's variance is 0, and only eps keeps LayerNorm finite
        with torch.no_grad():
            for t in ins[:4]:
                if t is not None:
                    t.zero_()
    ref_dtype = torch.float32 if dtype in LOW else dtype
    rins = tuple(None if t is None else t.detach().to(ref_dtype).requires_grad_(t.requires_grad) for t in ins)
    got = ops.token_assembly(*ins, eps, emb, clean, backend="triton")
    ref = token_assembly_torch(*rins, eps, emb, clean)
    for a, r in zip(got, ref):
        assert a.dtype == dtype and bool(torch.isfinite(a).all())
        torch.testing.assert_close(a.to(ref_dtype), r, **tol("token_assembly", dtype))
    g = torch.Generator().manual_seed(1)  # not the global RNG: other tests' draws changed these
    gx, gl = (torch.randn(t.shape, generator=g).to(t) for t in ref)
    live = [i for i, t in enumerate(ins) if t is not None and t.numel() and t.requires_grad]
    ga = torch.autograd.grad((got[0] * gx.to(dtype)).sum() + (got[1] * gl.to(dtype)).sum(), [ins[i] for i in live])
    gr = torch.autograd.grad((ref[0] * gx).sum() + (ref[1] * gl).sum(), [rins[i] for i in live])
    for a, r in zip(ga, gr):
        # fp32: the LayerNorm backward's sums over D round differently in the kernel, an error
        # relative to the gradient's scale, not to each element (a 0.19 entry was 5.5e-5 off)
        grad_tol = dict(rtol=1e-4, atol=1e-5 * max(1.0, float(r.abs().max()))) if dtype == torch.float32 \
            else tol("token_assembly", dtype)
        torch.testing.assert_close(a.to(ref_dtype), r, **grad_tol)


@needs_triton
@pytest.mark.parametrize("case", TA_CASES)
def test_token_assembly_triton(case):
    _ta_check(case)


@needs_triton
def test_token_assembly_triton_takes_the_layernorm_eps():
    # rows of unit variance hid a dropped eps under the 1e-5 tolerance: a large eps, and rows of none
    _ta_check(TA_CASES[0], eps=0.1)
    _ta_check(TA_CASES[3], zero=True)


@needs_triton
@pytest.mark.parametrize("dtype", LOW)
def test_token_assembly_triton_low_precision(dtype):
    _ta_check(TA_CASES[0], dtype)
    _ta_check(TA_CASES[3], dtype)


@needs_triton
def test_token_assembly_frozen_layernorm_skips_weight_gradients():
    """With a frozen LayerNorm (synthesis) the backward writes no weight / bias partials and
    allocates none (R T D fp32 each), and the gradients it does compute are still right."""
    _ta_check(TA_CASES[3], frozen=True)
    from nsvit_fast.kernels import record_launches
    from nsvit_fast.kernels.token_assembly import token_assembly

    def bwd_rows(frozen):
        ins, _, _ = _ta_inputs(TA_CASES[3], dev=torch.device("meta"), frozen=frozen)
        with record_launches() as rec:
            x, ln = token_assembly(*ins, 1e-6, True, True)
            torch.autograd.backward([x, ln], [torch.empty_like(x), torch.empty_like(ln)])
        (launch,) = [r for r in rec if r.name == "_assemble_bwd_rows"]
        g, dw, db = launch.args[6:9]
        return launch.constexprs["WANT_WB"], dw is g and db is g

    assert bwd_rows(frozen=True) == (False, True)
    assert bwd_rows(frozen=False) == (True, False)


@needs_triton
def test_token_assembly_triton_autocast_dtypes():
    """Under autocast the patch tokens u and the noises v are fp16 / bf16 while prefix, pos and
    the LayerNorm are fp32: x and ln come out fp32 as the reference's (promoted, timm's residual
    stream), within the fp32 tolerance, since the kernel rounds u + v to their dtype as the
    reference adds them (its fp32 sum was 2.7e-2 off for bf16), and each gradient in its own
    input's dtype. The interpreter truncates fp32 to bf16 where a GPU rounds to nearest even, so
    there bf16 is held to its own tolerance (fp16, which numpy rounds, to fp32's)."""
    for amp in (torch.float16, torch.bfloat16):
        x_tol = tol("token_assembly", amp if amp == torch.bfloat16 and not CUDA else torch.float32)
        for case in (TA_CASES[0], TA_CASES[3]):
            ins, emb, clean = _ta_inputs(case)
            ins = tuple(None if t is None else t.detach().to(amp if i < 2 else torch.float32)
                        .requires_grad_(True) for i, t in enumerate(ins))
            got = ops.token_assembly(*ins, 1e-6, emb, clean, backend="triton")
            ref = token_assembly_torch(*ins, 1e-6, emb, clean)
            for a, r in zip(got, ref):
                assert a.dtype == r.dtype == torch.float32
                torch.testing.assert_close(a, r, **x_tol)
            live = [t for t in ins if t is not None and t.numel()]
            gx, gl = torch.randn_like(ref[0]), torch.randn_like(ref[1])
            ga = torch.autograd.grad((got[0] * gx).sum() + (got[1] * gl).sum(), live)
            gr = torch.autograd.grad((ref[0] * gx).sum() + (ref[1] * gl).sum(), live)
            for t, a, r in zip(live, ga, gr):
                assert a.dtype == t.dtype
                torch.testing.assert_close(a.float(), r.float(), **tol("token_assembly", amp))


@needs_triton
def test_token_assembly_triton_rounds_u_plus_v_only_to_their_shared_low_dtype():
    """fp16 u with fp32 v: the reference adds them in fp32, so the kernel must not round to fp16.
    bf16 u = 1 and v = 2**-9: 1 in bf16 (truncated or rounded to nearest), 1.00195 in fp16, so a
    kernel rounding to the wrong dtype differs from the reference even under the interpreter."""
    g = torch.Generator().manual_seed(0)
    b, n, d, m = 2, 3, 16, 2
    u = torch.randn(b, n, d, generator=g).half()
    v = torch.randn(m, n, d, generator=g) * 1e-3
    pre, pos = torch.randn(1, d, generator=g), torch.randn(1 + n, d, generator=g)
    w, bias = torch.ones(d), torch.zeros(d)
    got = ops.token_assembly(u, v, pre, pos, w, bias, 1e-6, True, True, backend="triton")
    ref = token_assembly_torch(u, v, pre, pos, w, bias, 1e-6, True, True)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, **tol("token_assembly", torch.float32))
    u = torch.ones(1, n, d, dtype=torch.bfloat16)
    v = torch.full((1, n, d), 2.0 ** -9, dtype=torch.bfloat16)
    pre, pos = torch.zeros(0, d), torch.zeros(n, d)
    x = ops.token_assembly(u, v, pre, pos, w, bias, 1e-6, True, False, backend="triton")[0]
    assert torch.equal(x, token_assembly_torch(u, v, pre, pos, w, bias, 1e-6, True, False)[0])


@needs_triton
def test_token_assembly_triton_layernorm_of_the_rounded_x():
    """bf16 x = u + v + pos is stored rounded; ln and its backward are the LayerNorm of that
    rounded x (tokens far from zero: bf16 rounds x by up to 0.5 against a spread of 1). x rounds
    twice, as the reference's bf16 adds do (u + v, then + pos). The interpreter rounds fp32 to
    bf16 toward zero, a GPU to nearest: x is held to a bf16 step per rounding (one on a GPU)."""
    b, n, d, m = 2, 3, 32, 2
    g = torch.Generator().manual_seed(0)
    u = (96 + torch.randn(b, n, d, generator=g)).bfloat16().requires_grad_(True)
    v = torch.randn(m, n, d, generator=g).bfloat16().requires_grad_(True)
    pos = torch.randn(n, d, generator=g).bfloat16().requires_grad_(True)
    w, bias = (1 + torch.randn(d, generator=g)).bfloat16(), torch.randn(d, generator=g).bfloat16()
    pre = torch.zeros(0, d, dtype=torch.bfloat16)
    x, ln = ops.token_assembly(u, v, pre, pos, w, bias, 1e-6, True, False, backend="triton")
    # the reference: x summed in fp32, rounded as the kernel stored it (straight through), LayerNorm in fp32
    uf, vf, pf = (t.detach().float().requires_grad_(True) for t in (u, v, pos))
    xf = (uf[None] + vf[:, None]).reshape(-1, n, d) + pf
    ref = token_assembly_torch(u.detach(), v.detach(), pre, pos.detach(), w, bias, 1e-6, True, False)[0].float()
    assert bool(((x.float() - ref).abs() <= (0.5 if CUDA else 1.0)).all())  # bf16 steps at 64..128
    xr = xf + (x.float() - xf).detach()
    lr = torch.nn.functional.layer_norm(xr, (d,), w.float(), bias.float(), 1e-6)
    torch.testing.assert_close(ln.float(), lr, **tol("token_assembly", torch.bfloat16))
    gl = torch.randn(lr.shape, generator=g)
    ga = torch.autograd.grad((ln.float() * gl).sum(), (u, v, pos))
    gr = torch.autograd.grad((lr * gl).sum(), (uf, vf, pf))
    for a, r in zip(ga, gr):
        torch.testing.assert_close(a.float(), r, **tol("token_assembly", torch.bfloat16))


@needs_triton
def test_token_assembly_triton_layernorm_without_affine():
    """A LayerNorm without weight or bias (None): ones and zeros, no gradient for them."""
    ins, emb, clean = _ta_inputs(TA_CASES[3])
    for w, b in ((None, None), (ins[4], None), (None, ins[5])):
        args = (*ins[:4], w, b, 1e-6, emb, clean)
        got = ops.token_assembly(*args, backend="triton")
        ref = token_assembly_torch(*args)
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r, **tol("token_assembly"))
        ga = torch.autograd.grad(got[1].pow(2).sum(), ins[0])
        gr = torch.autograd.grad(ref[1].pow(2).sum(), ins[0])
        torch.testing.assert_close(ga, gr, rtol=1e-4, atol=1e-5)


def test_adapter_does_not_fuse_a_layernorm_without_affine():
    parts = load_model("digits_vit")
    assert parts._fusable_first_block() is not None
    d = parts.embed_dim
    for norm in (torch.nn.LayerNorm(d, elementwise_affine=False), torch.nn.LayerNorm(d, bias=False)):
        parts.model.blocks[0].norm1 = norm
        assert parts._fusable_first_block() is None
        u = parts.patch_embed(digits("test").images[:2]).detach()
        v = torch.randn(2, *u.shape[1:])
        with torch.no_grad():
            torch.testing.assert_close(parts.encode_noisy(u, v, backend="torch"),
                                       parts.encode((u[None] + v[:, None]).reshape(-1, *u.shape[1:])))


def test_token_assembly_gradcheck():
    ins, emb, clean = _ta_inputs((2, 3, 6, 2, 1, True, True), torch.float64, dev=torch.device("cpu"))
    f = lambda u, v, pre, pos, w, b: sum(o.pow(2).sum() for o in token_assembly_torch(u, v, pre, pos, w, b, 1e-5, emb, clean))  # noqa: E731
    assert torch.autograd.gradcheck(f, ins)


def test_adapter_fused_path_equals_plain_encode():
    parts = load_model("digits_vit")
    u = parts.patch_embed(digits("test").images[:4]).detach()
    v = torch.randn(3, *u.shape[1:])
    with torch.no_grad():
        fused = parts.encode_noisy(u, v, include_clean=True)
        plain = parts.encode(torch.cat([u, (u[None] + v[:, None]).reshape(-1, *u.shape[1:])]))
    assert torch.equal(fused, plain)  # torch backend: timm's own arithmetic


# -- dispatch --
def test_dispatch_forcing_and_errors(monkeypatch):
    zn, zc = torch.randn(1, 2, 3), torch.randn(2, 3)
    # the C++ op is the CPU default when built (faster at every bench size), torch otherwise
    assert ops.backend_for("prob_shift", "cpu") == ("cpp" if ext() is not None else "torch")
    assert ops.backend_for("token_assembly", "cpu") == "torch"   # never the interpreter by default
    monkeypatch.setenv("NSVIT_BACKEND", "torch")
    assert ops.backend_for("nullspace_project", "cpu") == "torch"
    monkeypatch.setenv("NSVIT_BACKEND", "prob_shift=torch,nullspace_project=torch")
    assert ops.backend_for("prob_shift", "cpu") == "torch"
    monkeypatch.delenv("NSVIT_BACKEND")
    with pytest.raises(NsvitError, match="op prob_shift: backend 'cuda' is not available on cpu"):
        ops.prob_shift(zn, zc, 0.1, backend="cuda")
    with pytest.raises(NsvitError, match="op prob_shift: no backend 'fortran'"):
        ops.prob_shift(zn, zc, 0.1, backend="fortran")
    with pytest.raises(NsvitError, match="unknown op"):
        ops.call("matmul", zn)
    with pytest.raises(NsvitError, match=r"prob_shift: z_noisy must be \(M, B, K\)"):
        ops.prob_shift(torch.randn(2, 3), zc, 0.1)
    with pytest.raises(NsvitError, match="prob_shift: logits must be floating point"):
        ops.prob_shift(zn.long(), zc.long(), 0.1)
    with pytest.raises(NsvitError, match="nullspace_project: the basis has width"):
        ops.nullspace_project(torch.randn(1, 3, 8, 8), torch.randn(2, 10), (4, 4), True)
    with pytest.raises(NsvitError, match="not a multiple of the patch"):
        ops.nullspace_project(torch.randn(1, 3, 9, 8), torch.randn(2, 48), (4, 4), True)


def test_dispatch_global_backend_applies_where_the_op_has_it(monkeypatch):
    """NSVIT_BACKEND=<backend> (no op=) forces it on the ops that have it; the others keep their
    preference order. A per-op op=backend naming a missing backend still raises."""
    monkeypatch.setenv("NSVIT_BACKEND", "cuda")  # token_assembly has no CUDA (extension) backend
    assert ops.backend_for("token_assembly", "cpu") == "torch"
    with pytest.raises(NsvitError, match="backend 'cuda' is not available on cpu"):
        ops.backend_for("prob_shift", "cpu")
    monkeypatch.setenv("NSVIT_BACKEND", "cpp")  # nor a C++ one
    assert ops.backend_for("token_assembly", "cpu") == "torch"
    u = torch.randn(1, 2, 4)
    x, ln = ops.token_assembly(u, None, torch.zeros(0, 4), torch.zeros(2, 4), torch.ones(4), torch.zeros(4), 1e-6,
                               True, True)
    assert torch.equal(x, u)
    if ext() is not None:
        assert ops.backend_for("prob_shift", "cpu") == "cpp"
    monkeypatch.setenv("NSVIT_BACKEND", "token_assembly=cpp")
    with pytest.raises(NsvitError, match="op token_assembly: no backend 'cpp'"):
        ops.backend_for("token_assembly", "cpu")
    monkeypatch.setenv("NSVIT_BACKEND", "tritn")  # a typo is refused, not ignored
    with pytest.raises(NsvitError, match="NSVIT_BACKEND='tritn': no op has that backend"):
        ops.backend_for("token_assembly", "cpu")


def test_launch_runs_under_the_tensors_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device: launch() makes it the tensors' device (a
    process working on cuda:1 would otherwise launch on cuda:0 with cuda:1 pointers)."""
    import contextlib

    import nsvit_fast.kernels as K

    seen = []

    @contextlib.contextmanager
    def device(d):
        seen.append(("enter", torch.device(d)))
        yield
        seen.append(("exit", torch.device(d)))

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append(("run", grid))

    class CudaTensor(torch.Tensor):  # a CPU tensor that reports cuda:1 (no GPU here)
        @property
        def device(self):
            return torch.device("cuda", 1)

        @property
        def is_cuda(self):
            return True

    monkeypatch.setattr(torch.cuda, "device", device)
    K.launch(Kernel(), (2,), torch.zeros(1).as_subclass(CudaTensor), 3, BLOCK=4)
    assert seen == [("enter", torch.device("cuda", 1)), ("run", (2,)), ("exit", torch.device("cuda", 1))]
    seen.clear()
    K.launch(Kernel(), (2,), torch.zeros(1), 3)  # CPU (interpreter): no device switch
    assert seen == [("run", (2,))]


# -- double backward --
def test_nullspace_project_double_backward_every_backend():
    """The projection is linear: its backward goes through the op again, so a second derivative
    (through the incoming gradient, here 2 y) equals the torch reference's (it was 0: the kernel's
    gradient was a constant to autograd)."""
    q = orthonormal(12, 5).float()
    x0, w = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)

    def second(fn, dev):
        x = x0.to(dev).requires_grad_(True)
        g, = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
        h, = torch.autograd.grad((g * w.to(dev)).sum(), x)
        return h

    for backend, dev in available_backends("nullspace_project"):
        ref = second(lambda x: nullspace_project_torch(x, q.to(dev), (2, 2), False), dev)
        got = second(lambda x: ops.nullspace_project(x, q.to(dev), (2, 2), False, backend=backend), dev)
        assert ref.abs().max() > 0.1
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=backend)


def _double_backward_cases():
    """(name, backend, device, fn(leaf) -> scalar) for the ops whose kernel backward is not
    differentiable (the gradient depends on the input through what forward saved)."""
    cases = []
    zc = torch.randn(3, 7)
    for backend, dev in available_backends("prob_shift"):
        if backend != "torch":
            cases.append(("prob_shift", backend, dev, torch.randn(2, 3, 7),
                          lambda z, b=backend: ops.prob_shift(z, zc.to(z.device), 0.05, backend=b)[0]))
    if triton_ok(DEVICE["triton"]):
        ins, emb, clean = _ta_inputs((2, 3, 8, 2, 1, True, True))
        rest = [t.detach() for t in ins[1:]]
        cases.append(("token_assembly", "triton", DEVICE["triton"], ins[0].detach().cpu(),
                      lambda u: ops.token_assembly(u, *rest, 1e-6, emb, clean, backend="triton")[1]))
        # timm's patch tokens are a transposed view (flatten(2).transpose(1, 2)): not contiguous
        cases.append(("token_assembly, transposed u", "triton", DEVICE["triton"],
                      ins[0].detach().cpu().transpose(1, 2).contiguous(),
                      lambda b: ops.token_assembly(b.transpose(1, 2), *rest, 1e-6, emb, clean, backend="triton")[1]))
    return cases


def test_double_backward_is_refused_where_the_backward_is_a_kernel():
    """prob_shift's and token_assembly's kernel backwards are once differentiable: a second
    derivative raises, through torch.autograd.grad (which skips torch's own once_differentiable
    error node) and with a constant incoming gradient (grad of loss.sum(), where torch adds none).
    It used to come out silently wrong (the Hessian terms missing); first derivatives with
    create_graph=True are unchanged."""
    cases = _double_backward_cases()
    assert cases or ext() is None and not triton_ok(DEVICE["triton"])
    for name, backend, dev, x0, fn in cases:
        w = torch.randn(x0.shape).to(dev)
        for outer in (lambda y: y.sum(), lambda y: y.pow(2).sum()):  # constant / live incoming gradient
            x = x0.to(dev).requires_grad_(True)
            g, = torch.autograd.grad(outer(fn(x)), x, create_graph=True)
            plain, = torch.autograd.grad(outer(fn(x)), x)
            assert torch.equal(g.detach(), plain), (name, backend)
            with pytest.raises(RuntimeError, match="once_differentiable"):
                torch.autograd.grad((g * w).sum() + x.sum(), x)  # x.sum(): x is in the graph either way
            x = x0.to(dev).requires_grad_(True)
            g, = torch.autograd.grad(outer(fn(x)), x, create_graph=True)
            with pytest.raises(RuntimeError, match="once_differentiable"):
                (g * w).sum().backward()


# -- launch recording --
class _FakeKernel:
    """Stands for a @triton.jit function: launch() calls ``kernel[grid](*args)``."""

    def __init__(self, name):
        self.__name__, self.ran = name, []

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.ran.append(grid)


def test_record_launches_is_per_thread():
    """Two threads recording at once each see only their own launches; one thread leaving its
    block neither stops the other's recording nor leaves a recording behind (the recording was a
    module global: one thread saw both threads' launches and the other none, and restoring it
    left launches recorded, not run, after both blocks)."""
    import threading

    from nsvit_fast.kernels import launch, record_launches

    ka, kb, kc = _FakeKernel("ka"), _FakeKernel("kb"), _FakeKernel("kc")
    both = threading.Barrier(2, timeout=30)
    a_left = threading.Event()
    recs, errors = {}, []

    def a():
        try:
            with record_launches() as rec:
                both.wait()
                launch(ka, (1,))
                both.wait()
            recs["a"] = [r.name for r in rec]
            launch(ka, (2,))  # outside A's block, while B still records: runs
            a_left.set()
        except Exception as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)
            a_left.set()

    def b():
        try:
            with record_launches() as rec:
                both.wait()
                launch(kb, (1,))
                both.wait()
                assert a_left.wait(30)
                launch(kb, (3,))  # A has left its block: B still records
            recs["b"] = [r.name for r in rec]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert recs == {"a": ["ka"], "b": ["kb", "kb"]}
    assert ka.ran == [(2,)] and kb.ran == []
    launch(kc, (4,))  # after both blocks: launches run again
    assert kc.ran == [(4,)]


# -- the engines through the dispatch --
@pytest.mark.parametrize("forced", [
    pytest.param("prob_shift=cpp,nullspace_project=cpp", marks=needs_ext, id="cpp"),
    pytest.param("prob_shift=triton,token_assembly=triton", marks=needs_triton, id="triton"),
])
def test_synthesis_through_forced_backends_matches_torch(forced, monkeypatch):
    """Synthesis with the forced backends, on their device, against the torch backend there: two
    noises that both converge well inside the step budget (4 and 3 of 12 steps here), so the same
    stop steps are a real check; then the same noises and the same held-out MSE. (Small: the
    interpreter runs every Triton program in Python.)"""
    from nsvit_fast.synth import synthesize

    dev = DEVICE[forced.split("=")[1].split(",")[0]]
    parts = load_model("digits_vit")
    data = digits("train").subset(24)
    kw = dict(lim=1.5, lr=0.1, batch_size=8, max_steps=12, heldout=8, num_noises=2, progress=False, device=dev)
    runs = {}
    for name, env in (("torch", "torch"), ("forced", forced)):
        monkeypatch.setenv("NSVIT_BACKEND", env)
        runs[name] = synthesize(parts, data, **kw)
    ref, got = runs["torch"], runs["forced"]
    assert bool(ref.converged.all()) and bool(got.converged.all())
    assert 0 < int(ref.steps.min()) and int(ref.steps.max()) < kw["max_steps"]
    assert got.steps.tolist() == ref.steps.tolist()
    torch.testing.assert_close(got.noises, ref.noises, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.mse_prob, ref.mse_prob, rtol=1e-4, atol=1e-6)


# -- edge cases a review found (each failed before its fix) --
@needs_triton
def test_token_assembly_triton_float64_keeps_its_precision():
    # the kernel computes in fp32: float64 went through it, 3e-7 off and failing gradcheck
    dev = DEVICE["triton"]
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(2, 4, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    prefix, pos = torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    w, b = torch.rand(8, generator=g, dtype=torch.float64) + 0.5, torch.randn(8, generator=g, dtype=torch.float64)
    args = [t.to(dev) for t in (u, v, prefix, pos, w, b)]
    got = ops.token_assembly(*args[:4], args[4], args[5], 1e-6, True, False, backend="triton")
    want = token_assembly_torch(u, v, prefix, pos, w, b, 1e-6, True, False)
    for a, r in zip(got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a.cpu(), r, **tol("token_assembly", torch.float64))


@needs_ext
def test_prob_shift_cpp_float64_keeps_its_precision_and_nan_rows():
    g = torch.Generator().manual_seed(4)
    zn = torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    zc = torch.randn(3, 6, generator=g, dtype=torch.float64)
    loss, mse, _ = ops.prob_shift(zn, zc, 0.1, backend="cpp")
    ref = prob_shift_torch(zn, zc, 0.1)
    assert loss.dtype == mse.dtype == torch.float64  # were rounded to float32
    torch.testing.assert_close(loss, ref[0], **tol("prob_shift", torch.float64))
    assert torch.autograd.gradcheck(lambda z: ops.prob_shift(z, zc, 0.1, backend="cpp")[0], (zn,))
    # a NaN logit: the reference's gradient row is NaN throughout (the kernels' was NaN at one element)
    bad = torch.randn(1, 2, 4).requires_grad_(True)
    with torch.no_grad():
        bad[0, 0, 1] = float("nan")
    for backend, _ in available_backends("prob_shift"):
        z = bad.detach().to(DEVICE[backend]).requires_grad_(True)
        ops.prob_shift(z, torch.zeros(2, 4, device=z.device), 0.1, backend=backend)[0].sum().backward()
        assert bool(z.grad[0, 0].isnan().all()) and not bool(z.grad[0, 1].isnan().any()), backend


@needs_triton
def test_prob_shift_triton_a_block_of_minus_inf():
    # the online softmax gave exp(-inf - -inf) = NaN when a whole 1024-logit block was -inf
    g = torch.Generator().manual_seed(5)
    zn, zc = torch.randn(1, 1, 1500, generator=g), torch.randn(1, 1500, generator=g)
    zn[..., :1024], zc[..., :1024] = -float("inf"), -float("inf")
    dev = DEVICE["triton"]
    got = ops.prob_shift(zn.to(dev), zc.to(dev), 0.1, backend="triton")[1]
    assert torch.allclose(got.cpu(), prob_shift_torch(zn, zc, 0.1)[1], atol=1e-6), got


def test_nullspace_project_basis_is_a_constant_every_backend():
    # C++ and Triton kept the basis as a plain attribute: an in-place change before backward went
    # unseen, and a basis that required grad got one only from the torch reference
    basis = orthonormal(48, 6).float()
    for backend, dev in available_backends("nullspace_project"):
        x = torch.randn(2, 3, 8, 8, device=dev, requires_grad=True)
        q = basis.clone().to(dev).requires_grad_(True)
        ops.nullspace_project(x, q, (4, 4), True, backend=backend).sum().backward()
        assert q.grad is None and x.grad is not None, backend
        q = basis.clone().to(dev)
        y = ops.nullspace_project(x, q, (4, 4), True, backend=backend)
        q.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_nullspace_project_under_autocast_and_tf32_is_fp32_on_every_backend():
    """Called inside a bf16 / fp16 autocast block with TF32 allowed (a bf16 run's matmul mode), the
    projection of fp32 images stays fp32 and within the fp32 tolerance on every backend, gradient
    included: the C++ op failed ("expected scalar type Float but found BFloat16") and the torch
    reference returned bf16, 5.6e-3 off."""
    q = orthonormal(3 * 8 * 8, 40, seed=2).float()
    x0 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    g = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ref = nullspace_project_torch(x0, q, (8, 8), False)
    ref_grad = nullspace_project_torch(g, q, (8, 8), False)  # self-adjoint
    old = torch.get_float32_matmul_precision()
    try:
        for backend, dev in available_backends("nullspace_project"):
            for amp in (torch.bfloat16, torch.float16):
                x = x0.clone().to(dev).requires_grad_(True)
                torch.set_float32_matmul_precision("high")
                with torch.autocast(dev.type, dtype=amp):
                    got = ops.nullspace_project(x, q.to(dev), (8, 8), False, backend=backend)
                    got.backward(g.to(dev))
                assert got.dtype == torch.float32, (backend, amp)
                torch.testing.assert_close(got.cpu(), ref, **tol("nullspace_project", torch.float32))
                torch.testing.assert_close(x.grad.cpu(), ref_grad, **tol("nullspace_project", torch.float32),
                                           msg=lambda m: f"{backend} {amp}: {m}")
                assert torch.get_float32_matmul_precision() == "high"  # put back
    finally:
        torch.set_float32_matmul_precision(old)


def test_every_registered_op_is_complete():
    """What a new op must bring (README "Adding an op"): a torch reference with a tolerance for
    each dtype, a public function in nsvit_fast.ops, sizes in bench/bench_ops.py, the AOT compile's
    shapes if it has a Triton kernel, and tests here that call it."""
    import ast
    from pathlib import Path

    from nsvit_fast.kernels.aot import SHAPES
    from nsvit_fast.ops import dispatch

    root = Path(__file__).resolve().parents[1]
    tree = ast.parse((root / "bench" / "bench_ops.py").read_text())
    sizes = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "SIZES")
    here = Path(__file__).read_text()
    for name, op in dispatch.OPS.items():
        assert "torch" in op.impls, name
        assert set(op.tolerance or {}) == {torch.float32, torch.float64, torch.float16, torch.bfloat16}, name
        assert ops.TOLERANCES[name] is op.tolerance and name in ops.__all__ and callable(getattr(ops, name)), name
        assert name in sizes, f"{name}: no sizes in bench/bench_ops.py"
        if "triton" in op.impls:
            assert all(name in s for s in SHAPES.values()), f"{name}: no shapes in kernels/aot.py"
        assert here.count(f"ops.{name}(") >= 2, f"{name}: no tests in tests/test_ops.py"


def test_ops_refuse_inputs_no_backend_agrees_on(monkeypatch):
    basis = orthonormal(48, 6).float()
    with pytest.raises(NsvitError, match="images and basis must be float tensors, got uint8"):
        ops.nullspace_project(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), basis, (4, 4), True)
    for patch in ((0, 0), (4,)):  # ZeroDivisionError, IndexError
        with pytest.raises(NsvitError, match="patch must be two whole numbers >= 1"):
            ops.nullspace_project(torch.zeros(1, 3, 8, 8), basis, patch, True)
    with pytest.raises(NsvitError, match="token_assembly: no rows"):  # torch: IndexError, triton: empty
        ops.token_assembly(torch.zeros(1, 2, 4), None, torch.zeros(0, 4), torch.zeros(2, 4), None, None, 1e-6)
    for env in ("prob_shif=torch", "cpp,prob_shift=torch"):  # a misspelt op, a bare name: left on the default
        monkeypatch.setenv("NSVIT_BACKEND", env)
        with pytest.raises(NsvitError, match="is not OP=BACKEND"):
            ops.backend_for("prob_shift", "cpu")


@needs_ext
def test_extension_entry_points_check_what_the_cuda_ones_do():
    with pytest.raises(RuntimeError, match="patch sizes must be >= 1"):  # was SIGFPE
        ext().nullspace_project(torch.zeros(1, 3, 8, 8), torch.zeros(2, 48), 0, 0, True)
    with pytest.raises(RuntimeError, match="p_clean must have z_clean's shape"):  # was read past its end
        ext().prob_shift(torch.zeros(1, 2, 5), torch.zeros(2, 5), torch.zeros(1, 5), 0.1)


@needs_triton
def test_token_assembly_rows_wider_than_one_block_go_to_the_reference():
    # D over 8192 was documented, not checked: the launch went ahead with a 16384-wide block; then it
    # raised, so a model that wide failed on the GPU's default backend. The kernel itself still refuses
    from nsvit_fast.kernels.token_assembly import token_assembly as kernel

    dev = DEVICE["triton"]
    d = 8193
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(2, 1, d, generator=g).to(dev), torch.randn(1, 1, d, generator=g).to(dev)
    prefix, pos = torch.randn(1, d, generator=g).to(dev), torch.randn(2, d, generator=g).to(dev)
    w, b = torch.randn(d, generator=g).to(dev), torch.randn(d, generator=g).to(dev)
    with pytest.raises(NsvitError, match="D = 8193 is over 8192"):
        kernel(u, v, prefix, pos, w, b, 1e-6, True, True)
    want = ops.token_assembly(u, v, prefix, pos, w, b, 1e-6, True, True, backend="torch")
    for backend in ("triton", None):  # forced, and the device's default order
        got = ops.token_assembly(u, v, prefix, pos, w, b, 1e-6, True, True, backend=backend)
        assert got[0].shape == (4, 2, d) and all(torch.equal(a, c) for a, c in zip(got, want))


def test_kernels_interpreter_is_what_triton_decorated_not_the_variable_now():
    # available("cpu") read TRITON_INTERPRET at call time: set after the kernels were imported as GPU
    # kernels it said True, and the CPU launch then failed inside triton (and the other way round)
    import subprocess
    import sys

    code = ("import os; from nsvit_fast.kernels import prob_shift; os.environ['TRITON_INTERPRET'] = '{late}'; "
            "from nsvit_fast.kernels import available, interpreter; print(interpreter(), available('cpu'))")
    for first, late, want in (("0", "1", "False False"), ("1", "0", "True True")):
        env = {**os.environ, "TRITON_INTERPRET": first}
        out = subprocess.run([sys.executable, "-c", code.format(late=late)], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split("\n")[-2] == want, out.stdout
