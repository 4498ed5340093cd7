"""Evaluation: metrics on hand-made cases, manifests, and `smily eval` end to end."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from smily import cli, stack
from smily.client import Client
from smily.evaluation import baseline, metrics, robustness, synthetic_benchmark
from smily.evaluation.manifest import Labeller, ManifestError, load, parse

from .conftest import CMU, DATA, base_settings


# -- metrics on rankings whose right answers are known by construction -------
@pytest.mark.unit
def test_precision_accuracy_and_majority_vote():
    hits = ["a", "b", "a", None, "a"]
    assert metrics.precision_at_k("a", hits, 1) == 1.0
    assert metrics.precision_at_k("a", hits, 5) == pytest.approx(3 / 5)
    assert metrics.precision_at_k("b", hits, 5) == pytest.approx(1 / 5)
    assert metrics.precision_at_k("a", hits, 10) == pytest.approx(3 / 10)  # missing hits are misses
    assert metrics.accuracy_at_k("b", hits, 1) == 0.0
    assert metrics.accuracy_at_k("b", hits, 5) == 1.0
    assert metrics.majority_vote_at_k("a", hits, 5) == 1.0
    assert metrics.majority_vote_at_k("b", hits, 5) == 0.0
    # Tie a-b (2 each): the best-ranked of the tied labels wins.
    assert metrics.majority_vote_at_k("b", ["b", "a", "a", "b", "c"], 5) == 1.0
    assert metrics.majority_vote_at_k("a", ["b", "a", "a", "b", "c"], 5) == 0.0
    # Unlabelled hits can out-vote the query's label but never match it.
    assert metrics.majority_vote_at_k(None, [None, None, "a"], 3) == 0.0
    assert metrics.majority_vote_at_k("a", [], 5) == 0.0


@pytest.mark.unit
def test_per_query_and_bootstrap():
    out = metrics.per_query(["a", "b"], [["a", "a", "b"], ["a", "a", "a"]], ks=(1, 3), vote_k=3)
    assert list(out["P@1"]) == [1.0, 0.0]
    assert out["P@3"] == pytest.approx([2 / 3, 0.0])
    assert list(out["Acc@3"]) == [1.0, 0.0]
    assert list(out["mMV@3"]) == [1.0, 0.0]
    # Constant values: the interval collapses on the mean.
    assert metrics.bootstrap_ci(np.ones(6), np.array([0, 0, 1, 1, 2, 2]), 200) == (1.0, 1.0, 1.0)
    mean, lo, hi = metrics.bootstrap_ci(np.array([1, 1, 1, 0, 0, 0.0]), np.array([0, 0, 0, 1, 1, 1]), 500)
    assert mean == 0.5 and lo == 0.0 and hi == 1.0  # two slides, one all right, one all wrong


@pytest.mark.unit
def test_nearest_excludes_and_pads():
    db = np.eye(3, dtype=np.float32)
    q = np.array([[1, 0.5, 0]], np.float32)
    assert baseline.nearest(q, db, np.array([[True, True, True]]), 3).tolist() == [[0, 1, 2]]
    assert baseline.nearest(q, db, np.array([[False, True, False]]), 2).tolist() == [[1, -1]]


@pytest.mark.unit
def test_colour_texture_features_separate_textures():
    rng = np.random.default_rng(0)

    def tile(colour, noise):
        return np.clip(np.array(colour) + rng.normal(0, noise, (64, 64, 3)), 0, 255).astype(np.uint8)

    pink, pink2, purple, smooth_pink = (
        tile((230, 170, 200), 25),
        tile((230, 170, 200), 25),
        tile((90, 50, 140), 25),
        tile((230, 170, 200), 0),
    )
    f = {
        name: baseline.features(t)
        for name, t in dict(pink=pink, pink2=pink2, purple=purple, smooth=smooth_pink).items()
    }
    assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in f.values())
    same = f["pink"] @ f["pink2"]
    assert same > f["pink"] @ f["purple"]  # colour differs
    assert same > f["pink"] @ f["smooth"]  # texture differs


@pytest.mark.unit
def test_stain_jitter_keeps_shape_and_changes_colour():
    rgb = np.full((8, 8, 3), (200, 120, 170), np.uint8)
    out = robustness.stain_jitter(rgb, np.random.default_rng(1))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert 0 < np.abs(out.astype(int) - rgb).max() < 40
    assert np.array_equal(robustness.stain_jitter(rgb, np.random.default_rng(1), sigma=0.0), rgb)


# -- manifests ---------------------------------------------------------------
@pytest.mark.unit
def test_manifest_and_labelling_rule(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        "source,slide_id,x,y,width,height,organ,grade\n"
        "a.svs,A,,,,,breast,\n"
        "a.svs,A,0,0,100,100,,G3\n"
        "b.tiff,,10,10,50,50,lung,G1\n"
    )
    m = load(str(path))
    assert m.label_columns == ("organ", "grade")
    assert m.slides() == {"A": "a.svs", "b": "b.tiff"}
    lab = Labeller(m)
    assert lab("A", 0, 0, 100, 100) == {"grade": "G3"}  # inside the region
    assert lab("A", 40, 40, 100, 100) == {"organ": "breast"}  # 36% inside: the whole-slide row
    assert lab("b", 10, 10, 60, 60)["organ"] == "lung"  # 69% inside
    assert lab("b", 40, 40, 60, 60) == {}  # 11% inside, no whole-slide row
    assert lab("unknown", 0, 0, 1, 1) == {}
    assert lab.slide_labels("A") == {"organ": "breast"}


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no rows"),
        ("slide_id,organ\nA,lung\n", "'source'"),
        ("source,x,y,organ\na.svs,1,2,lung\n", "all of x, y, width, height"),
        ("source,x,y,width,height\na.svs,1,2,three,4\n", "must be integers"),
        ("source,x,y,width,height\na.svs,1,2,0,4\n", "positive width"),
        ("source,slide_id\na.svs,A\nb.svs,A\n", "two different sources"),
        ("source,organ\na.svs,lung,extra\n", "more cells"),
    ],
)
def test_malformed_manifests_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "m.csv"
    path.write_text(text)
    with pytest.raises(ManifestError, match=message):
        load(str(path))


@pytest.mark.unit
def test_json_manifest_and_bad_json(tmp_path):
    assert parse([{"source": "a.svs", "organ": "lung"}]).rows[0].labels == {"organ": "lung"}
    path = tmp_path / "m.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid CSV/JSON"):
        load(str(path))
    with pytest.raises(ManifestError, match="cannot read"):
        load(str(tmp_path / "missing.csv"))


# -- `smily eval` end to end on the small synthetic benchmark ----------------
@pytest.fixture(scope="module")
def eval_stack(model_repo, redis_url, tmp_path_factory):
    """A fresh stack and index of its own, over the small benchmark and the CC0 slide."""
    slides = tmp_path_factory.mktemp("eval-slides")
    manifest = synthetic_benchmark.write(str(slides))
    shutil.copy(os.path.join(DATA, CMU), slides / CMU)
    settings = base_settings(
        slide_roots=(str(slides),),
        model_repository=model_repo,
        index_dir=str(tmp_path_factory.mktemp("eval-index")),
        redis_url=redis_url,
    )
    running, settings = stack.start(stack.ORDER, settings)
    yield settings, manifest, slides
    stack.stop(running, 0)


def _eval(settings, slides, *args):
    return cli.main(
        [
            "eval",
            "--gateway",
            f"127.0.0.1:{settings.gateway.gateway_port}",
            "--slide-root",
            str(slides),
            "--embedder",
            settings.embedder.embedder_target,
            "--bootstrap",
            "300",
            *args,
        ]
    )


def test_eval_beats_random_on_synthetic_benchmark(eval_stack, tmp_path, capsys):
    settings, manifest, slides = eval_stack
    assert _eval(settings, slides, "--manifest", manifest, "--out", str(tmp_path), "--robustness", "2") == 0
    stdout = capsys.readouterr().out
    assert "label column 'tissue'" in stdout and "robustness" in stdout
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert (tmp_path / "precision_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["warnings"] == []

    tissue = result["columns"]["tissue"]
    # Fat (mostly empty cells between thin membranes) is tissue to the detector too, so it yields queries.
    assert set(tissue["classes"]) == {"stroma", "lymphocytes", "glands", "tumour", "fat"}, tissue["classes"]
    assert tissue["slides"] == 5
    m = tissue["methods"]
    assert set(m) == {"deployed", "exact", "colour-texture", "random"}
    assert set(m["deployed"]) == {"P@1", "P@5", "P@10", "Acc@5", "mMV@5"}
    deployed, rand = m["deployed"]["P@5"], m["random"]["P@5"]
    # A clear margin: the whole interval of the model above the whole interval of chance.
    assert deployed[0] >= rand[0] + 0.3, (deployed, rand)
    assert deployed[1] > rand[2], (deployed, rand)
    assert m["deployed"]["mMV@5"][0] > m["random"]["mMV@5"][0]
    assert all(lo <= mean <= hi for method in m.values() for mean, lo, hi in method.values())
    # Below SMILY_INDEX_IVF_THRESHOLD the index searches exactly: the deployed top k is the exact one.
    assert result["ann_recall"]["value"][0] == pytest.approx(1.0), result["ann_recall"]

    rob = result["robustness"]
    assert rob["queries"] == 2 * 5
    assert rob["all"]["identity"] == 1.0  # the indexed tile itself is always found
    assert set(rob["all"]) == set(robustness.TRANSFORMS)

    # Everything is indexed now: a second run ingests nothing and agrees.
    before = {s.slide_id: s.indexed_at for s in Client(f"127.0.0.1:{settings.gateway.gateway_port}").slides()}
    assert _eval(settings, slides, "--manifest", manifest, "--out", str(tmp_path / "again")) == 0
    again = json.loads((tmp_path / "again" / "evaluation.json").read_text())
    assert again["columns"]["tissue"]["methods"]["exact"] == m["exact"]
    after = {s.slide_id: s.indexed_at for s in Client(f"127.0.0.1:{settings.gateway.gateway_port}").slides()}
    assert after == before


def test_eval_robustness_on_real_slide(eval_stack, tmp_path, capsys):
    settings, _, slides = eval_stack
    manifest = tmp_path / "cmu.csv"
    manifest.write_text(f"source,slide_id\n{CMU},cmu\n")
    assert _eval(settings, slides, "--manifest", str(manifest), "--out", str(tmp_path), "--robustness", "3") == 0
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert result["columns"] == {}
    assert any("no label columns" in w for w in result["warnings"])
    assert result["robustness"]["per_slide"]["cmu"]["identity"] == 1.0
    # The synthetic slides are in the index too; the deployed search was kept to the manifest's.
    assert any("restricted to the manifest's slides" in w for w in result["warnings"])
    assert "robustness" in capsys.readouterr().out


def test_eval_reports_bad_input(eval_stack, tmp_path, capsys):
    settings, _, slides = eval_stack
    bad = tmp_path / "bad.csv"
    bad.write_text("source,x,y\nx.svs,1,2\n")
    assert _eval(settings, slides, "--manifest", str(bad), "--out", str(tmp_path)) == 2
    assert "all of x, y, width, height" in capsys.readouterr().err
    missing = tmp_path / "missing.csv"
    missing.write_text("source,organ\nnot-there.svs,lung\n")
    assert _eval(settings, slides, "--manifest", str(missing), "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "not-there" in err and str(slides) not in err
