"""Checks: per-message policy (spf, dkim, dnsbl, milter, rspamd, command, authorize_sender, …)."""
