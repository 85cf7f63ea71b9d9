"""Hand-written Triton kernels with plain-torch references (used on CPU and as the tests' ground truth)."""
