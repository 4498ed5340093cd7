"""Crash-safe FAISS snapshots: the file, then a manifest that names and checks it.

A snapshot is written to a temp file, fsynced and renamed; then a manifest
(count, SHA-256, model id, journal sequence) is written the same way and the
directory fsynced. The manifest rename is the commit point: a crash at any
moment leaves the previous snapshot, or none, never a half-written one that
the manifest vouches for. Reading checks size, checksum and count.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import faiss

MANIFEST = "manifest.json"
FORMAT = 1


class SnapshotError(Exception):
    """The snapshot on disk is missing, truncated, corrupt or inconsistent."""


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write(directory: str, index: faiss.Index, info: dict) -> dict:
    """Persist `index`; `info` (model_id, dim, factory, seq...) goes into the manifest."""
    name = f"snapshot-{info['seq']:012d}.faiss"
    tmp = os.path.join(directory, name + ".tmp")
    faiss.write_index(index, tmp)
    _fsync_path(tmp)
    manifest = dict(
        info, format=FORMAT, file=name, count=int(index.ntotal), bytes=os.path.getsize(tmp), sha256=_sha256(tmp)
    )
    os.replace(tmp, os.path.join(directory, name))
    mtmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(mtmp, "w") as f:
        json.dump(manifest, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(directory)  # the snapshot's name is durable before the manifest points at it
    os.replace(mtmp, os.path.join(directory, MANIFEST))
    _fsync_path(directory)
    for old in glob.glob(os.path.join(directory, "snapshot-*.faiss*")):
        if os.path.basename(old) != name:
            os.remove(old)
    return manifest


def read(directory: str) -> tuple[faiss.Index, dict] | None:
    """The last snapshot and its manifest, None when there is none.

    Raises SnapshotError when a manifest exists but its snapshot does not
    check out: the caller must rebuild, never serve it.
    """
    for tmp in glob.glob(os.path.join(directory, "*.tmp")):
        os.remove(tmp)  # left by a crash mid-write; never referenced
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        snap = os.path.join(directory, manifest["file"])
        if manifest.get("format") != FORMAT:
            raise SnapshotError(f"unknown manifest format {manifest.get('format')!r}")
        if not os.path.exists(snap):
            raise SnapshotError(f"snapshot file {manifest['file']} is missing")
        size = os.path.getsize(snap)
        if size != manifest["bytes"]:
            raise SnapshotError(f"snapshot is {size} bytes, the manifest says {manifest['bytes']} (truncated?)")
        if _sha256(snap) != manifest["sha256"]:
            raise SnapshotError("snapshot checksum mismatch (corrupt)")
        index = faiss.read_index(snap)
    except SnapshotError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise SnapshotError(f"unreadable snapshot or manifest: {exc}") from None
    if index.ntotal != manifest["count"]:
        raise SnapshotError(f"snapshot holds {index.ntotal} vectors, the manifest says {manifest['count']}")
    return index, manifest
