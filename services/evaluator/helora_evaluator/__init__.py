"""helora evaluator service."""
