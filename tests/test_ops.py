"""Ops: every backend against the torch reference that defines the op (Triton under the
interpreter on the CPU, the compiled C++ extension), gradcheck of the references in float64, the
dispatch, and synthesis through forced backends."""

import os
import warnings

import pytest
import torch

from nsvit_fast import NsvitError, digits, load_model, ops
from nsvit_fast.ops._backends import ext, triton_ok
from nsvit_fast.ops.nullspace_projection import nullspace_project_torch
from nsvit_fast.ops.prob_shift import prob_shift_torch
from nsvit_fast.ops.token_assembly import token_assembly_torch

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_ok(DEV), reason="triton unavailable (no CUDA, no interpreter)")
# CI builds the extension (make ext) and sets NSVIT_REQUIRE_EXT=1: a missing build fails there
needs_ext = pytest.mark.skipif(ext() is None and os.environ.get("NSVIT_REQUIRE_EXT") != "1",
                               reason="compiled extension not built (make ext)")


def tol(op, dtype=torch.float32):
    return ops.TOLERANCES[op][dtype]


def orthonormal(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0].T.contiguous()


# -- prob_shift --
PS_SHAPES = [(1, 4, 10), (3, 7, 37), (2, 5, 1500), (4, 1, 3)]


def _ps_check(backend, shape, dtype=torch.float32, with_pc=False):
    m, b, k = shape
    g = torch.Generator().manual_seed(sum(shape))
    zn = (3 * torch.randn(m, b, k, generator=g, dtype=dtype)).to(DEV).requires_grad_(True)
    zc = (3 * torch.randn(b, k, generator=g, dtype=dtype)).to(DEV)
    pc = zc.softmax(-1) if with_pc else None
    got = ops.prob_shift(zn, zc, 0.05, pc, backend=backend)
    ref = prob_shift_torch(zn, zc, 0.05, pc)
    for a, r in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a.float(), r.float(), **tol("prob_shift", dtype))
    assert torch.equal(got[2].cpu(), ref[2].cpu())
    w = torch.arange(1.0, m + 1, device=DEV)
    ga, = torch.autograd.grad((got[0] * w).sum(), zn)
    gr, = torch.autograd.grad((ref[0] * w).sum(), zn)
    torch.testing.assert_close(ga, gr, **tol("prob_shift", dtype))


@needs_triton
@pytest.mark.parametrize("shape", PS_SHAPES)
def test_prob_shift_triton(shape):
    _ps_check("triton", shape, with_pc=shape[2] == 37)


