"""Crash-safe FAISS snapshots: the file, then a manifest that names and checks it.

A snapshot is written to a temp file, fsynced and renamed; then a manifest
(count, SHA-256, model id, journal sequence; the same for the
re-rank vectors' file, when the index has them) is written the same way and the
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


def _write_file(directory: str, name: str, index: faiss.Index) -> dict:
    """Write `index` to a temp file, fsync it and rename it to `name`; returns its manifest entry."""
    tmp = os.path.join(directory, name + ".tmp")
    faiss.write_index(index, tmp)
    _fsync_path(tmp)
    entry = dict(file=name, count=int(index.ntotal), bytes=os.path.getsize(tmp), sha256=_sha256(tmp))
    os.replace(tmp, os.path.join(directory, name))
    return entry


def write(directory: str, index: faiss.Index, info: dict, refine: faiss.Index | None = None) -> dict:
    """Persist `index` (and the re-rank vectors that refine it, if any); `info` (model_id, dim,
    factory, seq...) goes into the manifest."""
    manifest = dict(info, format=FORMAT, **_write_file(directory, f"snapshot-{info['seq']:012d}.faiss", index))
    if refine is not None:
        manifest["refine"] = _write_file(directory, f"refine-{info['seq']:012d}.faiss", refine)
    mtmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(mtmp, "w") as f:
        json.dump(manifest, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(directory)  # the snapshot's name is durable before the manifest points at it
    os.replace(mtmp, os.path.join(directory, MANIFEST))
    _fsync_path(directory)
    kept = {manifest["file"], manifest.get("refine", {}).get("file")}
    for old in glob.glob(os.path.join(directory, "snapshot-*.faiss*")) + glob.glob(
        os.path.join(directory, "refine-*.faiss*")
    ):
        if os.path.basename(old) not in kept:
            os.remove(old)
    return manifest


def _read_file(directory: str, entry: dict) -> faiss.Index:
    snap = os.path.join(directory, entry["file"])
    if not os.path.exists(snap):
        raise SnapshotError(f"snapshot file {entry['file']} is missing")
    size = os.path.getsize(snap)
    if size != entry["bytes"]:
        raise SnapshotError(
            f"snapshot file {entry['file']} is {size} bytes, the manifest says {entry['bytes']} (truncated?)"
        )
    if _sha256(snap) != entry["sha256"]:
        raise SnapshotError(f"snapshot file {entry['file']}: checksum mismatch (corrupt)")
    index = faiss.read_index(snap)
    if index.ntotal != entry["count"]:
        raise SnapshotError(f"snapshot holds {index.ntotal} vectors, the manifest says {entry['count']}")
    return index


def read(directory: str) -> tuple[faiss.Index, dict, faiss.Index | None] | None:
    """The last snapshot, its manifest and its re-rank vectors (None in a snapshot without
    them, such as one written before they were kept); None when there is no snapshot.

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
        if manifest.get("format") != FORMAT:
            raise SnapshotError(f"unknown manifest format {manifest.get('format')!r}")
        index = _read_file(directory, manifest)
        refine = _read_file(directory, manifest["refine"]) if "refine" in manifest else None
    except SnapshotError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise SnapshotError(f"unreadable snapshot or manifest: {exc}") from None
    return index, manifest, refine
