"""The milter protocol (Sendmail's mail filter API), MTA side."""
