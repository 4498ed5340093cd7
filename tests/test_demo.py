"""`make demo`'s job end to end: start everything, ingest, search, print, stop cleanly."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from smily.synthetic import BIG_SLIDE

from .conftest import CMU, DATA, ROOT, TEST_SLIDES


def test_demo_runs_end_to_end(slide_dir, model_repo, redis_url, tmp_path):
    # A folder of its own: the demo ingests every slide of the folder it is given.
    for name in (TEST_SLIDES[1].name,):
        shutil.copy(os.path.join(slide_dir, name), tmp_path / name)
    shutil.copy(os.path.join(DATA, CMU), tmp_path / CMU)
    # What the README's walk-through leaves in data/samples: a second demo does not ingest it.
    shutil.copy(os.path.join(slide_dir, TEST_SLIDES[1].name), tmp_path / BIG_SLIDE.name)
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
    assert "ingested 2 slides" in out.stdout and f"skipping {BIG_SLIDE.name}" in out.stdout
    assert "ingested big:" not in out.stdout
    assert out.stdout.count("5 hits (model efficientnet-lite0/1)") == 2
    assert "cached=True" in out.stdout
    assert "stopped" in out.stdout and "Traceback" not in out.stderr
    # The generated Redis password is never printed, only the file holding it.
    assert "redis://127.0.0.1:" in out.stdout and "password in " in out.stdout
    assert not re.search(r"redis://[^ ]*:[^ ]*@", out.stdout + out.stderr)
