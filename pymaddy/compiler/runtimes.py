"""Which modules have an implementation, and where: "package.module:Class".

One list, so it is plain to see what `pymaddy run` can start; a schema may
also name its runtime itself (ModuleSchema.runtime), which takes precedence.
A module absent from both makes `run` refuse the config with FILE:LINE.
tests/unit/test_runtimes.py imports every entry, so a name here that does not
resolve fails the suite.
"""

from __future__ import annotations

RUNTIMES: dict[str, str] = {
    # endpoints
    "smtp": "pymaddy.endpoints.smtp:SMTPEndpoint",
    "submission": "pymaddy.endpoints.smtp:SMTPEndpoint",
    "lmtp": "pymaddy.endpoints.smtp:SMTPEndpoint",
    "imap": "pymaddy.endpoints.imap.endpoint:IMAPEndpoint",
    "dovecot_sasld": "pymaddy.endpoints.dovecot_sasld:DovecotSASLD",
    # pipeline and groups
    "msgpipeline": "pymaddy.pipeline.msgpipeline:MsgPipeline",
    "checks": "pymaddy.pipeline.groups:CheckGroup",
    "modifiers": "pymaddy.pipeline.groups:ModifierGroup",
    "limits": "pymaddy.pipeline.limits:Limits",
    "dummy": "pymaddy.pipeline.dummy:Dummy",
    # tables
    "table.static": "pymaddy.tables.static:StaticTable",
    "table.file": "pymaddy.tables.file:FileTable",
    "table.regexp": "pymaddy.tables.regexp:RegexpTable",
    "table.chain": "pymaddy.tables.chain:ChainTable",
    "table.identity": "pymaddy.tables.simple:IdentityTable",
    "table.email_localpart": "pymaddy.tables.simple:EmailLocalpartTable",
    "table.email_localpart_optional": "pymaddy.tables.simple:EmailLocalpartOptionalTable",
    "table.email_with_domain": "pymaddy.tables.simple:EmailWithDomainTable",
    "table.sql_query": "pymaddy.tables.sql:SQLQueryTable",
    "table.sql_table": "pymaddy.tables.sql:SQLTable",
    # modifiers
    "modify.replace_rcpt": "pymaddy.modify.replace:ReplaceRcpt",
    "modify.replace_sender": "pymaddy.modify.replace:ReplaceSender",
    "modify.dkim": "pymaddy.modify.dkim:DKIMSigner",
    # auth
    "auth.pass_table": "pymaddy.auth.pass_table:PassTable",
    "auth.plain_separate": "pymaddy.auth.plain_separate:PlainSeparate",
    "auth.ldap": "pymaddy.auth.ldap:LDAPAuth",
    "table.ldap": "pymaddy.auth.ldap:LDAPAuth",
    "auth.external": "pymaddy.auth.external:ExternalAuth",
    "auth.pam": "pymaddy.auth.external:PAMAuth",
    "auth.shadow": "pymaddy.auth.external:ShadowAuth",
    "dovecot_sasl": "pymaddy.auth.dovecot_sasl:DovecotSASLAuth",
    # checks
    "check.authorize_sender": "pymaddy.checks.authorize_sender:AuthorizeSender",
    "check.dkim": "pymaddy.checks.dkim:DKIMCheck",
    "check.spf": "pymaddy.checks.spf:SPFCheck",
    "check.dnsbl": "pymaddy.checks.dnsbl:DNSBL",
    "check.command": "pymaddy.checks.command:CommandCheck",
    "check.milter": "pymaddy.checks.milter:MilterCheck",
    "check.rspamd": "pymaddy.checks.rspamd:RspamdCheck",
    "require_mx_record": "pymaddy.checks.dns_checks:RequireMXRecord",
    "require_matching_rdns": "pymaddy.checks.dns_checks:RequireMatchingRDNS",
    "require_tls": "pymaddy.checks.require_tls:RequireTLS",
    # storage
    "storage.imapsql": "pymaddy.storage.imapsql:IMAPSQL",
    "target.imapsql": "pymaddy.storage.imapsql:IMAPSQL",
    "storage.blob.fs": "pymaddy.storage.blob_fs:FSBlobStore",
    "imap.filter.command": "pymaddy.storage.imapfilter:CommandFilter",
    "imap_filters": "pymaddy.storage.imapfilter:FilterGroup",
    # targets
    "target.smtp": "pymaddy.targets.smtp:SMTPTarget",
    "target.lmtp": "pymaddy.targets.smtp:LMTPTarget",
    "target.queue": "pymaddy.queue.target:QueueTarget",
    "target.remote": "pymaddy.targets.remote:RemoteTarget",
    "mx_auth": "pymaddy.targets.policies:PolicyGroup",
    "mx_auth.mtasts": "pymaddy.targets.policies:MTASTSPolicy",
    "mx_auth.dane": "pymaddy.targets.policies:DANEPolicy",
    "mx_auth.dnssec": "pymaddy.targets.policies:DNSSECPolicy",
    "mx_auth.local_policy": "pymaddy.targets.policies:LocalPolicy",
    "mx_auth.sts_preload": "pymaddy.targets.policies:STSPreloadPolicy",
    # TLS
    "tls.loader.file": "pymaddy.tls.loaders:FileLoader",
    "tls.loader.self_signed": "pymaddy.tls.loaders:SelfSignedLoader",
}

# Modules maddy has and pymaddy deliberately does not: `run` names the reason instead of
# "not implemented yet" (check-config still accepts them, so a maddy config validates).
UNSUPPORTED: dict[str, str] = {
    "auth.netauth": "NetAuth has no maintained Python client; use auth.ldap or auth.external with a helper",
    "table.netauth": "NetAuth has no maintained Python client; use table.ldap or table.sql_query",
}
