"""EmbedderService: decode, preprocess and embed batches of tissue images,
and whole slides read straight from the tiler (EmbedSlide)."""

from __future__ import annotations

import grpc
import numpy as np

from smily.common import images
from smily.common.channels import RotatingStub
from smily.common.config import Settings
from smily.common.errors import require
from smily.common.server import Registration, Servicer
from smily.common.tensors import to_tensor
from smily.common.tls import client_credentials
from smily.common.tracing import span
from smily.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from smily.tiler.v1 import tiler_pb2, tiler_pb2_grpc

from . import model_repo
from .batcher import BATCH_SIZE, Batcher
from .preprocess import resize
from .runtime import Model

DEFAULT_SLIDE_BATCH = 32
# Dynamic batching by default on a GPU only: there a run costs about the same for 1
# image or 32 (2.6x the throughput of 16 clients on an H200). On the CPU a run costs
# per image, so batching buys no throughput and cost a one-image query ~5 ms of
# waiting and hand-offs (docs/benchmarks.md).
AUTO_GPU_BATCH = 32
# gRPC reports a call without a deadline as ~9.2e18 s remaining.
NO_DEADLINE_S = 1e9


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer, Servicer):
    def __init__(self, settings: Settings):
        images.configure(settings.limits.max_image_pixels, settings.limits.image_decodes)
        config, path = model_repo.load(settings.embedder.model_repository, settings.embedder.model)
        self.model = Model(
            config, path, settings.embedder.intra_op_threads, settings.embedder.max_batch, settings.embedder.gpu_fp16
        )
        self._max_batch = settings.embedder.max_batch
        preferred = settings.embedder.preferred_batch or (AUTO_GPU_BATCH if self.model.fixed_batch else 1)
        batching = preferred > 1 and settings.embedder.max_queue_delay_ms > 0
        self.batcher = (
            Batcher(
                self.model.embed_tensor,
                preferred,
                settings.embedder.max_queue_delay_ms / 1e3,
                settings.embedder.max_queue,
            )
            if batching
            else None
        )
        # Dialled on the first EmbedSlide only: a channel connects lazily.
        # Under mTLS the tiler must accept this service's identity (SMILY_TLS_TILER_CLIENTS).
        # Follows the embedder's client certificate when it is renewed.
        self._tiler = RotatingStub(
            settings.tiler.tiler_target, client_credentials(settings), tiler_pb2_grpc.TilerServiceStub
        )

    def _embed_images(self, imgs) -> np.ndarray:
        decoded = []
        size = self.model.preprocess.size
        with span("decode", images=len(imgs)):
            for i, img in enumerate(imgs):
                try:
                    # Shrunk to the model's input at once: a request holds at most
                    # one full-size decoded image, not max_batch of them.
                    decoded.append(resize(images.decode(img.data, img.encoding, img.width, img.height), size))
                except images.InvalidArgument as exc:
                    raise images.InvalidArgument(f"image {i}: {exc}") from None
        with span("preprocess"):
            tensor = self.model.preprocess(decoded)
        with span("inference", provider=self.model.provider):  # queue wait included when batching
            if self.batcher is not None:
                return self.batcher.submit(tensor)
            BATCH_SIZE.observe(len(decoded))
            return self.model.embed_tensor(tensor)

    def Embed(self, request, context):
        n = len(request.images)
        require(n > 0, "no images to embed")
        require(n <= self._max_batch, f"at most {self._max_batch} images per request, got {n}")
        return embedder_pb2.EmbedResponse(
            embeddings=to_tensor(self._embed_images(request.images)), model_id=self.model.config.model_id
        )

    def EmbedSlide(self, request, context):
        batch = request.batch or DEFAULT_SLIDE_BATCH
        require(0 < batch <= self._max_batch, f"batch must be in 1..{self._max_batch}, got {batch}")
        tiles_request = tiler_pb2.StreamTilesRequest()
        tiles_request.CopyFrom(request.tiles)
        tiles_request.encoding = images.RAW_RGB  # nothing to decode here
        remaining = context.time_remaining()
        stream = self._tiler.StreamTiles(tiles_request, timeout=remaining if remaining < NO_DEADLINE_S else None)
        # The caller cancelled or its deadline passed: stop the tiler's reads too.
        context.add_callback(stream.cancel)
        model_id = self.model.config.model_id
        total = -1
        pending: list[tiler_pb2.Tile] = []

        def embedded() -> embedder_pb2.EmbedSlideResponse:
            out = embedder_pb2.EmbedSlideResponse(
                embeddings=to_tensor(self._embed_images([t.image for t in pending])),
                model_id=model_id,
                tiles_total=total,
            )
            for t in pending:
                out.tiles.add(
                    x=t.x, y=t.y, width=t.width, height=t.height, mpp=t.mpp, tissue_fraction=t.tissue_fraction
                )
            pending.clear()
            return out

        try:
            for msg in stream:
                if msg.tiles_total != total:
                    total = msg.tiles_total
                    yield embedder_pb2.EmbedSlideResponse(model_id=model_id, tiles_total=total)
                for tile in msg.tiles:
                    pending.append(tile)
                    if len(pending) >= batch:
                        yield embedded()
            if pending:
                yield embedded()
        except grpc.RpcError:
            if not context.is_active():
                return  # cancelled by the caller: nobody is listening
            raise
        finally:
            stream.cancel()

    def GetModelInfo(self, request, context):
        c = self.model.config
        return embedder_pb2.GetModelInfoResponse(
            info=embedder_pb2.ModelInfo(
                model_id=c.model_id,
                name=c.name,
                version=c.version,
                input_size=c.input_size,
                embedding_dim=c.embedding_dim,
                l2_normalized=c.l2_normalize,
                execution_provider=self.model.provider,
            )
        )

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self._tiler.close()


def registration(settings: Settings) -> Registration:
    return Registration(
        embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name,
        EmbedderServicer(settings),
        embedder_pb2_grpc.add_EmbedderServiceServicer_to_server,
    )
