"""Authentication providers (pass_table, ldap, external, pam, shadow, plain_separate, dovecot_sasl)."""
