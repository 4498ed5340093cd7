"""What this machine runs the model on, so provider checks hold on a CPU host and a GPU host alike."""

from __future__ import annotations

import os

import onnxruntime as ort

CPU = "CPUExecutionProvider"
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})


def expected_providers() -> frozenset[str]:
    """The providers the embedder may pick here: a GPU one when onnxruntime has one and an
    NVIDIA device is present (TensorRT needs its own libraries, else CUDA), the CPU otherwise."""
    gpu = GPU_PROVIDERS & set(ort.get_available_providers())
    return frozenset(gpu) if gpu and os.path.exists("/dev/nvidiactl") else frozenset({CPU})
