#!/usr/bin/env bash
# What `make images` needs on the host, each installed only when missing: podman (with runc; crun
# refuses the hybrid cgroups of machines like CI's) and mmdebstrap (the base image, no registry).
# Debian 12, non-interactive; installing needs root (or: sudo apt-get install -y podman runc mmdebstrap).
set -euo pipefail

missing=()
for tool in podman runc mmdebstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
[ ${#missing[@]} = 0 ] && exit 0
command -v apt-get >/dev/null || { echo "missing ${missing[*]} and apt-get is not available" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "missing ${missing[*]}: sudo apt-get install -y ${missing[*]}" >&2; exit 1; }
echo "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq "${missing[@]}" >/dev/null
