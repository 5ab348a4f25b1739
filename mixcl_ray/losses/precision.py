"""Losses compute in float32 at least, also under bf16/fp16 autocast."""

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
