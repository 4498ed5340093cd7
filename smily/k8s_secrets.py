"""`make k8s-secrets`: the Secret values the Kubernetes base generates from, made here once.

Writes into deploy/k8s/base/secrets/ (ignored by git, mode 0600), each value 256
random bits:
- redis.env: the in-cluster Redis's password and the cache's HMAC key (Secret smily-redis);
- view-session.env: the key the HTTP front end mints view sessions with and the
  gateways verify them with (Secret smily-view-session).
An existing file is kept, so re-running never rotates them by surprise; one
missing (an older checkout had only redis.env) is made.
"""

from __future__ import annotations

import os
import secrets
import sys

DIRECTORY = os.path.join("deploy", "k8s", "base", "secrets")
# File -> the keys it holds.
FILES = {"redis.env": ("password", "cache-key"), "view-session.env": ("key",)}


def write(directory: str = DIRECTORY) -> list[str]:
    """Create the files that do not exist yet; the paths created."""
    os.makedirs(directory, exist_ok=True)
    made = []
    for name, keys in FILES.items():
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as fh:
            fh.writelines(f"{key}={secrets.token_urlsafe(32)}\n" for key in keys)
        made.append(path)
    return made


if __name__ == "__main__":
    directory = sys.argv[1] if len(sys.argv) > 1 else DIRECTORY
    made = write(directory)
    for name in FILES:
        path = os.path.join(directory, name)
        print(f"{'wrote' if path in made else 'kept the existing'} {path}")
