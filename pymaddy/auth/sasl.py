"""Username and password checks as every SASL-serving endpoint does them (maddy's auth.SASLAuth).

smtp/submission, imap and dovecot_sasld share this: auth_map_normalize, then auth_map (a miss
refuses), then each provider in turn (the first that accepts wins, else the last error), all
under the endpoint's auth_throttle. Errors are returned, not raised, so a session can log and
answer them; an unexpected failure of a table or provider counts as temporary.
"""

from __future__ import annotations

from collections.abc import Callable

from pymaddy.auth.base import PlainAuth
from pymaddy.auth.normalize import NormalizeError
from pymaddy.auth.throttle import Throttle, guarded
from pymaddy.mail.errors import AuthError, AuthTemporaryError
from pymaddy.tables.base import Table

__all__ = ["SASLCredentials"]


class SASLCredentials:
    """Mixin for endpoints; they set these attributes (providers and the map once started)."""

    auth: list[PlainAuth]
    auth_normalize: Callable[[str], str]
    auth_map: Table | None
    throttle: Throttle | None

    async def username_for_auth(self, username: str) -> str:
        """auth_map_normalize, then auth_map; raises AuthError on a miss, NormalizeError on junk."""
        username = self.auth_normalize(username)
        if self.auth_map is None:
            return username
        mapped = await self.auth_map.lookup(username)
        if mapped is None:
            raise AuthError("invalid credentials")
        return mapped

    async def check_password(self, user: str, password: str, ip: str = "") -> Exception | None:
        """None when accepted, else AuthError / AuthTemporaryError (Throttled when locked out)."""
        return await guarded(self.throttle, ip, user, lambda: self._check_password(user, password))

    async def _check_password(self, user: str, password: str) -> Exception | None:
        try:
            mapped = await self.username_for_auth(user)
        except (AuthError, NormalizeError) as e:
            return AuthError(f"no auth. provider accepted creds, last err: {e}")
        except Exception as e:
            return AuthTemporaryError(f"auth_map lookup failed: {type(e).__name__}: {e}")
        last: Exception = AuthError("no auth providers")
        for p in self.auth:
            try:
                await p.auth_plain(mapped, password)
                return None
            except (AuthError, AuthTemporaryError) as e:
                last = e
            except Exception as e:
                last = AuthTemporaryError(f"{type(e).__name__}: {e}")
        cls = AuthTemporaryError if isinstance(last, AuthTemporaryError) else AuthError
        return cls(f"no auth. provider accepted creds, last err: {last}")
