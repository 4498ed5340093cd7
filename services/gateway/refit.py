"""Concepts refitted for another model from their stored examples (at a cutover).

CreateConcept stores a concept's examples with it (regions with their tenant
resolved, uploaded patches by content), so a cutover can fit every concept
of every tenant again with the new model, as CreateConcept does. A concept
whose examples cannot be re-read (a slide deleted, its source gone), or
that was created before examples were stored, is named in the result and
keeps only its vector of the old model: the index refuses it for the new
one (FAILED_PRECONDITION) until it is created again.
"""

from __future__ import annotations

import logging

import numpy as np

from smily.common import tenancy
from smily.common.errors import FailedPrecondition, ServiceError
from smily.common.tensors import to_tensor
from smily.gateway.v1 import gateway_pb2
from smily.index.v1 import index_pb2

from . import vectors
from .backends import Backends
from .query import QueryEngine

log = logging.getLogger("smily.refit")


def stored_examples(with_, without) -> list[index_pb2.ConceptExample]:
    """A CreateConcept request's examples as the index stores them; regions name their slide's tenant."""
    out = []
    for positive, examples in ((True, with_), (False, without)):
        for ex in examples:
            if ex.WhichOneof("example") == "image":
                out.append(index_pb2.ConceptExample(positive=positive, image=ex.image))
            else:
                out.append(index_pb2.ConceptExample(positive=positive, region=ex.region.SerializeToString()))
    return out


def refit_all(backends: Backends, query: QueryEngine, from_model: str, to_model: str) -> list[str]:
    """Every tenant's concepts of `from_model` fitted again for `to_model`; returns the ones that could
    not be, as "tenant/name"."""
    timeout = backends.timeout()
    listed = backends.index.ListConcepts(
        index_pb2.ListConceptsRequest(model_id=from_model, all_tenants=True), timeout=timeout
    ).concepts
    failed = []
    for c in listed:
        try:
            _refit(backends, query, c.tenant, c.name, from_model, to_model, timeout)
        except Exception as exc:
            code = exc.code.name if isinstance(exc, ServiceError) else type(exc).__name__
            failed.append(tenancy.key(c.tenant, c.name))
            # By name only: the message could name a slide.
            log.warning("concept not refitted", extra={"concept": c.name, "tenant": c.tenant, "code": code})
    log.info("concepts refitted", extra={"model_id": to_model, "refitted": len(listed) - len(failed)})
    return failed


def _refit(backends: Backends, query: QueryEngine, tenant: str, name: str, from_model: str, to_model: str, timeout):
    stored = backends.index.GetConcept(
        index_pb2.GetConceptRequest(name=name, model_id=from_model, tenant=tenant, with_examples=True),
        timeout=timeout,
    ).concept
    if not stored.examples:
        raise FailedPrecondition("created before examples were stored")
    examples = [
        gateway_pb2.Example(image=e.image)
        if e.WhichOneof("example") == "image"
        else gateway_pb2.Example(region=gateway_pb2.Region.FromString(e.region))
        for e in stored.examples
    ]
    embedded = query.embed_stored(examples, to_model, timeout)
    positive = np.array([e.positive for e in stored.examples])
    direction, accuracy = vectors.concept_vector(embedded[positive], embedded[~positive])
    backends.index.PutConcept(
        index_pb2.PutConceptRequest(
            concept=index_pb2.Concept(
                tenant=tenant,
                name=name,
                model_id=to_model,
                vector=to_tensor(direction),
                with_examples=stored.with_examples,
                without_examples=stored.without_examples,
                train_accuracy=accuracy,
            )
        ),
        timeout=timeout,
    )
