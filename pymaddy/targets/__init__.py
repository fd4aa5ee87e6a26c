"""Delivery targets (remote, queue, smtp, lmtp) and MX authentication policies."""
