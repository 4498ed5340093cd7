"""What tests share beyond conftest's fixtures: process launchers, a test PKI, an OIDC
provider, Orthanc, PostgreSQL, synthetic files, and the bounded waits every test uses."""
