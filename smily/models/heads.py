"""Projection heads on a frozen backbone's features, and their ONNX graph.

A head maps the backbone's pooled features x to dim numbers:
    y = (x - mean) @ P + MLP((x - mean) / scale),   then y / |y|
P starts as the PCA-whitening matrix (alone it is `--method pca`); the MLP
branch starts at zero, so training (`--method ssl`) starts from the PCA
model and can only move away from it by lowering the VICReg loss.
The graph is appended to the backbone's own ONNX graph: one model file,
backbone + head + L2 normalisation, served like any other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

HIDDEN = 1024
# VICReg's weights (Bardes, Ponce & LeCun 2022): invariance, variance, covariance.
SIM, STD, COV = 25.0, 25.0, 1.0
# Whitening shrinkage: eigenvalues get this share of their mean added, so the
# directions the sample barely spans are not blown up into noise.
SHRINK = 0.1


@dataclass
class Head:
    mean: np.ndarray  # (d_in,)
    proj: np.ndarray  # (d_in, dim)
    bias: np.ndarray  # (dim,)
    # MLP branch, absent for PCA: on (x - mean) / scale.
    scale: float = 1.0
    w1: np.ndarray | None = None
    b1: np.ndarray | None = None
    w2: np.ndarray | None = None
    b2: np.ndarray | None = None
    losses: list = field(default_factory=list)  # (step, total, invariance, variance, covariance)

    @property
    def dim(self) -> int:
        return int(self.proj.shape[1])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Unit-length embeddings of features x, as the ONNX graph computes them."""
        c = x.astype(np.float32) - self.mean
        y = c @ self.proj + self.bias
        if self.w1 is not None:
            y = y + np.maximum(c / self.scale @ self.w1 + self.b1, 0) @ self.w2 + self.b2
        return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)


def pca(features: np.ndarray, dim: int) -> Head:
    """PCA-whitening down to dim (zero training)."""
    x = features.astype(np.float64)
    mean = x.mean(axis=0)
    c = x - mean
    if len(c) < c.shape[1]:  # fewer samples than features: the SVD of the data is cheaper
        _, s, vt = np.linalg.svd(c, full_matrices=True)
        values = np.zeros(c.shape[1])
        values[: len(s)] = s**2 / max(1, len(c) - 1)
        vectors = vt.T
    else:
        values, vectors = np.linalg.eigh(c.T @ c / (len(c) - 1))
    order = np.argsort(values)[::-1][:dim]
    values, vectors = np.maximum(values[order], 0), vectors[:, order]
    proj = vectors / np.sqrt(values + SHRINK * values.mean() + 1e-12)
    return Head(mean.astype(np.float32), proj.astype(np.float32), np.zeros(dim, np.float32))


def _vicreg(z1, z2):
    import torch
    import torch.nn.functional as F

    inv = F.mse_loss(z1, z2)
    std = z1.new_zeros(())
    cov = z1.new_zeros(())
    n, d = z1.shape
    for z in (z1, z2):
        z = z - z.mean(dim=0)
        std = std + torch.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean() / 2
        c = (z.T @ z) / (n - 1)
        cov = cov + (c.pow(2).sum() - c.diagonal().pow(2).sum()) / d / 2
    return SIM * inv + STD * std + COV * cov, inv, std, cov


