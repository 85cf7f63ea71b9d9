"""Hand-written Triton kernels, each with a plain-torch reference (used on CPU, in CI and as the tests' ground
truth): ``qkv_prep`` (per-head norm + partial RoPE + q gain) and ``leaky_mlp`` (LeakyReLU² fused into the
down-projection GEMMs)."""
from .leaky_mlp import fused_mlp_available, leaky2_down, leaky2_down_reference

__all__ = ["fused_mlp_available", "leaky2_down", "leaky2_down_reference"]
