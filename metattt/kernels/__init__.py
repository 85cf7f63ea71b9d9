"""Hand-written GPU kernels (Triton), each with a plain-torch fallback so CPU runs and CI need no Triton."""
from .leaky_mlp import fused_mlp_available, leaky2_down, leaky2_down_reference

__all__ = ["fused_mlp_available", "leaky2_down", "leaky2_down_reference"]
