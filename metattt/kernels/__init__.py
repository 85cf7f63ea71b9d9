"""Hand-written Triton kernels, each with a plain-torch reference (used on CPU, in CI and as the tests' ground
truth): ``qkv_prep`` (per-head norm + partial RoPE + q gain). ``fp8`` (FP8 bank GEMMs through ``torch._scaled_mm``,
``Runtime.fp8``) is plain torch, not Triton: it runs on CPU too."""
import torch

__all__ = ["in_functorch_transform"]


def in_functorch_transform(x: torch.Tensor) -> bool:
    """True when ``x`` is inside a ``torch.func`` transform (grad, vmap, ...): ops registered with
    ``torch.library.register_autograd`` do not support those, so callers take their plain-torch path. Under
    torch.compile the check is skipped (Dynamo cannot trace it; compiled training never wraps tensors)."""
    if torch.compiler.is_compiling():
        return False
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
