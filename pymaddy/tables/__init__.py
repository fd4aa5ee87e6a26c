"""Tables: key → values lookups (static, file, regexp, chain, sql, identity, …)."""
