#!/usr/bin/env bash
# What the tests need outside the venv, each done only when missing: RabbitMQ answering on
# 127.0.0.1:5672 (the broker integration tests), the Debian package prometheus and RabbitMQ's
# Prometheus plugin (the dashboard check, tests/deploy/test_dashboard_prometheus.py).
# Non-interactive; installing prometheus needs root (or run: sudo apt-get install -y prometheus).
set -euo pipefail

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! broker_up; then
  command -v rabbitmq-server >/dev/null || { echo "RabbitMQ is not installed (apt-get install -y rabbitmq-server)" >&2; exit 1; }
  echo "RabbitMQ is not answering on 127.0.0.1:5672; starting it"
  rabbitmq-server -detached || true
  for _ in $(seq 1 60); do broker_up && break; sleep 2; done
  broker_up || { echo "RabbitMQ did not come up on 127.0.0.1:5672" >&2; exit 1; }
fi

if ! command -v prometheus >/dev/null; then
  command -v apt-get >/dev/null || { echo "prometheus is missing and apt-get is not available" >&2; exit 1; }
  [ "$(id -u)" = 0 ] || { echo "prometheus is missing: sudo apt-get install -y prometheus" >&2; exit 1; }
  echo "installing the Debian package prometheus"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# RabbitMQ's own Prometheus endpoint (:15692, queue depth on the dashboard); already on: a no-op
rabbitmq-plugins enable --quiet rabbitmq_prometheus >/dev/null \
  || echo "warning: could not enable rabbitmq_prometheus (the dashboard check will say so)" >&2
