"""Slides read straight from a DICOMweb archive (DICOM WSI, Supplement 145).

Archives are configured (SMILY_DICOMWEB_URL, "name=url,..."), never named
by a caller's URL: a caller says `dicomweb:<archive>/<StudyUID>/<SeriesUID>`
and anything else that looks like a URL is refused, so the tiler cannot be
pointed at an internal address (SSRF). Redirects are not followed.

The server process turns a source into a locator (the archive's address,
credential and CA files, the UIDs) that the reader processes open with
wsidicom over dicomweb-client: WADO-RS fetches only the frames a read needs,
into wsidicom's bounded frame caches. DicomWebSlide offers the few
OpenSlide-like members tiling.py uses, so a series goes through the same
tissue detection, tiling and µm/px rules as a file. Label and overview
instances are never read; of the DICOM attributes only an allowlist of
identifiers leaves this module (never patient name, ID, birth date...).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass

import requests
from PIL import Image

from smily.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

from .slides import geometry

SCHEME = "dicomweb:"
_LOCATOR = SCHEME + "{"
# "http:", "file:", "s3:", "gs:"... (a scheme, RFC 3986), also without "//".
_URL_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
# An accession number is a DICOM SH (16 characters); QIDO wildcards are refused.
_ACCESSION = re.compile(r"^[^*?\\\x00-\x1f]{1,16}$")
HTTP_TIMEOUT_S = 30.0
MAX_SERIES_PER_CASE = 200
MAX_OPEN_SERIES = 4
VOLUME = "VOLUME"
# dicomweb-client's debug lines hold URLs and request headers (credentials).
logging.getLogger("dicomweb_client").setLevel(logging.WARNING)
SM = "SM"

# Tags copied into the slide's metadata (DICOM JSON keys); nothing else is read out.
_IDENTIFIERS = {
    "accession_number": "00080050",
    "study_instance_uid": "0020000D",
    "series_instance_uid": "0020000E",
    "container_identifier": "00400512",
}
_SPECIMEN_DESCRIPTION_SEQUENCE = "00400560"
_SPECIMEN_DESCRIPTIONS = ("00400600", "00400602")  # short, detailed
_IMAGE_TYPE = "00080008"


@dataclass(frozen=True)
class Archive:
    name: str
    url: str
    credentials_file: str = ""
    ca: str = ""
    frame_cache_bytes: int = 64 << 20


def is_url_like(name: str) -> bool:
    return bool(_URL_LIKE.match(name))


def is_locator(path: str) -> bool:
    return path.startswith(_LOCATOR)


class Archives:
    """The configured archives, on the server side: sources and case queries."""

    def __init__(self, entries: tuple[str, ...], credentials_file: str = "", ca: str = "", frame_cache_mb: int = 64):
        self._archives: dict[str, Archive] = {}
        for entry in entries:
            name, sep, url = entry.partition("=")
            name, url = name.strip(), url.strip()
            if not sep or not _NAME.match(name) or not url.startswith(("http://", "https://")):
                raise ValueError(f"SMILY_DICOMWEB_URL entries are NAME=http(s)://host/path, got {entry!r}")
            self._archives[name] = Archive(name, url.rstrip("/"), credentials_file, ca, frame_cache_mb << 20)

    def _archive(self, name: str) -> Archive:
        if not self._archives:
            raise FailedPrecondition("no DICOMweb archive is configured (SMILY_DICOMWEB_URL)")
        if not name:  # the first one configured is the default
            return next(iter(self._archives.values()))
        archive = self._archives.get(name)
        if archive is None:
            raise InvalidArgument("no DICOMweb archive of that name is configured")
        return archive

    def locate(self, name: str) -> str | None:
        """The reader locator of a `dicomweb:` source; None for a file name.
        Raises INVALID_ARGUMENT for any other URL-like name."""
        if not name.startswith(SCHEME):
            if is_url_like(name):
                raise InvalidArgument(
                    "slides are named by a path under the slide roots or as "
                    "dicomweb:<archive>/<StudyInstanceUID>/<SeriesInstanceUID>; URLs are not accepted"
                )
            return None
        parts = name[len(SCHEME) :].split("/")
        if len(parts) != 3 or not all(_UID.match(p) and len(p) <= 64 for p in parts[1:]):
            raise InvalidArgument("a DICOMweb source is dicomweb:<archive>/<StudyInstanceUID>/<SeriesInstanceUID>")
        archive = self._archive(parts[0] or "-")
        return _LOCATOR[:-1] + json.dumps({**asdict(archive), "study": parts[1], "series": parts[2]}, sort_keys=True)

    def series_client(self, name: str):
        """(DICOMweb client, study UID, series UID) of a `dicomweb:` source, for use within http_errors()."""
        if not name.startswith(SCHEME):
            raise FailedPrecondition("the slide did not come from a DICOMweb archive")
        self.locate(name)  # the source's shape and archive checked
        archive_name, study, series = name[len(SCHEME) :].split("/")
        return _client(self._archive(archive_name or "-")), study, series

    def case_series(self, archive_name: str, accession: str) -> list[dict[str, str]]:
        """QIDO-RS: the WSI series (modality SM with a VOLUME instance) of the
        studies with this accession number."""
        if not _ACCESSION.match(accession):
            raise InvalidArgument("accession_number must be 1..16 characters, without wildcards (* ?) or backslashes")
        archive = self._archive(archive_name)
        client = _client(archive)
        out = []
        with http_errors():
            found = client.search_for_series(
                search_filters={"AccessionNumber": accession, "Modality": SM},
                fields=[_IDENTIFIERS["container_identifier"]],
                limit=MAX_SERIES_PER_CASE + 1,
            )
            if len(found) > MAX_SERIES_PER_CASE:
                raise InvalidArgument(f"the case has more than {MAX_SERIES_PER_CASE} slide series")
            for s in found:
                study, series = _value(s, "0020000D"), _value(s, "0020000E")
                if not (_UID.match(study) and _UID.match(series)):
                    continue
                instances = client.search_for_instances(study, series, fields=[_IMAGE_TYPE])
                if any(VOLUME in _values(i, _IMAGE_TYPE) for i in instances):
                    out.append(
                        {
                            "source": f"{SCHEME}{archive.name}/{study}/{series}",
                            "study_instance_uid": study,
                            "series_instance_uid": series,
                            "container_identifier": _value(s, _IDENTIFIERS["container_identifier"]),
                        }
                    )
        return out


# -- HTTP ------------------------------------------------------------------------------


class _Session(requests.Session):
    """Every request has a timeout; redirects (which could lead anywhere) are refused."""

    def __init__(self):
        super().__init__()
        self.max_redirects = 0

    def request(self, *args, **kwargs):
        if kwargs.get("timeout") is None:  # dicomweb-client passes timeout=None
            kwargs["timeout"] = HTTP_TIMEOUT_S
        return super().request(*args, **kwargs)


def _credential(archive: Archive) -> tuple[str, str] | None:
    """(kind, secret) of the archive from the credentials file: one line per
    archive, `NAME basic USER:PASSWORD` or `NAME bearer TOKEN` (# comments)."""
    if not archive.credentials_file:
        return None
    try:
        with open(archive.credentials_file, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        raise FailedPrecondition("the DICOMweb credentials file cannot be read") from None
    for line in lines:
        fields = line.split(None, 2)
        if len(fields) == 3 and fields[0] == archive.name and fields[1].lower() in ("basic", "bearer"):
            return fields[1].lower(), fields[2].strip()
    return None


def _client(archive: Archive):
    from dicomweb_client.api import DICOMwebClient

    session = _Session()
    session.verify = archive.ca or True
    cred = _credential(archive)
    if cred and cred[0] == "basic":
        user, _, password = cred[1].partition(":")
        session.auth = (user, password)
    elif cred:
        session.headers["Authorization"] = f"Bearer {cred[1]}"
    client = DICOMwebClient(archive.url, session=session)
    # Its retries (on any error, backing off up to half a minute) would hold a
    # reader; the caller gets UNAVAILABLE at once and retries by its own policy.
    client.set_http_retry_params(retry=False)
    return client


@contextlib.contextmanager
def http_errors():
    """Archive failures as gRPC errors; requests' texts (which hold URLs) are not passed on."""
    try:
        yield
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status == 404:
            raise NotFound("the archive has no such study or series") from None
        if status in (401, 403):
            raise FailedPrecondition("the DICOMweb archive refused the configured credentials") from None
        if status >= 500 or status == 429:
            raise Unavailable(f"the DICOMweb archive answered HTTP {status}; try again later") from None
        raise FailedPrecondition(f"the DICOMweb archive answered HTTP {status}") from None
    except requests.TooManyRedirects:
        raise FailedPrecondition("the DICOMweb archive redirected; configure its final address") from None
    except requests.exceptions.SSLError:
        raise FailedPrecondition("the DICOMweb archive's TLS certificate is not trusted (SMILY_DICOMWEB_CA)") from None
    except requests.RequestException:
        raise Unavailable("the DICOMweb archive cannot be reached; try again later") from None


def _values(item: dict, tag: str) -> list:
    return (item.get(tag) or {}).get("Value") or []


def _value(item: dict, tag: str) -> str:
    values = _values(item, tag)
    return str(values[0]) if values and not isinstance(values[0], dict) else ""


# -- reader side ------------------------------------------------------------------------


class DicomWebSlide:
    """One DICOM WSI series, with the OpenSlide-like members tiling.py reads."""

    def __init__(self, wsi, identifiers: dict[str, str]):
        self._wsi = wsi
        self._levels = sorted(wsi.levels, key=lambda lvl: -lvl.size.width)
        w0, h0 = self._levels[0].size.width, self._levels[0].size.height
        self.dimensions = (w0, h0)
        self.level_dimensions = tuple((lvl.size.width, lvl.size.height) for lvl in self._levels)
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)
        spacing = wsi.mpp  # µm per pixel from the PixelSpacing of the base level
        self.mpp_x = float(spacing.width) if spacing else 0.0
        self.mpp_y = float(spacing.height) if spacing else 0.0
        self.identifiers = identifiers

    @property
    def mpp(self) -> float:
        return (self.mpp_x + self.mpp_y) / 2 if self.mpp_x > 0 and self.mpp_y > 0 else 0.0

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return max((i for i, ds in enumerate(self.level_downsamples) if ds <= downsample), default=0)

    def read_level(self, x: int, y: int, level: int, lw: int, lh: int) -> Image.Image:
        """lw x lh pixels of `level` from level-0 (x, y); white past the edge, like glass."""
        ds = self.level_downsamples[level]
        lx, ly = int(x / ds), int(y / ds)
        width, height = self.level_dimensions[level]
        cw, ch = min(lw, width - lx), min(lh, height - ly)
        out = Image.new("RGB", (lw, lh), "white")
        if cw > 0 and ch > 0:
            with _read_errors():
                part = self._wsi.read_region((lx, ly), self._levels[level].level, (cw, ch))
            out.paste(part.convert("RGB"), (0, 0))
        return out

    def info(self) -> dict:
        ids = self.identifiers
        return {
            **geometry(self),
            "mpp_x": self.mpp_x,
            "mpp_y": self.mpp_y,
            "objective_power": 0.0,
            "vendor": "dicom",
            "fingerprint": hashlib.sha256(
                f"{ids['study_instance_uid']}/{ids['series_instance_uid']}".encode()
            ).hexdigest(),
            "dicom": dict(ids),
        }


@contextlib.contextmanager
def _read_errors():
    from wsidicom.errors import WsiDicomError

    with http_errors():
        try:
            yield
        except WsiDicomError:
            raise FailedPrecondition("the series is not a whole-slide image wsidicom can read") from None


_open: OrderedDict[str, DicomWebSlide] = OrderedDict()
_open_lock = threading.Lock()


def open_series(locator: str) -> DicomWebSlide:
    """The series a locator names, opened once per reader process (a few kept)."""
    with _open_lock:
        slide = _open.get(locator)
        if slide is not None:
            _open.move_to_end(locator)
            return slide
    spec = json.loads(locator[len(SCHEME) :])
    archive = Archive(spec["name"], spec["url"], spec["credentials_file"], spec["ca"], spec["frame_cache_bytes"])
    slide = _open_wsi(archive, spec["study"], spec["series"])
    with _open_lock:
        _open[locator] = slide
        while len(_open) > MAX_OPEN_SERIES:
            _open.popitem(last=False)
    return slide


def _open_wsi(archive: Archive, study: str, series: str) -> DicomWebSlide:
    from wsidicom import WsiDicom, WsiDicomWebClient
    from wsidicom.config import Settings as WsiSettings

    client = _client(archive)
    settings = WsiSettings(
        decoded_frame_cache_size=archive.frame_cache_bytes,
        encoded_frame_cache_size=archive.frame_cache_bytes // 2,
        open_web_threads=4,
    )
    with _read_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on bulk data it does not fetch
        volume = _volume_instance(client, study, series)
        wsi = WsiDicom.open_web(WsiDicomWebClient(client), study, series, settings=settings)
        identifiers = _identifiers(client.retrieve_instance_metadata(study, series, volume), wsi)
    return DicomWebSlide(wsi, identifiers)


def _volume_instance(client, study: str, series: str) -> str:
    instances = client.search_for_instances(study, series, fields=[_IMAGE_TYPE])
    if not instances:  # QIDO answers an unknown study or series with no matches, not 404
        raise NotFound("the archive has no such study or series")
    for item in instances:
        if VOLUME in _values(item, _IMAGE_TYPE):
            return _value(item, "00080018")
    raise FailedPrecondition("the series holds no whole-slide image (no instance with ImageType VOLUME)")


def _identifiers(metadata: dict, wsi) -> dict[str, str]:
    """The allowlisted identifiers of one VOLUME instance's DICOM JSON."""
    ids = {key: _value(metadata, tag) for key, tag in _IDENTIFIERS.items()}
    description = ""
    for specimen in _values(metadata, _SPECIMEN_DESCRIPTION_SEQUENCE):
        description = next((_value(specimen, t) for t in _SPECIMEN_DESCRIPTIONS if _value(specimen, t)), "")
        if description:
            break
    ids["specimen_description"] = description
    ids["stain"] = _stain(wsi)
    return ids


def _stain(wsi) -> str:
    names = []
    for staining in getattr(wsi.metadata.slide, "stainings", None) or []:
        substances = staining.substances
        for s in [substances] if isinstance(substances, str) else substances:
            names.append(s if isinstance(s, str) else s.meaning)
    return ", ".join(dict.fromkeys(names))
