"""`python -m smily.embedder`: the embedder service alone (what its container runs)."""

from smily.common.server import serve
from smily.embedder.server import registration

serve("embedder", registration)
