"""Mixed precision: which autocast dtype a run uses (``train.amp``).

``auto`` (the default) picks bf16 autocast where the hardware computes bf16 natively and float32
elsewhere: on a CPU without native bf16 (e.g. AVX2 only) oneDNN emulates bf16 convolutions, and the
built-in recipe's step took 6.5x longer in bf16 than in float32 (17.2 vs 2.6 s, 1 thread, measured on
an AVX2 AMD EPYC), while on an AVX512-BF16 CPU bf16 is the faster one.
"""
from __future__ import annotations

import torch

AMP_MODES = ("auto", "bf16", "none")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA with bf16 support; a CPU that oneDNN runs bf16 on
    (AVX512 with BF16/AMX on x86, BF16 extensions on Arm), as ``torch.ops.mkldnn`` reports it."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (``None``: float32, no autocast)."""
    if mode not in AMP_MODES:
        raise ValueError(f"train.amp must be one of {', '.join(AMP_MODES)}, got {mode!r}")
    if mode == "bf16" or (mode == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None
