"""The operator's tools, apart from the training client: ``helora up`` (a local fleet of the
services on one machine, ``up``) and ``helora status`` (a deployed server on Kubernetes, ``status``).
Neither touches keys, data or LoRA weights; the training client imports neither."""
