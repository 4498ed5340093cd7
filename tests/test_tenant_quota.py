"""Issue 24: SMILY_MAX_RPCS_PER_TENANT, one tenant's calls in flight counted apart from the others'."""

from __future__ import annotations

import sys

import pytest

from smily.common.errors import Busy
from smily.common.server import Admission


def test_a_tenant_at_its_quota_is_refused_while_another_is_served():
    quota = Admission(sys.maxsize, 2, who="tenant")
    held = [quota.enter("gateway", None, "site-a") for _ in range(2)]
    with pytest.raises(Busy, match="this tenant has 2 requests in flight"):
        quota.enter("gateway", None, "site-a")
    other = quota.enter("gateway", None, "site-b")  # site-a's load takes nothing from site-b
    quota.leave(held.pop())
    held.append(quota.enter("gateway", None, "site-a"))  # a slot freed is site-a's again
    for key in [*held, other]:
        quota.leave(key)
