def make_key(key: str, key_prefix: str, version: int) -> str:
    """Keep ADR-012's key names literal in Redis (agent:beliefs:{id}); a prefix, when
    configured, namespaces them (tests use one). Cache versions are not used."""
    return f"{key_prefix}:{key}" if key_prefix else key
