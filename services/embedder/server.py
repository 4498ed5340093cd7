"""EmbedderService: decode, preprocess and embed batches of tissue images."""
from __future__ import annotations

from smily.common import images
from smily.common.config import Settings
from smily.common.errors import require
from smily.common.server import Registration
from smily.common.tensors import to_tensor
from smily.embedder.v1 import embedder_pb2, embedder_pb2_grpc

from . import model_repo
from .batcher import BATCH_SIZE, Batcher
from .preprocess import resize
from .runtime import Model


class EmbedderServicer(embedder_pb2_grpc.EmbedderServiceServicer):
    def __init__(self, settings: Settings):
        images.configure(settings.max_image_pixels, settings.image_decodes)
        config, path = model_repo.load(settings.model_repository, settings.model)
        self.model = Model(config, path, settings.intra_op_threads, settings.max_batch, settings.gpu_fp16)
        self._max_batch = settings.max_batch
        batching = settings.preferred_batch > 1 and settings.max_queue_delay_ms > 0
        self.batcher = Batcher(self.model.embed_tensor, settings.preferred_batch, settings.max_queue_delay_ms / 1e3,
                               settings.max_queue) if batching else None

    def Embed(self, request, context):
        n = len(request.images)
        require(n > 0, "no images to embed")
        require(n <= self._max_batch, f"at most {self._max_batch} images per request, got {n}")
        decoded = []
        size = self.model.preprocess.size
        for i, img in enumerate(request.images):
            try:
                # Shrunk to the model's input at once: a request holds at most
                # one full-size decoded image, not max_batch of them.
                decoded.append(resize(images.decode(img.data, img.encoding, img.width, img.height), size))
            except images.InvalidArgument as exc:
                raise images.InvalidArgument(f"image {i}: {exc}") from None
        tensor = self.model.preprocess(decoded)
        if self.batcher is not None:
            vectors = self.batcher.submit(tensor)
        else:
            BATCH_SIZE.observe(n)
            vectors = self.model.embed_tensor(tensor)
        return embedder_pb2.EmbedResponse(
            embeddings=to_tensor(vectors), model_id=self.model.config.model_id
        )

    def GetModelInfo(self, request, context):
        c = self.model.config
        return embedder_pb2.GetModelInfoResponse(
            info=embedder_pb2.ModelInfo(
                model_id=c.model_id, name=c.name, version=c.version, input_size=c.input_size,
                embedding_dim=c.embedding_dim, l2_normalized=c.l2_normalize,
                execution_provider=self.model.provider,
            )
        )


    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


def registration(settings: Settings) -> Registration:
    return Registration(
        embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"].full_name,
        EmbedderServicer(settings),
        embedder_pb2_grpc.add_EmbedderServiceServicer_to_server,
    )