@needs_ext
@pytest.mark.parametrize("shape", PS_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prob_shift_cpp(shape, dtype):
    _ps_check("cpp", shape, dtype, with_pc=shape[2] == 37)


def test_prob_shift_gradcheck_and_zero_distance():
    zn = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    zc = torch.randn(3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: prob_shift_torch(z, zc, 0.1)[0], (zn,))
    # at a zero distance the gradient is 0, not NaN (the official sqrt would give NaN)
    same = zc.expand(1, 3, 5).clone().requires_grad_(True)
    g, = torch.autograd.grad(prob_shift_torch(same, zc, 0.1)[0].sum(), same)
    assert torch.equal(g, torch.zeros_like(g))


# -- nullspace projection --
PR_CASES = [(2, 3, 32, 32, 8, 96), (3, 3, 24, 40, 8, 17), (1, 1, 12, 12, 4, 5), (2, 3, 64, 64, 32, 100)]


def _pr_check(backend, case, dtype=torch.float32):
    b, c, h, w, r, k = case
    q = orthonormal(c * r * r, k, seed=k).to(DEV)
    x = torch.randn(b, c, h, w, dtype=dtype, device=DEV).requires_grad_(True)
    for keep in (True, False):
        got = ops.nullspace_project(x, q, (r, r), keep, backend=backend)
        ref = nullspace_project_torch(x, q, (r, r), keep)
        torch.testing.assert_close(got, ref, **tol("nullspace_project", dtype))
        gout = torch.randn_like(got)
        ga, = torch.autograd.grad((got * gout).sum(), x)
        gr, = torch.autograd.grad((ref * gout).sum(), x)
        torch.testing.assert_close(ga, gr, **tol("nullspace_project", dtype))


@needs_triton
@pytest.mark.parametrize("case", PR_CASES)
def test_nullspace_project_triton(case):
    _pr_check("triton", case)


@needs_ext
@pytest.mark.parametrize("case", PR_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nullspace_project_cpp(case, dtype):
    _pr_check("cpp", case, dtype)


def test_nullspace_project_gradcheck_and_noncontiguous():
    q = orthonormal(12, 5)
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: nullspace_project_torch(t, q, (2, 2), False), (x,))
    xt = torch.randn(1, 3, 4, 4).transpose(2, 3)  # non-contiguous input: made contiguous by each backend
    for backend in ops.backends("nullspace_project"):
        if ops.dispatch.OPS["nullspace_project"].available[backend](torch.device("cpu")):
            torch.testing.assert_close(ops.nullspace_project(xt, q.float(), (2, 2), True, backend=backend),
                                       nullspace_project_torch(xt, q.float(), (2, 2), True), rtol=1e-4, atol=1e-5)


# -- token assembly --
TA_CASES = [(2, 5, 24, 3, 1, True, False), (3, 4, 20, 1, 2, False, True), (2, 3, 16, 0, 0, True, True),
            (1, 6, 37, 2, 5, True, True)]


def _ta_inputs(case, dtype=torch.float32):
    b, n, d, m, p, emb, clean = case
    g = torch.Generator().manual_seed(d)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(DEV).requires_grad_(True)  # noqa: E731
    return (mk(b, n, d), mk(m, n, d) if m else None, mk(p, d), mk(p + n if emb else n, d), mk(d), mk(d)), emb, clean


@needs_triton
@pytest.mark.parametrize("case", TA_CASES)
def test_token_assembly_triton(case):
    ins, emb, clean = _ta_inputs(case)
    got = ops.token_assembly(*ins, 1e-6, emb, clean, backend="triton")
    ref = token_assembly_torch(*ins, 1e-6, emb, clean)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, **tol("token_assembly"))
    gx, gl = torch.randn_like(ref[0]), torch.randn_like(ref[1])
    live = [t for t in ins if t is not None and t.numel()]
    ga = torch.autograd.grad((got[0] * gx).sum() + (got[1] * gl).sum(), live)
    gr = torch.autograd.grad((ref[0] * gx).sum() + (ref[1] * gl).sum(), live)
    for a, r in zip(ga, gr):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_token_assembly_gradcheck():
    ins, emb, clean = _ta_inputs((2, 3, 6, 2, 1, True, True), torch.float64)
    ins = tuple(t.cpu().detach().requires_grad_(True) if t is not None else None for t in ins)
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


# -- the engines through the dispatch --
@pytest.mark.parametrize("backends", [
    pytest.param("prob_shift=cpp,nullspace_project=cpp", marks=needs_ext),
    pytest.param("prob_shift=triton,token_assembly=triton", marks=needs_triton),
])
def test_synthesis_through_forced_backends_matches_torch(backends, monkeypatch):
    from nsvit_fast.synth import synthesize

    parts = load_model("digits_vit")
    data = digits("train").subset(64)
    steps = 4 if "triton" in backends else 60  # the interpreter is slow
    kw = dict(lim=4.0, batch_size=16, max_steps=steps, heldout=0, progress=False)
    runs = {}
    for name, env in (("torch", "torch"), ("forced", backends)):
        monkeypatch.setenv("NSVIT_BACKEND", env)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # 4 steps do not reach eps
            runs[name] = synthesize(parts, data, **kw)
    assert runs["forced"].steps.tolist() == runs["torch"].steps.tolist()
    torch.testing.assert_close(runs["forced"].noises, runs["torch"].noises, rtol=1e-5, atol=1e-5)
