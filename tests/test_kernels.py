"""Fused leaky_relu²-down-projection (metattt.kernels.leaky_mlp): CPU fallback, Triton interpreter, CUDA."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metattt.kernels import fused_mlp_available, leaky2_down, leaky2_down_reference
from metattt.kernels import leaky_mlp

REPO = Path(__file__).resolve().parents[1]
SLOPE = 0.5


def _closed_form(u: torch.Tensor, w: torch.Tensor, g: torch.Tensor, slope: float):
    """out, grad_u, grad_w of out = leaky(u)² @ w.T written out by hand (act' = 2u or 2·slope²·u)."""
    a = F.leaky_relu(u, slope).square()
    d = torch.where(u > 0, 2 * u, 2 * slope * slope * u)
    return a @ w.T, (g @ w) * d, g.T @ a


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


# --- CPU: the fallback path (no Triton needed) -------------------------------------------------------------

def test_fallback_matches_reference_with_batch_dims():
    torch.manual_seed(0)
    u, w = torch.randn(2, 7, 48), torch.randn(32, 48)
    out = leaky2_down(u, w, SLOPE)
    assert out.shape == (2, 7, 32)
    torch.testing.assert_close(out, F.linear(F.leaky_relu(u, SLOPE).square(), w), rtol=0, atol=0)
    assert not fused_mlp_available("cpu")


def test_fallback_gradients_match_closed_form_double():
    torch.manual_seed(0)
    u = torch.randn(37, 48, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, 48, dtype=torch.float64, requires_grad=True)
    g = torch.randn(37, 32, dtype=torch.float64)
    out = leaky2_down(u, w, SLOPE)
    du, dw = torch.autograd.grad(out, (u, w), g)
    ref_out, ref_du, ref_dw = _closed_form(u.detach(), w.detach(), g, SLOPE)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(du, ref_du, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-12, atol=1e-12)
    small_u = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    small_w = torch.randn(16, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: leaky2_down(a, b, SLOPE), (small_u, small_w))


def test_fallback_traces_under_torch_compile_fullgraph():
    """bf16 so the availability check itself is traced (it is folded to a constant: False on CPU)."""
    torch.manual_seed(0)
    u, w = torch.randn(9, 48, dtype=torch.bfloat16, requires_grad=True), torch.randn(32, 48, dtype=torch.bfloat16)
    out = torch.compile(lambda a, b: leaky2_down(a, b, SLOPE), fullgraph=True, backend="aot_eager")(u, w)
    torch.testing.assert_close(out, leaky2_down_reference(u, w, SLOPE))


def test_shape_and_dtype_checks_are_clear_value_errors():
    with pytest.raises(ValueError, match="multiples of 16"):
        leaky_mlp._check_shapes(64, 32, 100)
    leaky_mlp._check_shapes(200, 64, 96)
    with pytest.raises(ValueError, match="one dtype"):
        leaky_mlp._check_dtypes(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1))


def test_module_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
            "import torch; from metattt.kernels import leaky_mlp as L, leaky2_down\n"
            "assert not L.HAS_TRITON and not L.fused_mlp_available('cuda')\n"
            "print(leaky2_down(torch.randn(3, 16), torch.randn(16, 16), 0.5).shape)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    assert "torch.Size([3, 16])" in res.stdout


def test_benchmark_script_parses_args():
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mlp_kernel.py"), "--help"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "--tokens" in res.stdout


# --- Triton interpreter: the kernels themselves, on CPU ----------------------------------------------------

