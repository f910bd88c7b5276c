"""rci_fast.kernels: Triton kernels and their torch reference/fallback."""
