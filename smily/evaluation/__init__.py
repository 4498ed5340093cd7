"""Retrieval-quality evaluation (`smily eval`); see docs/evaluation.md."""

from __future__ import annotations

import sys

from smily.common.channels import channel
from smily.common.config import Settings
from smily.common.tiling import DEFAULT_MPPS, Tiling
from smily.embedder.v1 import embedder_pb2_grpc

from . import archive, evaluate, manifest, report, robustness


def evaluate_manifest(
    client,
    settings: Settings,
    manifest_path: str,
    out_dir: str,
    ks=(1, 5, 10),
    max_queries: int = 50,
    robustness_per_slide: int = 0,
    n_boot: int = 1000,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Ingest what is missing, evaluate, write JSON + PNG to out_dir, print the table.

    Raises manifest.ManifestError or archive.EvalError with a message for people.
    """

    def progress(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    m = manifest.load(manifest_path)
    labeller = manifest.Labeller(m)
    indexed = evaluate.ensure_ingested(client, m, labeller, progress)
    # The index's own record (set by its first ingest), not this process's environment.
    tiling = Tiling.from_pb(client.index_info().tiling)
    if tiling is None:
        raise archive.EvalError("the gateway reports no tiling settings: is it older than this tool?")
    mpp = tiling.nearest_mpp(DEFAULT_MPPS[0])  # evaluated at one of the indexed resolutions
    opened = archive.open_slides(settings, m.slides())
    emb_channel = channel(settings.embedder.embedder_target)
    try:
        arch = archive.build(tiling, mpp, opened, embedder_pb2_grpc.EmbedderServiceStub(emb_channel), progress)
    finally:
        emb_channel.close()
    result = evaluate.run(client, arch, m, indexed, tuple(ks), max_queries, n_boot, seed)
    result["tiling"] = {
        "mpp": mpp,
        "mpps": list(tiling.mpps),
        "tile_size": tiling.tile_size,
        "stride": tiling.stride,
        "min_tissue_fraction": tiling.min_tissue,
    }
    if robustness_per_slide:
        result["robustness"] = robustness.run(client, arch, opened, tiling.tile_size, robustness_per_slide, seed, mpp)
    json_path, png = report.write(result, out_dir)
    if not quiet:
        print(report.table(result))
        print(f"\nwrote {json_path}" + (f" and {png}" if png else ""))
    return result
