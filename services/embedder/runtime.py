"""An ONNX Runtime session for one model version, on the best provider here."""

from __future__ import annotations

import ctypes
import logging

import numpy as np
import onnxruntime as ort

from smily.common.errors import FailedPrecondition

from .model_repo import ModelConfig, input_shape
from .preprocess import Preprocessor

log = logging.getLogger("smily.embedder")


# ONNX Runtime 1.31 (pinned for GPU images) links TensorRT 10.
TENSORRT_LIBRARY = "libnvinfer.so.10"


def tensorrt_installed() -> bool:
    """onnxruntime-gpu lists TensorRT whether or not TensorRT's own (large,
    separately installed) libraries are there; without them every session
    would fail once, print an error and retry without it."""
    try:
        ctypes.CDLL(TENSORRT_LIBRARY)
    except OSError:
        return False
    return True


def providers(config: ModelConfig, max_batch: int, fp16: bool) -> list:
    """TensorRT, then CUDA, then CPU: whichever this machine can run.
    TensorRT gets a batch profile of 1..max_batch so no batch size rebuilds an engine."""
    available = ort.get_available_providers()
    chosen: list = []
    if "TensorrtExecutionProvider" in available and tensorrt_installed():
        lo, hi = ("x".join(map(str, input_shape(config, b))) for b in (1, max_batch))
        chosen.append(
            (
                "TensorrtExecutionProvider",
                {
                    "trt_fp16_enable": fp16,
                    "trt_profile_min_shapes": f"{config.input_name}:{lo}",
                    "trt_profile_opt_shapes": f"{config.input_name}:{hi}",
                    "trt_profile_max_shapes": f"{config.input_name}:{hi}",
                },
            )
        )
    if "CUDAExecutionProvider" in available:
        # The default, EXHAUSTIVE, benchmarks every convolution for each new
        # input shape: with dynamic batching every new batch size stalled for
        # about a second (p50 1.3 s on an H200, docs/benchmarks.md).
        chosen.append(("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
    return chosen + ["CPUExecutionProvider"]


# Images per run on a GPU (see Model).
GPU_BATCH = 32


class Model:
    def __init__(
        self,
        config: ModelConfig,
        onnx_path: str,
        intra_op_threads: int = 0,
        max_batch: int = 64,
        fp16: bool = False,
        fixed_batch: int | None = None,
    ):
        self.config = config
        self.preprocess = Preprocessor(config)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ONNX Runtime's threads spin between runs by default: CPU burnt while the embedder waits for
        # tiles, and taken from whatever runs next on the node (docs/benchmarks.md, issue 27: ingest
        # 83 tiles/s at 1.08x the plain loop's CPU without spinning, 73 tiles/s at 1.16x with it).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(onnx_path, opts, providers=providers(config, max_batch, fp16))
        except Exception as exc:
            raise FailedPrecondition(f"cannot load model {config.model_id}: {exc}") from None
        self.provider = self.session.get_providers()[0]
        self._check_signature()
        # On a GPU, ONNX Runtime re-plans every convolution whenever the batch
        # size changes: 200-330 ms per change on an H200, so dynamic batching
        # ran at 30 images/s (docs/benchmarks.md). There every run has one size:
        # batches go in chunks of fixed_batch images, the last one padded.
        # A CPU pays per image, so it runs each batch as it comes.
        if fixed_batch is None:
            fixed_batch = GPU_BATCH if self.provider != "CPUExecutionProvider" else 0
        self.fixed_batch = fixed_batch
        # Warm up, so the first real requests pay for neither allocation nor engine builds.
        for batch in (fixed_batch,) if fixed_batch else (1, max_batch):
            self.embed_tensor(np.zeros(input_shape(config, batch), np.float32))
        log.info(
            "model loaded",
            extra={
                "model_id": config.model_id,
                "provider": self.provider,
                "fp16": fp16 and self.provider == "TensorrtExecutionProvider",
            },
        )

    def _check_signature(self) -> None:
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if self.config.input_name not in inputs or self.config.output_name not in outputs:
            raise FailedPrecondition(
                f"model {self.config.model_id} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
                f"its config names {self.config.input_name!r} -> {self.config.output_name!r}"
            )

    def embed_tensor(self, batch: np.ndarray) -> np.ndarray:
        if not self.fixed_batch:
            return self._run(batch)
        size, out = self.fixed_batch, []
        for i in range(0, len(batch), size):
            chunk = batch[i : i + size]
            if len(chunk) < size:  # only the last chunk is copied, to pad it
                chunk = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            out.append(self._run(chunk)[: len(batch) - i])
        return np.concatenate(out)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.config.output_name], {self.config.input_name: batch})
        out = out.reshape(out.shape[0], -1).astype(np.float32, copy=False)
        if self.config.l2_normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
