"""`make k8s-secrets`: the Secret values the Kubernetes base generates from, made here once.

Writes deploy/k8s/base/secrets/redis.env (ignored by git, mode 0600): the
in-cluster Redis's password and the cache's HMAC key, each 256 random bits.
An existing file is kept, so re-running never rotates them by surprise.
"""

from __future__ import annotations

import os
import secrets
import sys

PATH = os.path.join("deploy", "k8s", "base", "secrets", "redis.env")


def write(path: str = PATH) -> bool:
    """Create the file unless it exists; True when it was created."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(f"password={secrets.token_urlsafe(32)}\ncache-key={secrets.token_urlsafe(32)}\n")
    return True


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else PATH
    print(f"{'wrote' if write(path) else 'kept the existing'} {path}")
