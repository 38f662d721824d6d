"""helora aggregator service."""
