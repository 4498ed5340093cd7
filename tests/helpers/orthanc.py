"""A real Orthanc (Debian's orthanc + orthanc-dicomweb) on loopback, and slides
pushed to it as DICOM WSI with OrthancWSIDicomizer (orthanc-wsi)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

PLUGINS = "/usr/share/orthanc/plugins"
DICOMWEB_PLUGIN = os.path.join(PLUGINS, "libOrthancDicomWeb.so")
INSTALL = "apt-get install -y orthanc orthanc-dicomweb orthanc-wsi"
# Fake patient data on every test slide: none of it may leave the archive.
PHI = {
    "PatientName": "DOE^JANE",
    "PatientID": "PID-SECRET-4711",
    "PatientBirthDate": "19610203",
    "ReferringPhysicianName": "WHO^DR",
    "InstitutionName": "SECRET HOSPITAL",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, workdir: str, user: str = "", password: str = "", lua: list[str] = (), extra: dict = None):
        for tool in ("Orthanc", "OrthancWSIDicomizer"):
            if shutil.which(tool) is None:
                pytest.fail(f"{tool} is required: {INSTALL}")
        if not os.path.isfile(DICOMWEB_PLUGIN):
            pytest.fail(f"the Orthanc DICOMweb plugin is required: {INSTALL}")
        self.port, dicom_port = free_port(), free_port()
        self.user, self.password = user, password
        config = {
            "Name": "smily-test",
            "StorageDirectory": os.path.join(workdir, "db"),
            "IndexDirectory": os.path.join(workdir, "db"),
            "HttpPort": self.port,
            "DicomPort": dicom_port,
            "DicomAet": "SMILYTEST",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(user),
            "RegisteredUsers": {user: password} if user else {},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
            "LuaScripts": list(lua),
            **(extra or {}),
        }
        path = os.path.join(workdir, "orthanc.json")
        with open(path, "w") as fh:
            json.dump(config, fh)
        with open(os.path.join(workdir, "orthanc.log"), "wb") as log:
            self.proc = subprocess.Popen(["Orthanc", path], stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = self.url + "/dicom-web"
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"Orthanc did not start; see {workdir}/orthanc.log")
                time.sleep(0.1)

    def get(self, path: str):
        req = urllib.request.Request(self.url + path)
        if self.user:
            import base64

            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def push_slide(self, tiff: str, width: int, height: int, mpp: float, workdir: str, **dataset) -> tuple[str, str]:
        """DICOM WSI of a pyramidal TIFF, with these attributes, into Orthanc; returns (study, series) UIDs.

        ImageType ...\\VOLUME for wsidicom; --max-size 0 keeps each level in one
        instance (no concatenations). The imaged size in mm sets PixelSpacing;
        the slide is square because OrthancWSIDicomizer 1.1 divides the width by
        the rows for the row spacing."""
        assert width == height, "OrthancWSIDicomizer 1.1 swaps the pixel spacings of non-square slides"
        ds = {"ImageType": "ORIGINAL\\PRIMARY\\VOLUME\\NONE", **PHI, **dataset}
        ds_path = os.path.join(workdir, f"dataset-{os.path.basename(tiff)}.json")
        with open(ds_path, "w") as fh:
            json.dump(ds, fh)
        before = set(self.get("/series"))
        args = [
            "OrthancWSIDicomizer",
            "--dataset",
            ds_path,
            "--max-size",
            "0",
            "--imaged-width",
            f"{width * mpp / 1000:.6f}",
            "--imaged-height",
            f"{height * mpp / 1000:.6f}",
            "--orthanc",
            self.url + "/",
        ]
        if self.user:
            args += ["--username", self.user, "--password", self.password]
        subprocess.run(args + [tiff], check=True, capture_output=True, timeout=300)
        (new,) = set(self.get("/series")) - before
        series = self.get(f"/series/{new}")
        study = self.get(f"/studies/{series['ParentStudy']}")
        return study["MainDicomTags"]["StudyInstanceUID"], series["MainDicomTags"]["SeriesInstanceUID"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
