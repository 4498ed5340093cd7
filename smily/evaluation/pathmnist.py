"""`smily eval --pathmnist FILE.npz`: a labelled set an operator stages.

MedMNIST's PathMNIST (Yang et al. 2023, CC BY 4.0; from Kather et al.'s
NCT-CRC-HE-100K and CRC-VAL-HE-7K) in its npz format: train_images
(N, H, W, 3) uint8 with train_labels (N, 1), and the same for test. The
train split is the archive, the test split (another centre) the queries;
each test image is embedded by the deployed embedder, searched exactly
among the train images, and scored P@5 and mMV@5 with 95 % bootstrap
intervals. The file is read where it lies; nothing is downloaded.
"""

from __future__ import annotations

import numpy as np

from . import baseline, metrics
from .archive import EvalError, embed

K = 5
BATCH = 64
# A CPU embeds a few dozen tiles a second: a class-stratified sample keeps the
# run to minutes (PathMNIST has 89,996 train and 7,180 test images).
MAX_TRAIN, MAX_TEST = 5000, 1000


def load(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
    except KeyError as exc:
        raise EvalError(f"{path} is not a MedMNIST npz: it lacks {exc}") from None
    except (OSError, ValueError) as exc:
        raise EvalError(f"cannot read {path} as npz: {exc}") from None
    for split in ("train", "test"):
        imgs, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[3] != 3 or len(imgs) != len(labels) or not len(imgs):
            raise EvalError(f"{path}: {split}_images must be (N, H, W, 3) uint8 with one label per image")
        data[f"{split}_labels"] = labels
    return data


def _stratified(labels: np.ndarray, n: int, rng) -> np.ndarray:
    """Up to n indices, each class in proportion."""
    if len(labels) <= n:
        return np.arange(len(labels))
    picked = [
        rng.choice(idx, max(1, round(n * len(idx) / len(labels))), replace=False)
        for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))
    ]
    return np.sort(np.concatenate(picked))


def run(
    embedder, path: str, n_boot: int = 1000, seed: int = 0, max_train: int = MAX_TRAIN, max_test: int = MAX_TEST
) -> dict:
    data = load(path)
    rng = np.random.default_rng(seed)
    train = _stratified(data["train_labels"], max_train, rng)
    test = _stratified(data["test_labels"], max_test, rng)
    vecs, model_ids = {}, set()
    for split, idx in (("train", train), ("test", test)):
        out = []
        for start in range(0, len(idx), BATCH):
            v, model_id = embed(embedder, list(data[f"{split}_images"][idx[start : start + BATCH]]))
            out.append(v)
            model_ids.add(model_id)
        vecs[split] = np.concatenate(out)
    if len(model_ids) != 1:
        raise EvalError(f"the embedder changed model during the evaluation: {sorted(model_ids)}")
    top = baseline.nearest(vecs["test"], vecs["train"], np.ones((len(test), len(train)), bool), K)
    train_labels, test_labels = data["train_labels"][train], data["test_labels"][test]
    per_q = metrics.per_query(
        [int(v) for v in test_labels], [[int(train_labels[j]) for j in row if j >= 0] for row in top], (K,), K
    )
    groups = np.arange(len(test))  # the images are independent: each its own bootstrap group
    return {
        "model_id": model_ids.pop(),
        "train_images": len(train),
        "test_images": len(test),
        "classes": len(np.unique(data["train_labels"])),
        **{name: metrics.bootstrap_ci(per_q[name], groups, n_boot, seed=seed) for name in ("P@5", "mMV@5")},
    }


def table(result: dict) -> str:
    def ci(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    return (
        f"PathMNIST, model {result['model_id']}: {result['test_images']} test queries against "
        f"{result['train_images']} train images, {result['classes']} classes\n"
        f"  P@5    {ci(result['P@5'])}\n  mMV@5  {ci(result['mMV@5'])}"
    )


def run_cli(args) -> int:
    """`smily eval --pathmnist FILE.npz [--embedder HOST:PORT] [--out DIR]`."""
    import json
    import os
    import sys

    from smily.common.channels import channel
    from smily.common.config import Settings
    from smily.embedder.v1 import embedder_pb2_grpc

    target = args.embedder or Settings.from_env().embedder.embedder_target
    ch = channel(target)
    try:
        result = run(embedder_pb2_grpc.EmbedderServiceStub(ch), args.pathmnist, args.bootstrap, args.seed)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        ch.close()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "pathmnist.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(table(result))
    print(f"\nwrote {path}")
    return 0
