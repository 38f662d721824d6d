"""helora encoder service."""
