"""MTA-STS (RFC 8461): policy and TXT record parsing, HTTPS policy fetch, policy cache.

A protocol library: it never reads server configuration. `mx_auth.mtasts`
(pymaddy/targets/policies.py) adapts it to target.remote.
"""

from __future__ import annotations

from pymaddy.mtasts.cache import Cache, FSStore, RAMStore, Store
from pymaddy.mtasts.fetch import FetchError, fetch_policy
from pymaddy.mtasts.policy import MODES, NoPolicy, Policy, PolicyError, match_mx, parse_policy, parse_txt

__all__ = [
    "MODES",
    "Cache",
    "FSStore",
    "FetchError",
    "NoPolicy",
    "Policy",
    "PolicyError",
    "RAMStore",
    "Store",
    "fetch_policy",
    "match_mx",
    "parse_policy",
    "parse_txt",
]