_INTERP_SNIPPET = textwrap.dedent("""
    import numpy as np
    import triton.runtime.interpreter as I
    # triton 3.6's interpreter turns loop bounds into ints with int(<1-element array>), an error since numpy 2.4
    if hasattr(I, "_patch_lang_tensor") and tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4):
        _orig = I._patch_lang_tensor
        def _patched(tensor, scope):
            _orig(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))
        I._patch_lang_tensor = _patched

    import itertools
    import torch
    import torch.nn.functional as F
    from metattt.kernels import leaky_mlp as L
    assert L._INTERPRET

    def closed_form(u, w, g, s):
        a = F.leaky_relu(u, s).square()
        return a @ w.T, (g @ w) * torch.where(u > 0, 2 * u, 2 * s * s * u), g.T @ a

    def rel(x, ref):
        return ((x.double() - ref).norm() / ref.norm()).item()

    torch.manual_seed(0)
    s = 0.5
    # M not a multiple of the 32-row interpreter tile; N, K not multiples of it either (48, 80).
    # The interpreter's tl.dot is wrong for bf16 (stored as uint16), so 16-bit is checked with fp16.
    for act_as_b, (m, n, k, split) in itertools.product((False, True), ((200, 64, 96, 3), (517, 48, 80, 5))):
        L._INTERP_ACT_AS_B = act_as_b  # both operand placements of act(u) in the forward and wgrad kernels
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
            u = torch.randn(m, k).to(dtype)
            w = (torch.randn(n, k) / k ** 0.5).to(dtype)
            g = torch.randn(m, n).to(dtype)
            ref = closed_form(u.double(), w.double(), g.double(), s)
            got = (L.launch_fwd(u, w, s), L.launch_dgrad(g, w, u, s), L.launch_wgrad(g, u, s, split))
            for name, x, r in zip(("fwd", "dgrad", "wgrad"), got, ref):
                assert x.dtype == dtype and x.shape == r.shape, (name, x.dtype, x.shape)
                assert rel(x, r) < tol, (name, act_as_b, m, n, k, dtype, rel(x, r))
            ge = torch.randn(1, n).to(dtype).expand(m, n)  # zero row stride, as autograd hands to backward of sum
            ref_e = closed_form(u.double(), w.double(), ge.double(), s)
            assert rel(L.launch_dgrad(ge, w, u, s), ref_e[1]) < tol
            assert rel(L.launch_wgrad(ge, u, s, split), ref_e[2]) < tol
            print("ok", act_as_b, m, n, k, dtype)

    # The registered op and its autograd formula, eagerly on CPU tensors (torch.compile needs a real GPU).
    u = torch.randn(200, 96, dtype=torch.float32, requires_grad=True)
    w = (torch.randn(64, 96) / 96 ** 0.5).requires_grad_()
    g = torch.randn(200, 64)
    out = torch.ops.metattt.leaky2_down(u, w, s)
    du, dw = torch.autograd.grad(out, (u, w), g)
    for name, x, r in zip(("op", "op du", "op dw"), (out, du, dw), closed_form(u.double(), w.double(), g.double(), s)):
        assert rel(x.detach(), r) < 1e-5, (name, rel(x.detach(), r))
    print("op ok")
""")


def test_kernels_under_triton_interpreter():
    triton = pytest.importorskip("triton", reason="triton not importable; the interpreter test needs it (CPU is fine)")
    triton_root = str(Path(triton.__file__).resolve().parents[1])  # run in a fresh process: TRITON_INTERPRET=1
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), triton_root, os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", _INTERP_SNIPPET], capture_output=True, text=True, timeout=600,
                         cwd=REPO, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("ok ") == 8 and "op ok" in res.stdout, res.stdout


def test_every_autotune_config_compiles_for_sm90():
    """Ahead-of-time compile (no GPU needed) of each config at the model's shape: catches what the interpreter
    cannot (layouts, wgmma lowering, shared memory over the H100's 227 KiB)."""
    triton = pytest.importorskip("triton", reason="triton not importable; nothing to compile")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if leaky_mlp._INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 replaces the JIT; AOT compilation needs the real one")
    m, n, k = 98304, 512, 1536
    cases = {  # kernel: (configs, pointer dtypes, the integer arguments' values at the model's shape)
        leaky_mlp.metattt_mlp_fwd: (leaky_mlp._FWD_CONFIGS, dict(u_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16"),
                                dict(M=m, N=n, K=k, s_um=k, s_uk=1, s_wn=k, s_wk=1, s_om=n, s_on=1)),
        leaky_mlp.metattt_mlp_dgrad: (leaky_mlp._DGRAD_CONFIGS,
                                  dict(g_ptr="*bf16", w_ptr="*bf16", u_ptr="*bf16", du_ptr="*bf16"),
                                  dict(M=m, N=n, K=k, s_gm=n, s_gn=1, s_wn=k, s_wk=1, s_um=k, s_uk=1, s_dm=k, s_dk=1)),
        leaky_mlp.metattt_mlp_wgrad: (leaky_mlp._WGRAD_CONFIGS, dict(u_ptr="*bf16", g_ptr="*bf16", part_ptr="*fp32"),
                                  dict(M=m, N=n, K=k, rows_per_split=9088, s_um=k, s_uk=1, s_gm=n, s_gn=1,
                                       s_ps=n * k, s_pn=k, s_pk=1)),
    }
    for kernel, (configs, ptrs, ints) in cases.items():
        for cfg in configs:
            sig, consts, attrs = {}, {}, {}
            for i, name in enumerate(kernel.arg_names):  # mimic the launch-time specialisation of the JIT
                if name in cfg.kwargs or ints.get(name) == 1:
                    sig[name], consts[(i,)] = "constexpr", cfg.kwargs.get(name, 1)
                elif name in ptrs:
                    sig[name], attrs[(i,)] = ptrs[name], [["tt.divisibility", 16]]
                elif name == "slope":
                    sig[name] = "fp32"
                else:
                    sig[name] = "i32"
                    if ints[name] % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            assert "wgmma" in compiled.asm["ptx"], (kernel.__name__, cfg)
            assert compiled.metadata.shared <= 227 * 1024, (kernel.__name__, cfg, compiled.metadata.shared)


# --- CUDA: bf16 kernels at a realistic shape, eager and under torch.compile --------------------------------

def _cuda_case(seed: int = 0, m: int = 4096 + 17, n: int = 512, k: int = 1536):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    u = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).bfloat16()
    g = (torch.randn(m, n, device="cuda", generator=gen) / m ** 0.5).bfloat16()
    return u, w, g


