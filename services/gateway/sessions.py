"""View sessions on the gateway: the reads one verified session covers, and its audit record.

A session (smily.common.viewsession) is one caller viewing one slide. Its
first read is recorded as any call; later reads of it (tiles, and the tiles
the HTTP front end served from its cache, which it reports in
x-smily-cached-reads) are counted, and when the session ends (its lifetime
passes, it is evicted, or the gateway stops) one record names how many reads
it covered and their bounding region. An id that does not verify covers
nothing: those reads are each recorded.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from smily.common import viewsession

from . import audit

log = logging.getLogger("smily.guard")

# Sessions open at once, at most; the oldest is closed (recorded) beyond that.
MAX_SESSIONS = 10_000


@dataclass
class _Session:
    subject: str
    issuer: str
    slide_id: str
    peer: str
    forwarded: str | None
    ends: float  # time.time()
    started: datetime.datetime
    reads: int = 0
    box: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # x0, y0, x1, y1

    def add(self, count: int, box: tuple[int, int, int, int]) -> None:
        if count <= 0:
            return
        if self.reads == 0:
            self.box = list(box)
        else:
            self.box = [
                min(self.box[0], box[0]),
                min(self.box[1], box[1]),
                max(self.box[2], box[2]),
                max(self.box[3], box[3]),
            ]
        self.reads += count


class ViewSessions:
    def __init__(self, key: bytes, ttl_s: float, sink: audit.AuditLog):
        self._key, self._ttl, self._sink = key, ttl_s, sink
        self._open: OrderedDict[str, _Session] = OrderedDict()  # by start: the first ends first
        self._lock = threading.Lock()

    def verify(self, session: str, who, slide_id: str) -> bool:
        return viewsession.verify(self._key, session[:128], who.subject, slide_id, self._ttl) is not None

    def covered(self, session: str, who, request, metadata, peer: str) -> bool:
        """Count a served read into its (verified) session; False when it is the session's first,
        which the caller records as any call."""
        reads: list[tuple[int, tuple[int, int, int, int]]] = []
        region = getattr(request, "region", None)
        if region is not None:
            reads.append((1, (region.x, region.y, region.x + region.width, region.y + region.height)))
        report = next((v for k, v in metadata if k == viewsession.CACHED_READS), "")
        parsed = viewsession.parse_report(report) if report else None
        if parsed is not None:
            reads.append(parsed)
        slide_id = region.slide_id if region is not None else request.slide_id
        with self._lock:
            s = self._open.get(session)
            first = s is None
            if s is None:
                issued = int(session.partition(".")[0])
                s = self._open[session] = _Session(
                    who.subject,
                    who.issuer,
                    slide_id,
                    peer,
                    audit.forwarded_for(metadata),
                    issued + self._ttl,
                    datetime.datetime.now(datetime.timezone.utc),
                )
            for count, box in reads:
                s.add(count, box)
            evicted = self._open.popitem(last=False) if len(self._open) > MAX_SESSIONS else None
        if evicted:
            self._close(*evicted)
        return not first

    def sweep(self) -> None:
        """Record the sessions whose lifetime has passed."""
        now = time.time()
        ended = []
        with self._lock:
            while self._open and next(iter(self._open.values())).ends < now:
                ended.append(self._open.popitem(last=False))
        for item in ended:
            self._close(*item)

    def close_all(self) -> None:
        with self._lock:
            ended = list(self._open.items())
            self._open.clear()
        for item in ended:
            self._close(*item)

    def _close(self, session: str, s: _Session) -> None:
        if s.reads == 0:
            return  # only its first call, already recorded
        event = audit.session_event(
            session=session,
            subject=s.subject,
            issuer=s.issuer,
            peer=s.peer,
            forwarded=s.forwarded,
            slide_id=s.slide_id,
            reads=s.reads,
            box=(s.box[0], s.box[1], s.box[2] - s.box[0], s.box[3] - s.box[1]),
            started=s.started,
        )
        try:
            self._sink.write(event, durable=True)
        except Exception as exc:
            log.error("a view session's audit record was not written", extra={"error": type(exc).__name__})
