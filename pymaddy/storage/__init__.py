"""Mail storage (storage.imapsql) and blob stores (fs, s3)."""