def train_ssl(
    views: np.ndarray,
    have: np.ndarray,
    slide: np.ndarray,
    start: Head,
    deadline: float,
    seed: int = 0,
    batch: int = 256,
    min_steps: int = 20,
    device: str = "cpu",
    restyle: bool = True,
) -> Head:
    """VICReg on cached features. views: (n_tiles, n_views, d_in), have: which
    views exist (view 0, the tile itself, always does). A batch holds tiles
    drawn across slides, each slide equally likely, so the variance and
    covariance terms are taken over many slides at once. With restyle, half
    the pairs' second view is moved by the difference of two slides' mean
    features: a batch-effect positive, so a slide's own look (stain, scanner)
    is what the head learns to ignore."""
    import torch

    torch.manual_seed(seed)
    if device == "cpu":
        # Small matrices: one thread does not wait on a busy core's sibling
        # (2 threads ran 10x slower than 1 on a loaded 2-core machine).
        torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    dev = torch.device(device)
    mean = torch.from_numpy(start.mean).to(dev)
    scale = float(np.sqrt(((views[:, 0] - start.mean) ** 2).sum(axis=1).mean()) / np.sqrt(views.shape[2]))
    feats = torch.from_numpy(views.astype(np.float32)).to(dev)
    proj = torch.nn.Linear(views.shape[2], start.dim).to(dev)
    with torch.no_grad():
        proj.weight.copy_(torch.from_numpy(start.proj.T.copy()))
        proj.bias.zero_()
    first, last = torch.nn.Linear(views.shape[2], HIDDEN), torch.nn.Linear(HIDDEN, start.dim)
    mlp = torch.nn.Sequential(first, torch.nn.ReLU(), last).to(dev)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    params = list(proj.parameters()) + list(mlp.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)

    def head(x):
        c = x - mean
        return proj(c) + mlp(c / scale)

    slides = np.unique(slide)
    by_slide = {s: np.flatnonzero(slide == s) for s in slides}
    slide_means = torch.from_numpy(np.stack([views[by_slide[s], 0].mean(axis=0) for s in slides])).to(dev)
    batch = min(batch, len(slide))
    losses, step = [], 0
    while step < min_steps or time.monotonic() < deadline:
        picked = [rng.choice(by_slide[s]) for s in rng.choice(slides, batch)]
        pairs = [rng.choice(np.flatnonzero(have[i]), 2, replace=bool(have[i].sum() < 2)) for i in picked]
        a = feats[[int(i) for i in picked], [int(p[0]) for p in pairs]]
        b = feats[[int(i) for i in picked], [int(p[1]) for p in pairs]]
        if restyle and len(slides) > 1:
            # Half the pairs: b as if scanned in another slide's lab (its features
            # moved by the difference of the two slides' mean features).
            own = np.searchsorted(slides, slide[picked])
            other = (own + rng.integers(1, len(slides), len(own))) % len(slides)
            moved = torch.from_numpy(rng.random(len(own)) < 0.5).to(dev)[:, None]
            b = torch.where(moved, b + slide_means[other] - slide_means[own], b)
        loss, inv, std, cov = _vicreg(head(a), head(b))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            losses.append([step] + [round(float(v.detach()), 4) for v in (loss, inv, std, cov)])
        step += 1
    out = Head(
        start.mean,
        proj.weight.detach().cpu().numpy().T.copy(),
        proj.bias.detach().cpu().numpy().copy(),
        scale,
        first.weight.detach().cpu().numpy().T.copy(),
        first.bias.detach().cpu().numpy().copy(),
        last.weight.detach().cpu().numpy().T.copy(),
        last.bias.detach().cpu().numpy().copy(),
        losses,
    )
    return out


def append_to(backbone_path: str, backbone_output: str, head: Head, output_name: str, out_path: str) -> None:
    """Write backbone + head + L2 normalisation as one ONNX model."""
    import onnx
    from onnx import compose, helper, numpy_helper

    backbone = onnx.load(backbone_path)
    backbone = compose.add_prefix(backbone, "backbone/", rename_inputs=False)
    d_in = head.proj.shape[0]

    def const(name, value):
        return numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name)

    inits = [const("mean", head.mean), const("proj", head.proj), const("bias", head.bias)]
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centred"]),
        helper.make_node("Gemm", ["centred", "proj", "bias"], ["linear"]),
    ]
    last = "linear"
    if head.w1 is not None:
        inits += [
            const("inv_scale", np.array(1.0 / head.scale)),
            const("w1", head.w1),
            const("b1", head.b1),
            const("w2", head.w2),
            const("b2", head.b2),
        ]
        nodes += [
            helper.make_node("Mul", ["centred", "inv_scale"], ["scaled"]),
            helper.make_node("Gemm", ["scaled", "w1", "b1"], ["hidden"]),
            helper.make_node("Relu", ["hidden"], ["hidden_relu"]),
            helper.make_node("Gemm", ["hidden_relu", "w2", "b2"], ["residual"]),
            helper.make_node("Add", ["linear", "residual"], ["projected"]),
        ]
        last = "projected"
    nodes.append(helper.make_node("LpNormalization", [last], [output_name], axis=1, p=2))
    graph = helper.make_graph(
        nodes,
        "projection_head",
        [helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["batch", d_in])],
        [helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, ["batch", head.dim])],
        inits,
    )
    head_model = helper.make_model(graph, opset_imports=list(backbone.opset_import))
    head_model.ir_version = backbone.ir_version
    merged = compose.merge_models(backbone, head_model, io_map=[("backbone/" + backbone_output, "features")])
    onnx.checker.check_model(merged)
    onnx.save(merged, out_path)
