"""`smily model adapt` end to end on generated slides: adapt (tiny budget),
serve the adapted model with the real services, ingest, search, and run the
label-free gate, in-process and through the deployed stack."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

from smily import cli, stack
from smily.client import Client
from smily.evaluation import adaptation, evaluate_manifest, gate, robustness, synthetic_benchmark
from smily.models import augment, heads
from smily.synthetic import SlideSpec

from .conftest import MODELS, base_settings

SOURCE = "efficientnet-lite0/1"
STAIN = 0.15
ARCHIVE = tuple(SlideSpec(f"archive-{i}.tiff", "tiff", 1792, 1344, 0.5, 300 + i) for i in range(4))
EVAL = tuple(SlideSpec(f"unseen-{i}.svs", "svs", 1792, 1344, 0.5, 350 + i) for i in range(3))
DIM = 32


# -- the parts, on inputs whose right answers are known ----------------------
def test_dihedral_group_has_eight_distinct_elements():
    rgb = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    out = [augment.dihedral(rgb, k) for k in range(8)]
    assert np.array_equal(out[0], rgb)
    assert len({o.tobytes() for o in out}) == 8
    view = augment.view(np.full((32, 32, 3), 180, np.uint8), np.random.default_rng(0))
    assert view.shape == (32, 32, 3) and view.dtype == np.uint8


def test_pca_head_whitens_and_normalises():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 40)) @ rng.standard_normal((40, 40)) * 3 + 7
    head = heads.pca(x.astype(np.float32), 8)
    z = (x - head.mean) @ head.proj
    cov = np.cov(z, rowvar=False)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 1e-3  # decorrelated
    assert np.all(np.diag(cov) < 1) and np.all(np.diag(cov) > 0.3)  # unit variance, shrunk
    assert np.allclose(np.linalg.norm(head(x), axis=1), 1, atol=1e-5)


def test_gate_scores_constructed_vectors():
    db = np.eye(6, dtype=np.float32)
    found = gate.recall(db, {"same": db[[0, 3]], "other": db[[1, 4]]}, np.array([0, 3]))
    assert found["same"] == {"recall@1": 1.0, "recall@5": 1.0}
    assert found["other"]["recall@1"] == 0.0
    # Tiles 0-2 on slide a, 3-5 on b; each tile's nearest other is on its own slide.
    vecs = np.array([[1, 0, 0.1], [1, 0, 0.2], [1, 0, 0.3], [0, 1, 0.1], [0, 1, 0.2], [0, 1, 0.3]], np.float32)
    slides = np.array(["a"] * 3 + ["b"] * 3)
    dep = gate.slide_dependence(vecs, slides, k=2)
    assert dep["own_slide_share"] == 1.0 and dep["chance"] == pytest.approx(2 / 5)
    # Labels that occur on one slide only leave those tiles out.
    dep = gate.slide_dependence(vecs, slides, ["x", "x", "y", "x", "z", "z"], k=2)
    assert dep["queries"] == 3


# -- end to end ---------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The archive (unlabelled), the unseen labelled slides, and a model repository holding the source model."""
    root = tmp_path_factory.mktemp("adapt")
    archive, unseen, repo = root / "archive", root / "unseen", root / "models"
    synthetic_benchmark.write(str(archive), ARCHIVE, stain_shift=STAIN)
    os.remove(archive / "manifest.csv")
    manifest = synthetic_benchmark.write(str(unseen), EVAL, stain_shift=STAIN)
    repo.mkdir()
    os.symlink(os.path.join(MODELS, "efficientnet-lite0"), repo / "efficientnet-lite0")
    return {"archive": str(archive), "unseen": str(unseen), "manifest": manifest, "repo": str(repo), "root": str(root)}


def _adapt(world, *args) -> int:
    return cli.main(["model", "adapt", "--from", SOURCE, "--output-dir", world["repo"], *args])


@pytest.fixture(scope="module")
def adapted(world):
    common = ["--slide-roots", world["archive"], "--max-tiles", "48", "--dim", str(DIM), "--seconds", "10"]
    assert _adapt(world, "--name", "archive-ssl", *common) == 0
    assert _adapt(world, "--name", "archive-pca", "--method", "pca", *common) == 0
    return {"ssl": "archive-ssl/1", "pca": "archive-pca/1"}


def test_adapted_version_holds_backbone_head_and_provenance(world, adapted, capsys):
    folder = os.path.join(world["repo"], "archive-ssl", "1")
    with open(os.path.join(folder, "config.json")) as fh:
        text = fh.read()
    config = json.loads(text)
    p = config["provenance"]
    assert config["embedding_dim"] == DIM and p["source_model"] == SOURCE and p["method"] == "ssl"
    # 4 slides: 3 to learn from, 1 held out for the gate, named by content fingerprints only.
    assert p["training"]["slides"] == 3 and p["gate"]["slides"] == 1
    assert len(set(p["training"]["slide_fingerprints"] + p["gate"]["slide_fingerprints"])) == 4
    assert p["training"]["tiles"] <= 48 and sum(p["training"]["views"].values()) >= p["training"]["tiles"]
    assert p["loss_curve"] and p["loss_curve"][0][0] == 0
    assert set(p["gate"]["adapted"]["recall"]) == set(gate.PERTURBATIONS) | {"mean"}
    for leak in ("archive-0", world["root"], "tiff"):
        assert leak not in text
    # One ONNX graph from images to unit vectors of --dim.
    session = ort.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(
        None, {"images": np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)}
    )
    assert out.shape == (3, DIM) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    with open(os.path.join(world["repo"], "archive-pca", "1", "config.json")) as fh:
        pca = json.load(fh)["provenance"]
    assert pca["method"] == "pca" and pca["loss_curve"] == [] and pca["training"]["views"] == {}


