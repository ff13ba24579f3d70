"""Which number format a run computes in: trainer.precision, with "auto" resolved per device."""

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without either, PyTorch emulates bf16 matmuls on the CPU, and a bf16
    autocast step runs ~30x slower than float32 (measured on a 2-core AVX2 machine: 100 against
    3,400 tokens/s for the quickstart model)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """(bf16 | fp16 | fp32, a warning or None). auto: bf16 on a GPU and on a CPU that computes bf16
    natively, float32 on any other CPU."""
    if device.type != "cuda" and requested == "fp16":
        raise ValueError(f"trainer.precision=fp16 needs a GPU and this run is on {device}; use auto, "
                         "bf16 or fp32")
    if device.type == "cpu" and not cpu_has_native_bf16():
        if requested == "auto":
            return "fp32", None
        if requested == "bf16":
            return "bf16", ("trainer.precision=bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX) "
                            "is emulated and ~30x slower than fp32; trainer.precision=auto picks fp32 here")
    return ("bf16" if requested == "auto" else requested), None
