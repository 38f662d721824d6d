"""The RabbitMQ runtime the services share (DESIGN §4): the topology and the service shell
(``amqp``), pika's body frames without copies (``pikaframes``, pinned to the pika version in the
``broker`` extra) and the services' Prometheus metrics and health endpoints (``metrics``).
Handlers never import this package (``tests/test_layering.py``)."""
