"""The box's kubectl, for docs/examples/deploy.sh: the commands the deploy guide runs.

`kustomize` is the real kubectl's. `apply -f` hands the manifests to the box (a spool
directory it reads); `get`, `rollout status` and `wait` read the status the box
publishes. Anything else fails, naming the command, so the guide cannot drift to a
command the box never ran. BOX_DIR names the box's directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BOX = Path(os.environ.get("BOX_DIR", "."))
KINDS = {
    "deployment": "deployment.apps",
    "statefulset": "statefulset.apps",
    "certificate": "certificate.cert-manager.io",
}


def status() -> dict:
    try:
        return json.loads((BOX / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_until(ready, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready(status()):
            return 0
        time.sleep(0.5)
    return 1


def timeout_of(args: list[str]) -> float:
    found = next((a.split("=", 1)[1] for a in args if a.startswith("--timeout=")), "300s")
    return float(re.sub(r"s$", "", found))


def main(argv: list[str]) -> int:
    args = [a for a in argv if a not in ("--server-side",)]
    if "-n" in args:
        i = args.index("-n")
        del args[i : i + 2]
    if args[:1] == ["kustomize"]:
        return subprocess.run([shutil.which("kubectl") or "kubectl", *args]).returncode
    if args[:2] == ["apply", "-f"]:
        source = sys.stdin.read() if args[2] == "-" else Path(args[2]).read_text()
        spool = BOX / "applied"
        spool.mkdir(parents=True, exist_ok=True)
        (spool / f"{time.time_ns()}.yaml").write_text(source)
        print(f"applied {source.count('kind:')} objects to the box")
        return 0
    if args[:1] == ["get"] and args[2:] == ["-o", "name"]:
        kind = args[1]
        print("\n".join(f"{KINDS[kind]}/{n}" for n in status().get(kind, {})))
        return 0
    if args[:2] == ["rollout", "status"]:
        kind, name = args[2].split("/", 1)
        kind = kind.split(".")[0]
        return wait_until(lambda s: s.get(kind, {}).get(name) is True, timeout_of(args))
    if args[:2] == ["wait", "--for=condition=Ready"] and "--all" in args:
        kind = args[2]
        return wait_until(lambda s: bool(s.get(kind)) and all(s[kind].values()), timeout_of(args))
    print(f"the box's kubectl does not run: kubectl {' '.join(argv)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
