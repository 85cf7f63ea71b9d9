"""Approximate orthogonalisation (the "zeroth power" U V^T of G = U S V^T) by odd matrix polynomials.

Muon replaces each gradient matrix by its polar factor. Computing it exactly needs an SVD, which is slow on
GPUs; a few iterations of an odd polynomial p(X) = a X + b (X X^T) X + c (X X^T)^2 X applied to the
Frobenius-normalised matrix push every singular value towards 1 using only matmuls, which run fast in bf16.

Two coefficient schemes:
* NS5 (Keller Jordan's Muon): one fixed quintic (3.4445, -4.7750, 2.0315) repeated. It is tuned for speed of
  inflating small singular values, not for convergence: the output singular values land in a band around 1
  (roughly [0.7, 1.2] for well-conditioned inputs), which is good enough for Muon.
* Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): a different minimax-optimal quintic per
  iteration; the table below is the published 5-iteration schedule with a 2% safety factor (the input is
  divided by 1.02 * ||G||_F so the largest singular value starts strictly inside the approximation interval).
  It converges much more tightly than NS5 for the same number of matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Coeffs = tuple[float, float, float]

NS5_COEFFS: Coeffs = (3.4445, -4.7750, 2.0315)

# Per-iteration (a, b, c) of Polar Express (arXiv:2505.16932), 5 iterations, safety factor 2e-2.
# Iterations beyond the table reuse its last entry (the interval has converged by then).
POLAR_EXPRESS_COEFFS: tuple[Coeffs, ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 2e-2


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (tensor cores; NS is robust to it), fp32 elsewhere (CPU bf16 matmul is slow and lossy)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def coefficient_schedule(steps: int, coeffs: Coeffs = NS5_COEFFS, polar_express: bool = False) -> list[Coeffs]:
    """The (a, b, c) used at each of `steps` iterations."""
    if steps < 0:
        raise ValueError(f"ns steps must be >= 0, got {steps}")
    if polar_express:
        table = POLAR_EXPRESS_COEFFS
        return [table[min(i, len(table) - 1)] for i in range(steps)]
    if len(coeffs) != 3:
        raise ValueError(f"coeffs must be a 3-tuple (a, b, c), got {coeffs!r}")
    return [tuple(float(c) for c in coeffs)] * steps  # type: ignore[list-item]


def zeropower_via_newtonschulz(
    G: torch.Tensor,
    steps: int = 5,
    coeffs: Sequence[float] = NS5_COEFFS,
    eps: float = 1e-7,
    *,
    polar_express: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximate polar factor of every matrix in G (..., m, n), batched over the leading dims.

    Each matrix is normalised by its own Frobenius norm (so its spectral norm is <= 1), transposed when m > n so
    the Gram matrix X X^T is the smaller (min(m,n))^2 one, iterated, and transposed back.
    Returns a tensor of G's shape in the compute dtype (`dtype`, default bf16 on CUDA, fp32 otherwise); callers
    cast as they need. A zero matrix maps to zero (eps keeps the division finite).
    """
    if G.ndim < 2:
        raise ValueError(f"zeropower_via_newtonschulz needs (..., m, n), got shape {tuple(G.shape)}")
    if not G.is_floating_point():
        raise ValueError(f"zeropower_via_newtonschulz needs a floating tensor, got {G.dtype}")
    schedule = coefficient_schedule(steps, tuple(coeffs), polar_express)  # type: ignore[arg-type]
    X = G.to(dtype or default_ns_dtype(G.device))
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    norm = torch.linalg.matrix_norm(X.float(), ord="fro", keepdim=True).to(X.dtype)
    if polar_express:
        norm = norm * (1.0 + POLAR_EXPRESS_SAFETY)
    X = X / (norm + eps)
    for a, b, c in schedule:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.contiguous()
