"""Retrieval quality of the default model on the full synthetic benchmark,
and robustness on it and on the real CC0 slide (docs/evaluation.md).

Starts Redis (when installed) and the four services on free loopback ports
with a fresh index, then runs what `smily eval` runs. Writes var/eval-bench/.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from smily.client import Client
from smily.common import logs
from smily.common.config import Settings
from smily.evaluation import evaluate_manifest, synthetic_benchmark
from smily.localstack import local_stack

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMU = os.path.join(ROOT, "tests", "data", "cmu_small_region.svs")
OUT = os.path.join(ROOT, "var", "eval-bench")


def main() -> int:
    logs.setup("WARNING")
    defaults = Settings.from_env()
    with tempfile.TemporaryDirectory(prefix="smily-eval-") as tmp:
        slides = os.path.join(tmp, "slides")
        manifest = synthetic_benchmark.write(
            slides, synthetic_benchmark.FULL, defaults.gateway.tile_mpp, defaults.gateway.tile_size
        )
        shutil.copy(CMU, os.path.join(slides, "cmu_small_region.svs"))
        cmu_manifest = os.path.join(tmp, "cmu.csv")
        with open(cmu_manifest, "w") as fh:
            fh.write("source,slide_id\ncmu_small_region.svs,cmu\n")
        with local_stack((slides,), model_repository=os.path.join(ROOT, "models")) as settings:
            client = Client(f"127.0.0.1:{settings.gateway.gateway_port}", timeout=600)
            print("== synthetic benchmark (full size)")
            evaluate_manifest(
                client, settings, manifest, os.path.join(OUT, "synthetic"), max_queries=50, robustness_per_slide=10
            )
            print("\n== robustness on the real CC0 slide (in an archive with the synthetic slides)")
            evaluate_manifest(client, settings, cmu_manifest, os.path.join(OUT, "cmu"), robustness_per_slide=20)
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
