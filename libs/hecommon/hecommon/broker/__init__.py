"""The RabbitMQ runtime the services share (DESIGN §4): the names of a deployment
(``topology``), what every service's configuration shares (``config``: ``ServiceConfig``, the
broker and metrics flags), the service shell
(``amqp``: connection, threads, acks, dead letters, signals), pika's body frames without copies
(``pikaframes``, pinned to the pika version in the ``broker`` extra) and the services' Prometheus
metrics and health endpoints (``metrics``). Handlers never import this package
(``tests/test_layering.py``)."""
