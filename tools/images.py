"""`make images`: build every image in deploy/docker/ from Debian packages, PyPI and npm.

The base is Debian's (deploy/docker/base.sh: debootstrap, `docker import`), so no
public registry is needed. The builds see the network of the host (`--network host`)
and use pip's own configuration here: its indexes and find-links (a local directory is
served read-only on loopback for the build) and its CA bundle (a build secret, so it
lands in no layer). Afterwards the images' ids go into a kustomize Component
(deploy/k8s/components/image-digests, git-ignored) that pins each image by digest, and
their sizes are printed.

Environment: DOCKER (Debian's /usr/bin/docker, else docker; a daemon is started as root
when none answers), IMAGE_PREFIX (localhost/smily), IMAGE_TAG (the project
version), TORCH_INDEX_URL (empty: pip's indexes), VARIANTS ("cpu"; "cpu gpu" adds the CUDA images), BASE_IMAGE, NODE_IMAGE.
`--list` prints the images it builds, and builds nothing; `tools/images.py gateway index`
builds only those.
"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ROOT / "deploy" / "docker"
DIGESTS = ROOT / "deploy" / "k8s" / "components" / "image-digests"
# A fixed loopback port keeps the build args, hence the build cache, stable.
MIRROR_PORT = int(os.environ.get("IMAGES_PIP_PORT", "3141"))


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", shlex.join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, **kw)


def _pip_config() -> dict[str, list[str]]:
    """pip's effective settings here (files and PIP_* env), as pip itself lists them."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    settings: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        settings.setdefault(name, []).extend(value.strip().strip("'\"").split())
    return settings


class _Mirror:
    """Local pip directories, served read-only on loopback so the build sees them."""

    def __init__(self) -> None:
        self.roots: list[Path] = []
        roots = self.roots

        class Handler(http.server.SimpleHTTPRequestHandler):
            def translate_path(self, path: str) -> str:
                parts = urllib.parse.unquote(urllib.parse.urlsplit(path).path).split("/")
                if len(parts) < 2 or not parts[1].isdigit() or int(parts[1]) >= len(roots):
                    return "/nonexistent"
                target = roots[int(parts[1])].joinpath(*[p for p in parts[2:] if p not in ("", "..")])
                return str(target)

            def log_message(self, *args: object) -> None:
                pass

        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", MIRROR_PORT), Handler)
        except OSError:  # another build holds the usual port: any other (the build cache misses)
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def url(self, path: Path) -> str:
        # A simple index may link its files relative to itself (../../files/...):
        # serve its parent so those links resolve too.
        root, tail = (path.parent, f"{path.name}/") if path.name == "simple" else (path, "")
        if root not in self.roots:
            self.roots.append(root)
        return f"http://127.0.0.1:{self.port}/{self.roots.index(root)}/{tail}"

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _local(value: str) -> Path | None:
    if value.startswith("file://"):
        return Path(urllib.parse.urlsplit(value).path)
    if "://" not in value and Path(value).is_dir():
        return Path(value)
    return None


