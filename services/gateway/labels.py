"""The label distribution of a search's top-k hits (LabelStats).

The basis of a search-based "suggested diagnosis": how the hits' slides are
labelled (metadata SMILY_LABEL_KEY), by count and by share of the score mass,
and the majority vote at k. A retrieval statistic over similar tiles, shown
as such; never a diagnosis.
"""

from __future__ import annotations

from smily.gateway.v1 import gateway_pb2


def stats(hits, key: str) -> gateway_pb2.LabelStats:
    counts: dict[str, int] = {}
    mass: dict[str, float] = {}
    for h in hits:
        label = h.metadata.get(key, "")
        counts[label] = counts.get(label, 0) + 1
        mass[label] = mass.get(label, 0.0) + max(0.0, float(h.score))
    total = sum(mass.values())
    order = sorted(counts, key=lambda label: (-counts[label], -mass[label], label))
    labelled = [label for label in order if label]
    return gateway_pb2.LabelStats(
        key=key,
        k=len(hits),
        labels=[
            gateway_pb2.LabelCount(label=label, count=counts[label], score_share=mass[label] / total if total else 0.0)
            for label in order
        ],
        majority=labelled[0] if labelled else "",
    )
