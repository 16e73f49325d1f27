"""Full float32 on CUDA while wfcore computes what its estimates rest on.

PyTorch lets cuDNN convolutions run in TF32 by default (``torch.backends.cudnn.allow_tf32``),
a 10-bit mantissa. Per-sample gradients computed so differ from the CPU's float32 ones
by up to a few percent, and where a ReLU or a max-pool sits at a tie they route the
gradient elsewhere: on an H200, 6.8% of mnist_cnn's gradient entries differed from the
CPU's by more than 1e-3 relative. ``full_float32`` turns TF32 off (convolutions and
matrix products) for the duration, and restores the user's settings after; it changes
nothing on the CPU. ``math_attention`` puts attention on its math path while per-sample
gradients are taken.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def full_float32() -> Iterator[None]:
    """TF32 off for cuDNN and CUDA matrix products inside the block (usable as a decorator)."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = matmul


def math_attention() -> contextlib.AbstractContextManager:
    """``scaled_dot_product_attention`` on its math path while per-sample gradients are taken.

    torch.func has no batching rule for the fused attention kernels: under vmap each call
    falls back to a slow per-sample loop (with a warning). The math path is plain matmul and
    softmax, which vmap batches: 2x faster on a 2-layer ViT, the same gradients to float
    rounding. (torch < 2.3 has only the older switch.)
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True,
                                              enable_mem_efficient=False)
    return sdpa_kernel(SDPBackend.MATH)
