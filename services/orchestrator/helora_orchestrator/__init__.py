"""helora orchestrator: the data owner's client."""
