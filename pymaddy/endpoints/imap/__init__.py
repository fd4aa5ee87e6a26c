"""The imap endpoint: an IMAP4rev1 server over storage.imapsql."""