def _check_against_fp32(u, w, g, out, du, dw, tol=1e-2):
    ref = _closed_form(u.float(), w.float(), g.float(), SLOPE)
    # bf16 torch (cuBLAS + elementwise) as the yardstick: the fused kernels must be no less accurate, give or take.
    ub, wb = u.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ob = leaky2_down_reference(ub, wb, SLOPE)
    base = (ob, *torch.autograd.grad(ob, (ub, wb), g))
    for name, x, r, b in zip(("out", "grad_u", "grad_w"), (out, du, dw), ref, base):
        assert x.dtype == torch.bfloat16 and x.shape == r.shape, name
        err, err_torch = _rel(x, r), _rel(b, r)
        assert err < tol and err <= 1.5 * err_torch + 1e-3, (name, err, err_torch)


@pytest.mark.gpu
def test_fused_bf16_matches_fp32_reference_cuda():
    assert fused_mlp_available("cuda")
    u, w, g = _cuda_case()
    ur, wr = u.view(1, -1, u.shape[1]).clone().requires_grad_(), w.clone().requires_grad_()  # a leading batch dim
    out = leaky2_down(ur, wr, SLOPE)
    assert out.shape == (1, u.shape[0], w.shape[0])
    du, dw = torch.autograd.grad(out, (ur, wr), g.view(1, *g.shape))
    _check_against_fp32(u, w, g, out[0].detach(), du[0], dw)


@pytest.mark.gpu
def test_fused_fp32_master_weight_gets_fp32_grad_cuda():
    u, w, g = _cuda_case(seed=1, m=1000)
    w32 = w.float().requires_grad_()
    ur = u.clone().requires_grad_()
    out = leaky2_down(ur, w32, SLOPE)  # w cast to bf16 inside, as autocast would
    assert out.dtype == torch.bfloat16
    (dw,) = torch.autograd.grad(out, (w32,), g)
    assert dw.dtype == torch.float32
    ref = _closed_form(u.float(), w.float(), g.float(), SLOPE)[2]
    assert _rel(dw, ref) < 1e-2


@pytest.mark.gpu
def test_fused_traces_under_torch_compile_fullgraph():
    """fullgraph=True: no graph break; Inductor's generated code contains our kernels (the op was traced into)."""
    from torch._inductor.utils import run_and_get_code

    u, w, g = _cuda_case(seed=2)
    fc = torch.compile(lambda a, b: leaky2_down(a, b, SLOPE), fullgraph=True)
    ur, wr = u.clone().requires_grad_(), w.clone().requires_grad_()

    def step():
        out = fc(ur, wr)
        return (out.detach(), *torch.autograd.grad(out, (ur, wr), g))

    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):  # compile fresh so the code is captured
        (out, du, dw), codes = run_and_get_code(step)
    src = "\n".join(codes)
    for name in ("metattt_mlp_fwd", "metattt_mlp_dgrad", "metattt_mlp_wgrad"):
        assert name in src, f"{name} not in Inductor's output"
    _check_against_fp32(u, w, g, out, du, dw)
