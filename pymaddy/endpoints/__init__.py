"""Endpoints: listeners that speak a protocol (smtp, submission, lmtp, imap, openmetrics, dovecot_sasld)."""
