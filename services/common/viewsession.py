"""View sessions: ids the HTTP front end mints for one caller viewing one slide, and the gateway verifies.

A viewer reads a slide as many tiles; the gateway audits them as one session
record (how many reads, their bounding region) rather than one per tile. So
that a caller cannot thin its own audit trail by naming a session, an id is
`<issued-at>.<HMAC-SHA256(key, subject, slide, issued-at)>`: only a holder of
the shared key (SMILY_VIEW_SESSION_KEY or _FILE, the same on the HTTP front
end and every gateway replica) can mint one, it covers one caller and one
slide, and it lapses after view_session_ttl_s. Without a key none is minted
and none is accepted: every read is then audited on its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from .config import Settings

HEADER = "x-smily-view-session"
# Reads the HTTP front end served from its tile cache under a session, reported
# to the gateway on its next call for that session: "<count>;<x>,<y>,<width>,<height>".
CACHED_READS = "x-smily-cached-reads"
# Clock skew tolerated between the front end and the gateway.
SKEW_S = 30


def key(settings: Settings) -> bytes:
    """The shared key, or b"" when none is configured (sessions off)."""
    if settings.auth.view_session_key_file:
        with open(settings.auth.view_session_key_file, "rb") as fh:
            return fh.read().strip()
    return settings.auth.view_session_key.encode()


def _mac(secret: bytes, subject: str, slide_id: str, issued: int) -> str:
    msg = b"\0".join((subject.encode(), slide_id.encode(), str(issued).encode()))
    return base64.urlsafe_b64encode(hmac.digest(secret, msg, hashlib.sha256)).decode().rstrip("=")


def mint(secret: bytes, subject: str, slide_id: str, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    return f"{issued}.{_mac(secret, subject, slide_id, issued)}"


def verify(secret: bytes, session: str, subject: str, slide_id: str, ttl_s: float) -> int | None:
    """The session's issue time if the id is this key's, for this caller and slide, and current; else None."""
    if not secret or not session:
        return None
    issued_text, _, mac = session.partition(".")
    if not issued_text.isdigit() or len(issued_text) > 12:
        return None
    issued = int(issued_text)
    if not issued - SKEW_S <= time.time() <= issued + ttl_s:
        return None
    return issued if hmac.compare_digest(mac, _mac(secret, subject, slide_id, issued)) else None


def parse_report(value: str) -> tuple[int, tuple[int, int, int, int]] | None:
    """A CACHED_READS value as (count, (x0, y0, x1, y1)); None when malformed."""
    count_text, _, box = value.partition(";")
    parts = box.split(",")
    if not count_text.isdigit() or len(parts) != 4 or not all(p.isdigit() for p in parts):
        return None
    x, y, w, h = (int(p) for p in parts)
    return int(count_text), (x, y, x + w, y + h)
