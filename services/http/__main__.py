"""`python -m smily.http`: the HTTP/JSON API, IIIF tiles and the viewer (what its container runs)."""

from smily.http.server import serve

serve()
