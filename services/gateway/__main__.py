"""`python -m smily.gateway`: the gateway service alone (what its container runs)."""

from smily.common.server import serve
from smily.gateway.server import registration

serve("gateway", registration)
