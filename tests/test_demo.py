"""`make demo`'s job end to end: start everything, ingest, search, print, stop cleanly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .conftest import CMU, DATA, ROOT, TEST_SLIDES


def test_demo_runs_end_to_end(slide_dir, model_repo, redis_url, tmp_path):
    # A folder of its own: the demo ingests every slide of the folder it is given.
    for name in (TEST_SLIDES[1].name,):
        shutil.copy(os.path.join(slide_dir, name), tmp_path / name)
    shutil.copy(os.path.join(DATA, CMU), tmp_path / CMU)
    env = dict(os.environ, SMILY_MODEL_REPOSITORY=model_repo)
    out = subprocess.run(
        [sys.executable, "-m", "smily.cli", "demo", "--slides", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ingested 2 slides" in out.stdout
    assert out.stdout.count("5 hits (model efficientnet-lite0/1)") == 2
    assert "cached=True" in out.stdout
    assert "stopped" in out.stdout and "Traceback" not in out.stderr