def test_gate_before_and_after_on_unseen_slides(world, adapted):
    ev = adaptation.load(world["manifest"])
    result = adaptation.compare(
        world["repo"], {"source": SOURCE, **adapted}, ev, per_slide=2, latency_queries=3, n_boot=100
    )
    models = result["models"]
    assert models["source"]["dim"] == 1280 and models["ssl"]["dim"] == DIM
    for m in models.values():
        assert set(m["gate"]) == set(gate.PERTURBATIONS) | {"mean"}
        assert all(0 <= v <= 1 for r in m["gate"].values() for v in r.values())
        assert m["labelled"]["queries"] > 0 and 0 <= m["labelled"]["P@5"][0] <= 1
        assert 0 <= m["slide_dependence"]["own_slide_share"] <= 1
    # A 32-d float vector is 40x smaller than a 1280-d one, index overhead aside.
    assert models["ssl"]["bytes_per_tile"] < models["source"]["bytes_per_tile"] / 10
    assert "gate rotate 180" in adaptation.describe(result)


def test_adapted_model_is_served_searched_and_gated(world, adapted, tmp_path):
    settings = base_settings(
        slide_roots=(world["unseen"],),
        model_repository=world["repo"],
        model=adapted["ssl"],
        index_dir=str(tmp_path / "index"),
    )
    running, settings = stack.start(stack.ORDER, settings)
    client = Client(f"127.0.0.1:{settings.gateway.gateway_port}", timeout=300)
    try:
        result = evaluate_manifest(
            client,
            settings,
            world["manifest"],
            str(tmp_path / "eval"),
            ks=(1, 5),
            robustness_per_slide=1,
            n_boot=50,
            quiet=True,
        )
        assert result["model_id"] == adapted["ssl"]
        rob = result["robustness"]
        assert set(rob["all"]) == set(robustness.TRANSFORMS) and rob["queries"] == len(EVAL)
        assert rob["all"]["identity"] == 1.0  # an indexed tile finds itself through the adapted model
        # A search by image answers with the adapted model's id.
        slide = next(iter(client.slides()))
        hit = client.search(region=dict(slide_id=slide.slide_id, x=0, y=0, width=448, height=448), k=3)
        assert hit.model_id == adapted["ssl"]

        # --from-index: learn from the slides this index holds, by their recorded sources.
        os.environ["SMILY_SLIDE_ROOTS"] = world["unseen"]
        try:
            code = _adapt(
                world, "--name", "from-index", "--method", "pca", "--from-index", "--index",
                f"127.0.0.1:{settings.index.index_port}", "--dim", str(DIM), "--max-tiles", "30", "--seconds", "10",
            )  # fmt: skip
        finally:
            del os.environ["SMILY_SLIDE_ROOTS"]
        assert code == 0
        with open(os.path.join(world["repo"], "from-index", "1", "config.json")) as fh:
            p = json.load(fh)["provenance"]
        assert p["sampled_from"] == "index" and p["training"]["slides"] + p["gate"]["slides"] == len(EVAL)
    finally:
        client.close()
        stack.stop(running, 0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--from", "nope/1"], "not in the repository"),
        (["--dim", "4096"], "larger than"),
        (["--unfreeze-blocks", "2"], "not supported"),
        (["--name", "efficientnet-lite0"], "new version"),
    ],
)
def test_adapt_refuses_bad_requests(world, args, message, capsys):
    base = {"--from": SOURCE, "--name": "bad", "--dim": "16"}
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    for flag, value in base.items():
        extra += [flag, value]
    code = cli.main(["model", "adapt", *extra, "--slide-roots", world["archive"], "--output-dir", world["repo"]])
    assert code == 1
    assert message in capsys.readouterr().err


def _npz(path, rng, n_train, n_test):
    """A tiny MedMNIST-format file: two classes, a pink and a purple texture."""

    def split(n):
        labels = np.arange(n) % 2
        base = np.where(labels[:, None, None, None] == 0, [230, 150, 190], [90, 50, 140])
        imgs = np.clip(base + rng.normal(0, 12, (n, 28, 28, 3)), 0, 255).astype(np.uint8)
        return imgs, labels.reshape(-1, 1)

    (tr, trl), (te, tel) = split(n_train), split(n_test)
    np.savez(path, train_images=tr, train_labels=trl, test_images=te, test_labels=tel)


def test_eval_pathmnist_npz(tmp_path, capsys):
    settings = base_settings(model_repository=MODELS)
    running, settings = stack.start(("embedder",), settings)
    try:
        path = str(tmp_path / "pathmnist.npz")
        _npz(path, np.random.default_rng(0), 40, 12)
        target = f"127.0.0.1:{settings.embedder.embedder_port}"
        out = str(tmp_path / "out")
        assert cli.main(["eval", "--pathmnist", path, "--embedder", target, "--out", out, "--bootstrap", "50"]) == 0
        with open(os.path.join(out, "pathmnist.json")) as fh:
            result = json.load(fh)
        assert result["train_images"] == 40 and result["test_images"] == 12 and result["classes"] == 2
        assert result["P@5"][0] > 0.9  # two colours an ImageNet model tells apart
        assert "mMV@5" in capsys.readouterr().out
        np.savez(str(tmp_path / "bad.npz"), train_images=np.zeros((2, 28, 28, 3), np.uint8))
        assert cli.main(["eval", "--pathmnist", str(tmp_path / "bad.npz"), "--embedder", target]) == 2
        assert "not a MedMNIST npz" in capsys.readouterr().err
    finally:
        stack.stop(running, 0)
