"""An ONNX Runtime session for one model version, on the best provider here."""
from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from services.common.errors import FailedPrecondition

from .model_repo import ModelConfig
from .preprocess import Preprocessor

log = logging.getLogger("smily.embedder")

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class Model:
    def __init__(self, config: ModelConfig, onnx_path: str, intra_op_threads: int = 0):
        self.config = config
        self.preprocess = Preprocessor(config)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        available = ort.get_available_providers()
        providers = [p for p in _GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(onnx_path, opts, providers=providers)
        except Exception as exc:
            raise FailedPrecondition(f"cannot load model {config.model_id}: {exc}") from None
        self.provider = self.session.get_providers()[0]
        self._check_signature()
        # Warm up so the first real request does not pay for allocation and tuning.
        self.embed_tensor(np.zeros((1, 3, config.input_size, config.input_size), np.float32) if config.layout == "NCHW"
                          else np.zeros((1, config.input_size, config.input_size, 3), np.float32))
        log.info("model loaded", extra={"model_id": config.model_id, "provider": self.provider})

    def _check_signature(self) -> None:
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if self.config.input_name not in inputs or self.config.output_name not in outputs:
            raise FailedPrecondition(
                f"model {self.config.model_id} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; "
                f"its config names {self.config.input_name!r} -> {self.config.output_name!r}"
            )

    def embed_tensor(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.config.output_name], {self.config.input_name: batch})
        out = out.reshape(out.shape[0], -1).astype(np.float32, copy=False)
        if self.config.l2_normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """HxWx3 uint8 RGB images -> [N, dim] float32 embeddings."""
        return self.embed_tensor(self.preprocess(images))
