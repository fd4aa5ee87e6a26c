"""Modifiers: envelope and header rewriting (dkim signing, replace_rcpt, replace_sender)."""