def build_args() -> tuple[list[str], list[str]]:
    """(--build-arg ..., --secret ...) carrying pip's and npm's settings into the build."""
    pip = _pip_config()
    mirror = _Mirror()
    args: dict[str, str] = {}
    for name, env in (
        ("index-url", "PIP_INDEX_URL"),
        ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
        ("find-links", "PIP_FIND_LINKS"),
        ("trusted-host", "PIP_TRUSTED_HOST"),
    ):
        values = []
        for value in pip.get(name, []):
            local = _local(value)
            values.append(mirror.url(local) if local else value)
        if values:
            args[env] = " ".join(dict.fromkeys(values))
    registry = subprocess.run(["npm", "config", "get", "registry"], capture_output=True, text=True)
    if registry.returncode == 0 and registry.stdout.strip():
        args["NPM_CONFIG_REGISTRY"] = registry.stdout.strip()
    secrets = []
    ca = (pip.get("cert") or [os.environ.get("SSL_CERT_FILE", "")])[-1]
    if ca and Path(ca).is_file():
        secrets = ["--secret", f"id=build-ca,src={ca}"]
    if mirror.roots:
        mirror.start()
    return [a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")], secrets


def default_docker() -> str:
    """Debian's docker.io client (BuildKit built in) before another on PATH that may need buildx."""
    return os.environ.get("DOCKER") or ("/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker")


def ensure_daemon(docker: str) -> None:
    """Start Debian's dockerd as these machines run it (vfs, no bridge, no iptables) when none answers."""
    if subprocess.run([docker, "info"], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0 or not shutil.which("dockerd"):
        sys.exit("no docker daemon answers: start one, or run as root with docker.io installed")
    log = open("/var/log/smily-dockerd.log", "ab")  # noqa: SIM115 - the daemon's log, for its lifetime
    cmd = ["dockerd", "--storage-driver", "vfs", "--iptables=false", "--bridge=none"]
    subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    for _ in range(60):
        if subprocess.run([docker, "info"], capture_output=True).returncode == 0:
            return
        time.sleep(1)
    sys.exit("dockerd did not start: see /var/log/smily-dockerd.log")


def _exists(docker: str, image: str) -> bool:
    return subprocess.run([docker, "image", "inspect", image], capture_output=True).returncode == 0


def main() -> int:
    docker = default_docker()
    prefix = os.environ.get("IMAGE_PREFIX", "localhost/smily")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    tag = os.environ.get("IMAGE_TAG") or version
    variants = os.environ.get("VARIANTS", "cpu").split()
    base = os.environ.get("BASE_IMAGE", f"{prefix}/base:bookworm")
    node = os.environ.get("NODE_IMAGE", f"{prefix}/node:bookworm")
    images = {"tiler": (None, tag), "gateway": (None, tag)}
    for variant in variants:
        images[f"embedder-{variant}"] = (variant, f"{tag}-{variant}")
        images[f"index-{variant}"] = (variant, f"{tag}-{variant}")
    refs = {key: f"{prefix}/{key.split('-')[0]}:{image_tag}" for key, (_, image_tag) in images.items()}
    if sys.argv[1:] == ["--list"]:
        print("\n".join(refs.values()))
        return 0
    only = set(sys.argv[1:])  # services to build (default: all)
    images = {k: v for k, v in images.items() if not only or k.split("-")[0] in only}
    env = dict(os.environ, DOCKER_BUILDKIT="1", DOCKER=docker)
    started = time.monotonic()
    ensure_daemon(docker)
    if not _exists(docker, base):
        _run([str(DOCKERFILES / "base.sh"), base], env=env)
    extra, secrets = build_args()
    # Empty: torch from pip's configured indexes, as every other package.
    torch = os.environ.get("TORCH_INDEX_URL", "")
    common = ["--network", "host", "--build-arg", f"BASE_IMAGE={base}", *extra, *secrets]
    common += ["--build-arg", f"TORCH_INDEX_URL={torch}"]
    if not _exists(docker, node):
        _run([docker, "build", *common, "-f", str(DOCKERFILES / "node.Dockerfile"), "-t", node, str(ROOT)], env=env)
    built: dict[str, dict[str, str | int]] = {}
    for key, (target, image_tag) in images.items():
        name, ref = key.split("-")[0], refs[key]
        cmd = [docker, "build", *common, "--build-arg", f"NODE_IMAGE={node}"]
        cmd += ["-f", str(DOCKERFILES / f"{name}.Dockerfile"), "-t", ref]
        cmd += ["--target", target] if target else []
        _run([*cmd, str(ROOT)], env=env)
        info = json.loads(subprocess.run([docker, "image", "inspect", ref], capture_output=True, check=True).stdout)[0]
        digest = next((d.split("@", 1)[1] for d in info.get("RepoDigests") or []), info["Id"])
        built[ref] = {"name": f"{prefix}/{name}", "tag": image_tag, "digest": digest, "size": info["Size"]}
    if not only:
        _write_digests(built, variants[0])
    print(f"built in {time.monotonic() - started:.0f} s")
    for ref, b in built.items():
        print(f"{ref:50} {int(b['size']) / 1e6:8.0f} MB  {b['digest']}")
    return 0


def _write_digests(built: dict[str, dict[str, str | int]], variant: str) -> None:
    """The Component that pins the overlay's images by digest (kustomize `images:`)."""
    lines = [
        "# Written by `make images` (tools/images.py): the images just built, pinned by",
        "# digest. Add `../../components/image-digests` to your overlay's components.",
        "# A pushed image is pinned by its registry digest, a local one by its image id.",
        "apiVersion: kustomize.config.k8s.io/v1alpha1",
        "kind: Component",
        "images:",
    ]
    for b in built.values():
        tag = str(b["tag"])
        if "-" in tag and not tag.endswith(f"-{variant}"):
            continue
        lines += [f"  - name: {b['name']}", f"    digest: {b['digest']}"]
    DIGESTS.mkdir(parents=True, exist_ok=True)
    (DIGESTS / "kustomization.yaml").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
