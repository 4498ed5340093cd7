"""`python -m smily.index`: the index service alone (what its container runs)."""

from smily.common.server import serve
from smily.index.server import registration

serve("index", registration)
