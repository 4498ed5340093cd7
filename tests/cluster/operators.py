"""Stand-ins for the operators the overlays rely on, rendering plain Kubernetes objects.

CloudNativePG: a `Cluster` becomes what the operator would make for the index: a
primary instance pod `<name>-1` (labels cnpg.io/cluster, role=primary), the Services
`<name>-rw`, `-ro`, `-r` and the Secret `<name>-app` (username, password, dbname, uri).
Only a primary runs here (instances: 1, as the cpu overlay sets); replication is
CloudNativePG's, not the box's.
"""

from __future__ import annotations

import base64
import secrets

STORES_IMAGE = "localhost/smily/box-stores:bookworm"
CNPG_UID = 26  # the postgres user of CloudNativePG's images

INITDB = """set -eu
data=/var/lib/postgresql/data/pgdata
if [ ! -s "$data/PG_VERSION" ]; then
  printf '%s' "$PGPASSWORD_SUPERUSER" > /tmp/pw
  initdb -D "$data" -U postgres --pwfile=/tmp/pw -A scram-sha-256 >/dev/null
  rm /tmp/pw
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$data/pg_hba.conf"
  postgres -D "$data" -c listen_addresses= -c unix_socket_directories=/tmp &
  pid=$!
  until pg_isready -q -h /tmp; do sleep 0.2; done
  PGPASSWORD="$PGPASSWORD_SUPERUSER" psql -q -h /tmp -U postgres -v ON_ERROR_STOP=1 \\
    -c "CREATE ROLE \\"$APP_USER\\" LOGIN PASSWORD '$APP_PASSWORD'" \\
    -c "CREATE DATABASE \\"$APP_DB\\" OWNER \\"$APP_USER\\""
  kill "$pid"; wait "$pid" || true
fi
exec postgres -D "$data" -c listen_addresses='*' -c unix_socket_directories=/tmp -c max_connections=200
"""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def cnpg(cluster: dict) -> list[dict]:
    meta, spec = cluster["metadata"], cluster["spec"]
    name, ns = meta["name"], meta["namespace"]
    if int(spec.get("instances", 1)) != 1:
        raise RuntimeError(f"Cluster {name}: the box runs one instance (patch instances: 1)")
    initdb = (spec.get("bootstrap") or {}).get("initdb") or {}
    db, owner = initdb.get("database", "app"), initdb.get("owner", initdb.get("database", "app"))
    password = secrets.token_urlsafe(24)
    host = f"{name}-rw.{ns}"
    labels = {
        "cnpg.io/cluster": name,
        "cnpg.io/instanceRole": "primary",
        "role": "primary",
        "cnpg.io/podRole": "instance",
    }
    app = {
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/basic-auth",
        "metadata": {"name": f"{name}-app", "namespace": ns},
        "data": {
            "username": _b64(owner), "password": _b64(password), "dbname": _b64(db), "host": _b64(host),
            "port": _b64("5432"), "uri": _b64(f"postgresql://{owner}:{password}@{host}:5432/{db}"),
        },
    }  # fmt: skip
    superuser = {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-superuser", "namespace": ns},
        "data": {"username": _b64("postgres"), "password": _b64(secrets.token_urlsafe(24))},
    }  # fmt: skip
    services = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"{name}-{suffix}", "namespace": ns},
            "spec": {"selector": selector, "ports": [{"name": "postgres", "port": 5432, "targetPort": 5432}]},
        }  # fmt: skip
        for suffix, selector in (
            ("rw", {"cnpg.io/cluster": name, "role": "primary"}),
            ("ro", {"cnpg.io/cluster": name, "role": "replica"}),
            ("r", {"cnpg.io/cluster": name}),
        )
    ]
    env = [
        {
            "name": "PGPASSWORD_SUPERUSER",
            "valueFrom": {"secretKeyRef": {"name": f"{name}-superuser", "key": "password"}},
        },
        {"name": "APP_USER", "value": owner},
        {"name": "APP_DB", "value": db},
        {"name": "APP_PASSWORD", "valueFrom": {"secretKeyRef": {"name": f"{name}-app", "key": "password"}}},
    ]
    instance = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": 1, "serviceName": f"{name}-r", "selector": {"matchLabels": labels},
            "ordinals": {"start": 1},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "securityContext": {"runAsUser": CNPG_UID, "runAsGroup": CNPG_UID, "fsGroup": CNPG_UID, "runAsNonRoot": True},
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "postgres", "image": STORES_IMAGE, "command": ["sh", "-c", INITDB], "env": env,
                        "ports": [{"name": "postgres", "containerPort": 5432}],
                        "volumeMounts": [{"name": "pgdata", "mountPath": "/var/lib/postgresql/data"},
                                         {"name": "tmp", "mountPath": "/tmp"}],
                        "readinessProbe": {"tcpSocket": {"port": 5432}, "periodSeconds": 2},
                        "securityContext": {"readOnlyRootFilesystem": True},
                    }],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
            "volumeClaimTemplates": [{"metadata": {"name": "pgdata"}, "spec": {"accessModes": ["ReadWriteOnce"]}}],
        },
    }  # fmt: skip
    return [superuser, app, *services, instance]
