#!/usr/bin/env bash
# Installs Podman with the configuration verified on small VMs and sandboxes (runc,
# cgroupfs, file event logging, ulimits within the sandbox's limits) and starts its
# REST service on the socket BeeMesh agents use. Idempotent: a reused machine keeps its
# packages, config and service.
# --no-service: packages and config only, for machines where systemd's podman.socket
# serves the API instead (hack/install-agent.sh).
set -euo pipefail

SOCKET_PATH=${BEEMESH_PODMAN_SOCKET_PATH:-/run/podman/podman.sock}
start_service=1
case "${1:-}" in
  "") ;;
  --no-service) start_service=0 ;;
  *) echo "install-podman.sh: unknown argument $1 (only --no-service)" >&2; exit 1 ;;
esac

need_install=0
for bin in podman runc conmon curl iptables nft; do
  command -v "$bin" >/dev/null 2>&1 || need_install=1
done
if [ "$need_install" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # runc named explicitly: apt would otherwise pick crun, which fails here;
  # iptables is what netavark sets up bridge networking (pods with ports) with; nft is
  # what agents redirect their pods' connections to cluster Services with.
  apt-get install -y -qq podman runc catatonit netavark aardvark-dns buildah busybox-static \
    fuse-overlayfs slirp4netns uidmap curl iproute2 iptables nftables >/dev/null
fi

ping_service() {
  curl -fsS --max-time 2 --unix-socket "$SOCKET_PATH" http://d/v4.0.0/libpod/_ping >/dev/null 2>&1
}

# crun fails here (hybrid cgroups) and the default ulimits exceed the sandbox's
# hard limits; setting one ulimit on a container drops both defaults, so both are set.
# A pod takes three locks (pod, infra container, container): the default 2,048 stops
# one Podman at 682 pods, short of the 1,000-pod burst benchmark.
mkdir -p /etc/containers
conf=/etc/containers/containers.conf
want='[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
num_locks = 8192'
if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
  printf '%s\n' "$want" >"$conf"
  # A running service keeps the old configuration, and a new lock count takes effect
  # only through a renumber, which wants no other Podman process running. Podman 4.3's
  # renumber fails on the old lock segment instead of replacing it, so it goes first.
  if ping_service; then
    pkill -f "podman system service" || true
    for _ in $(seq 1 50); do ping_service || break; sleep 0.2; done
  fi
  rm -f /dev/shm/libpod_lock
  podman system renumber
fi

if [ "$start_service" = 0 ]; then
  echo "podman $(podman --version | awk '{print $3}') installed and configured (REST service not started)"
  exit 0
fi

# A second service on the same socket silently takes it over: ping first.
if ! ping_service; then
  mkdir -p "$(dirname "$SOCKET_PATH")"
  rm -f "$SOCKET_PATH"
  # In a session of its own: a Ctrl-C meant for the script that installed it (the
  # quickstart, say) must not reach the service.
  setsid nohup podman system service --time=0 "unix://$SOCKET_PATH" </dev/null \
    >/var/log/podman-service.log 2>&1 &
  for _ in $(seq 1 50); do
    ping_service && break
    sleep 0.2
  done
  ping_service || { echo "podman service did not come up on $SOCKET_PATH; see /var/log/podman-service.log" >&2; exit 1; }
fi
echo "podman $(podman version --format '{{.Server.Version}}' 2>/dev/null || echo '?') serving on unix://$SOCKET_PATH"
