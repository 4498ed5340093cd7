"""Images, "pulled" from the local docker: exported once to a directory that pods chroot into.

A pod runs its image's filesystem read-only (readOnlyRootFilesystem) with its volumes
bound over it, as a container runtime would; the harness only adds the mount points.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

# As `make images` picks it (tools/images.py).
DOCKER = os.environ.get("DOCKER") or ("/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker")


@dataclasses.dataclass(frozen=True)
class Image:
    ref: str
    id: str
    root: Path
    env: tuple[str, ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    workdir: str


def _inspect(ref: str) -> dict | None:
    out = subprocess.run([DOCKER, "image", "inspect", ref], capture_output=True, text=True)
    return json.loads(out.stdout)[0] if out.returncode == 0 else None


class Registry:
    """Resolves a manifest's image (tag or digest) to an exported filesystem.

    mirrors: image names the box cannot pull, mapped to local images that stand for
    them (the public Redis image, built here from Debian's redis-server)."""

    def __init__(self, cache: Path, mirrors: dict[str, str] | None = None):
        self.cache = cache
        self.mirrors = mirrors or {}
        self._lock = threading.Lock()
        self._images: dict[str, Image] = {}
        # Exports of images docker no longer has (rebuilt since) only take disk.
        for old in cache.glob("*") if cache.exists() else []:
            if _inspect(old.name) is None:
                shutil.rmtree(old, ignore_errors=True)

    def resolve(self, ref: str) -> Image:
        with self._lock:
            if ref not in self._images:
                self._images[ref] = self._pull(ref)
            return self._images[ref]

    def _pull(self, ref: str) -> Image:
        name, _, digest = ref.partition("@")
        repo = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
        local = self.mirrors.get(repo, name)
        info = _inspect(digest or local)
        if info is None:
            raise RuntimeError(f"image {ref} is not built: run `make images` (docker image inspect {local})")
        if digest and not any(t.split(":")[0] == repo for t in info.get("RepoTags") or []):
            raise RuntimeError(f"{digest} is not an image of {repo}")
        root = self.cache / info["Id"].split(":")[1][:16]
        if not (root / ".exported").exists():
            self._export(info["Id"], root)
        cfg = info["Config"]
        return Image(
            ref,
            info["Id"],
            root,
            tuple(cfg.get("Env") or ()),
            tuple(cfg.get("Entrypoint") or ()),
            tuple(cfg.get("Cmd") or ()),
            cfg.get("WorkingDir") or "/",
        )

    def _export(self, image_id: str, root: Path) -> None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        cid = subprocess.run([DOCKER, "create", image_id], capture_output=True, text=True, check=True).stdout.strip()
        try:
            export = subprocess.Popen([DOCKER, "export", cid], stdout=subprocess.PIPE)
            subprocess.run(["tar", "-x", "-C", str(root)], stdin=export.stdout, check=True)
            if export.wait() != 0:
                raise RuntimeError(f"docker export {image_id} failed")
        finally:
            subprocess.run([DOCKER, "rm", cid], capture_output=True)
        (root / ".exported").touch()
