"""Where the tensors live: the ``device`` setting and the torch settings that go with it."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when torch sees a GPU, else the CPU; otherwise the named device.

    Raises ValueError, saying what is allowed, for a device this process cannot use.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError("choose auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError("choose auto, cpu, cuda or cuda:<index>")
    if not torch.cuda.is_available():
        raise ValueError("torch sees no CUDA device on this machine; use device=auto or cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def configure_torch(deterministic: bool, num_threads: int | None = None) -> None:
    """Per-process torch settings; call before the first CUDA operation of the process.

    ``deterministic``: only deterministic kernels (cuBLAS needs its workspace
    fixed before it starts). The CPU kernels used here are deterministic anyway;
    on CUDA this fixes e.g. the embedding's and the convolutions' backward passes.
    """
    if num_threads:
        torch.set_num_threads(max(1, int(num_threads)))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic)
