"""Dynamic batching in the real embedder server: coalescing, equal results, a
bounded queue that answers RESOURCE_EXHAUSTED, and its metrics."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from smily import stack
from smily.common.channels import channel
from smily.common.tensors import from_tensor
from smily.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from smily.types.v1 import types_pb2

from .conftest import base_settings
from .helpers.gpu import CPU, expected_providers
from .helpers.wait import wait_until
from .test_embedder import patch


def request(seed: int) -> embedder_pb2.EmbedRequest:
    return embedder_pb2.EmbedRequest(
        images=[
            types_pb2.Image(
                data=patch(seed).tobytes(), encoding=types_pb2.IMAGE_ENCODING_RAW_RGB, width=224, height=224
            )
        ]
    )


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


@pytest.fixture
def embedder(model_repo, request):
    running, settings = stack.start(["embedder"], base_settings(model_repository=model_repo, **request.param))
    yield (
        running["embedder"].servicer,
        embedder_pb2_grpc.EmbedderServiceStub(channel(settings.embedder.embedder_target)),
    )
    stack.stop(running, 0)


# A long delay: the batch can only be cut by reaching the preferred size.
@pytest.mark.parametrize("embedder", [dict(preferred_batch=4, max_queue_delay_ms=60_000)], indirect=True)
def test_concurrent_requests_are_coalesced(embedder):
    servicer, stub = embedder
    batches, images = metric("smily_embedder_batch_size_count"), metric("smily_embedder_batch_size_sum")
    queued = metric("smily_embedder_queue_seconds_count")
    futures = [stub.Embed.future(request(seed)) for seed in range(4)]
    got = np.concatenate([from_tensor(f.result(timeout=120).embeddings) for f in futures])
    assert metric("smily_embedder_batch_size_count") - batches == 1
    assert metric("smily_embedder_batch_size_sum") - images == 4
    assert metric("smily_embedder_queue_seconds_count") - queued == 4
    # Each request gets its own rows, equal to embedding it alone.
    alone = servicer.model.embed_tensor(servicer.model.preprocess([patch(seed) for seed in range(4)]))
    assert np.abs(got - alone).max() < 1e-4


@pytest.mark.parametrize("embedder", [dict(preferred_batch=8, max_queue_delay_ms=3000, max_queue=1)], indirect=True)
def test_full_queue_answers_resource_exhausted(embedder):
    servicer, stub = embedder
    first = stub.Embed.future(request(1))

    def waiting():  # the first request waits for its batch to fill
        assert not first.done(), first.exception()
        return servicer.batcher.queued >= 1

    wait_until("the first request queues", waiting, poll_s=0.01)
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(request(2))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in info.value.details()
    assert from_tensor(first.result(timeout=120).embeddings).shape == (1, 1280)  # cut by the delay


@pytest.mark.parametrize("embedder", [dict(preferred_batch=1)], indirect=True)
def test_batching_can_be_disabled(embedder):
    servicer, stub = embedder
    assert servicer.batcher is None
    assert from_tensor(stub.Embed(request(3)).embeddings).shape == (1, 1280)


@pytest.mark.parametrize("embedder", [dict()], indirect=True)
def test_batching_is_automatic_off_on_the_cpu_and_on_on_a_gpu(embedder):
    # On the CPU a run costs per image: waiting for company would only add latency. A GPU
    # runs a fixed batch, which the batcher fills.
    servicer, stub = embedder
    assert servicer.model.provider in expected_providers()
    assert (servicer.batcher is None) == (servicer.model.provider == CPU)
    assert from_tensor(stub.Embed(request(3)).embeddings).shape == (1, 1280)
