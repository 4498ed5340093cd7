"""`python -m smily.tiler`: the tiler service alone (what its container runs)."""

from smily.common.server import serve
from smily.tiler.server import registration

serve("tiler", registration)
