"""The model repository, laid out like Triton's: <repo>/<name>/<version>/.

Each version folder holds `model.onnx` and `config.json`, which says how to
feed the model (input name, size, layout, colour order, normalisation) and
what comes out (output name, embedding size, whether to L2-normalise).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from smily.common.errors import FailedPrecondition

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    version: str
    input_name: str
    input_size: int
    output_name: str
    embedding_dim: int
    # Per-channel, applied to pixels scaled to [0, 1]: (x - mean) / std.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layout: str = "NCHW"
    color_order: str = "RGB"
    l2_normalize: bool = True
    description: str = ""
    # Where the model came from (`smily model adapt`: source model, sample
    # fingerprints, training settings, loss curve, gate figures). Not read by serving.
    provenance: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def model_id(self) -> str:
        return f"{self.name}/{self.version}"


def version_dir(repo: str, model_id: str) -> str:
    name, _, version = model_id.partition("/")
    if not name or not version or "/" in version or name in (".", "..") or version in (".", ".."):
        raise FailedPrecondition(f"model must be '<name>/<version>', got {model_id!r}")
    return os.path.join(repo, name, version)


def load(repo: str, model_id: str) -> tuple[ModelConfig, str]:
    """Return the config and the ONNX path of a model in the repository."""
    folder = version_dir(repo, model_id)
    config_path = os.path.join(folder, CONFIG_FILE)
    model_path = os.path.join(folder, MODEL_FILE)
    if not os.path.isfile(config_path) or not os.path.isfile(model_path):
        raise FailedPrecondition(
            f"model {model_id} is not in the repository {repo!r}: run `make model` "
            f"(or `smily model export`) to create it"
        )
    config = read_config(config_path)
    if config.model_id != model_id:
        raise FailedPrecondition(f"{config_path} describes {config.model_id}, expected {model_id}")
    return config, model_path


def save_config(config: ModelConfig, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(asdict(config), fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def read_config(path: str) -> ModelConfig:
    """Parse and check a config.json; raises FailedPrecondition saying what is wrong."""
    try:
        with open(path) as fh:
            raw = json.load(fh)
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"cannot read model config {path}: {exc}") from None
    known = {f.name for f in fields(ModelConfig)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise FailedPrecondition(f"{path}: unknown fields {sorted(set(raw) - known) if isinstance(raw, dict) else raw}")
    try:
        raw["mean"], raw["std"] = tuple(float(v) for v in raw["mean"]), tuple(float(v) for v in raw["std"])
        config = ModelConfig(**raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise FailedPrecondition(f"{path}: {exc}") from None
    problems = []
    if len(config.mean) != 3 or len(config.std) != 3 or min(config.std) <= 0:
        problems.append("mean and std need 3 values each, std > 0")
    if config.layout not in ("NCHW", "NHWC"):
        problems.append(f"layout must be NCHW or NHWC, got {config.layout!r}")
    if config.color_order not in ("RGB", "BGR"):
        problems.append(f"color_order must be RGB or BGR, got {config.color_order!r}")
    if not isinstance(config.input_size, int) or not 16 <= config.input_size <= 1024:
        problems.append(f"input_size must be an integer in [16, 1024], got {config.input_size!r}")
    if not isinstance(config.provenance, dict):
        problems.append("provenance must be an object")
    if not isinstance(config.embedding_dim, int) or config.embedding_dim <= 0:
        problems.append(f"embedding_dim must be a positive integer, got {config.embedding_dim!r}")
    if problems:
        raise FailedPrecondition(f"{path}: " + "; ".join(problems))
    version_dir(".", config.model_id)  # the id must be a valid <name>/<version>
    return config


def input_shape(config: ModelConfig, batch: int) -> tuple[int, int, int, int]:
    s = config.input_size
    return (batch, 3, s, s) if config.layout == "NCHW" else (batch, s, s, 3)


def validate(onnx_path: str, config: ModelConfig) -> np.ndarray:
    """Check an ONNX file against its config: names, static shapes, and a dry
    run at two batch sizes. Returns the dry run's [2, dim] output."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise FailedPrecondition(f"{onnx_path} is not a loadable ONNX model: {exc}") from None
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if len(inputs) != 1 or config.input_name not in inputs or config.output_name not in outputs:
        raise FailedPrecondition(
            f"model has inputs {sorted(inputs)} and outputs {sorted(outputs)}; the config names "
            f"one input {config.input_name!r} and output {config.output_name!r}"
        )
    declared = inputs[config.input_name].shape
    expected = input_shape(config, 0)
    if len(declared) != 4 or any(isinstance(d, int) and d != e for d, e in zip(declared[1:], expected[1:])):
        raise FailedPrecondition(
            f"input {config.input_name!r} has shape {declared}; the config implies "
            f"[batch, {', '.join(map(str, expected[1:]))}] ({config.layout})"
        )
    if isinstance(declared[0], int) and declared[0] > 0:
        raise FailedPrecondition(
            f"input {config.input_name!r} has a fixed batch of {declared[0]}; export it with a dynamic batch axis"
        )
    rng = np.random.default_rng(0)
    out = np.empty((0, 0))
    for batch in (1, 2):
        x = rng.standard_normal(input_shape(config, batch)).astype(np.float32)
        try:
            (y,) = session.run([config.output_name], {config.input_name: x})
        except Exception as exc:
            raise FailedPrecondition(f"dry run at batch {batch} failed: {exc}") from None
        y = np.asarray(y)
        if y.shape[0] != batch or y.reshape(batch, -1).shape[1] != config.embedding_dim:
            raise FailedPrecondition(
                f"dry run at batch {batch} gives shape {list(y.shape)}; the config "
                f"says [{batch}, {config.embedding_dim}]"
            )
        if not np.isfinite(y).all():
            raise FailedPrecondition(f"dry run at batch {batch} gives non-finite values")
        out = y.reshape(batch, -1)
    return out


def install(onnx_path: str, config: ModelConfig, repo: str) -> str:
    """Validate and copy a model into <repo>/<name>/<version>/, atomically:
    a half-written version is never served. Returns the version folder."""
    validate(onnx_path, config)
    target = version_dir(repo, config.model_id)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".install-", dir=os.path.dirname(target))
    os.chmod(staging, 0o755)
    try:
        shutil.copyfile(onnx_path, os.path.join(staging, MODEL_FILE))
        save_config(config, staging)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(staging, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)
