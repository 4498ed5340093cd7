"""The model repository, laid out like Triton's: <repo>/<name>/<version>/.

Each version folder holds `model.onnx` and `config.json`, which says how to
feed the model (input name, size, layout, colour order, normalisation) and
what comes out (output name, embedding size, whether to L2-normalise).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from services.common.errors import FailedPrecondition

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
    with open(config_path) as fh:
        raw = json.load(fh)
    raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
    config = ModelConfig(**raw)
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
