# shellcheck shell=bash
# The fault suite's machinery (issue 11 item 5): network namespaces, one per host,
# the real beemesh binaries inside them, dedicated Podman services, a sampler of the
# truth (hack/faults/monitor.py) and a cleanup that removes everything on exit.
# Sourced by hack/faults/run.sh; every function here is prefixed bm_.
#
# Hosts: bm-node 10.77.0.1, bm-a1..bm-a3 10.77.0.11..13, each with a veth (eth0 inside,
# bmv-<host> outside) in the bridge bm-br0 (10.77.0.254/24) of the root namespace.
# Agents reach Podman through a Unix socket, which works from any network namespace.
# The agents use a Podman service of their own (BM_PODMAN_SOCK), so that fault (e) can
# kill it without touching the machine's shared service at /run/podman/podman.sock;
# the sampler reads through another one (BM_OBSERVER_SOCK), so that it sees the truth
# while the agents' service is down.

BM_HOSTS=(node a1 a2 a3)
declare -A BM_IP=([node]=10.77.0.1 [a1]=10.77.0.11 [a2]=10.77.0.12 [a3]=10.77.0.13)
BM_BRIDGE=bm-br0
BM_BRIDGE_IP=10.77.0.254
BM_PORT=4001
BM_IMAGE=localhost/busybox:1.35
BM_PREFIX=flt-
BM_FAULTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BM_BIN=${BEEMESH_BIN:-/tmp/faults-target/debug/beemesh}
BM_RUN_DIR=${BM_RUN_DIR:-}
BM_SHM_DIR=
BM_PODMAN_DIR=/run/bm-faults
BM_PODMAN_SOCK=$BM_PODMAN_DIR/podman.sock
BM_OBSERVER_SOCK=$BM_PODMAN_DIR/observer.sock
BM_PODMAN_PID=
BM_OBSERVER_PID=
# Timeouts: "default" runs the node with its defaults (--agent-loss-seconds 9,
# --lease-seconds 15, --fencing-margin-seconds 5, heartbeats every 3 s); "short" with
# 3/6/2 and heartbeats every second (the CI version).
BM_TIMEOUTS=${BM_TIMEOUTS:-default}

# The current fault's mesh.
BM_FAULT=
BM_FDIR=
BM_NODE_PID=
BM_NODE_PEER=
BM_NODE_ADDR=
BM_TOKEN=
BM_MONITOR_PID=
BM_FAULT_T0=
declare -A BM_AGENT_PID=()
declare -A BM_AGENT_PEER=()
declare -A BM_AGENT_ENV=()
BM_MOUNTS=()
BM_FAILURES=()

bm_now() { date +%s.%N; }

bm_log() { printf '%s [%s] %s\n' "$(date +%H:%M:%S.%N | cut -c1-12)" "${BM_FAULT:-suite}" "$*" >&2; }

# A check that did not hold: recorded, printed, and the suite's exit status.
bm_fail() {
  BM_FAILURES+=("${BM_FAULT:-suite}: $*")
  bm_log "CHECK FAILED: $*"
}

bm_die() {
  bm_log "FATAL: $*"
  exit 1
}

bm_elapsed() { # from to -> seconds, one decimal
  awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'
}

# --- network ------------------------------------------------------------------

bm_ns() { printf 'bm-%s' "$1"; }

bm_net_down() {
  local h
  for h in "${BM_HOSTS[@]}"; do
    ip netns del "$(bm_ns "$h")" 2>/dev/null || true
    ip link del "bmv-$h" 2>/dev/null || true
  done
  ip link del "$BM_BRIDGE" 2>/dev/null || true
}

bm_net_up() {
  local h ns
  bm_net_down
  ip link add "$BM_BRIDGE" type bridge
  ip addr add "$BM_BRIDGE_IP/24" dev "$BM_BRIDGE"
  ip link set "$BM_BRIDGE" up
  for h in "${BM_HOSTS[@]}"; do
    ns=$(bm_ns "$h")
    ip netns add "$ns"
    ip link add "bmv-$h" type veth peer name eth0 netns "$ns"
    ip link set "bmv-$h" master "$BM_BRIDGE" up
    ip -n "$ns" addr add "${BM_IP[$h]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
  # The bridge's traffic passes the root namespace's iptables when br_netfilter is
  # loaded (Podman's netavark rules live there): let ours through first.
  iptables -C FORWARD -i "$BM_BRIDGE" -o "$BM_BRIDGE" -j ACCEPT 2>/dev/null ||
    iptables -I FORWARD -i "$BM_BRIDGE" -o "$BM_BRIDGE" -j ACCEPT
  # Reachable: a connection to a closed port is refused at once (no ping here).
  local rc
  for h in a1 a2 a3; do
    rc=0
    ip netns exec "$(bm_ns "$h")" timeout 3 bash -c "exec 3<>/dev/tcp/${BM_IP[node]}/9" 2>/dev/null || rc=$?
    [ "$rc" != 124 ] || bm_die "no route from $h to the node"
  done
}

bm_net_rules_down() {
  while iptables -C FORWARD -i "$BM_BRIDGE" -o "$BM_BRIDGE" -j ACCEPT 2>/dev/null; do
    iptables -D FORWARD -i "$BM_BRIDGE" -o "$BM_BRIDGE" -j ACCEPT
  done
}

# A silent partition: everything into and out of the host's eth0 is dropped in its
# own namespace (loopback, e.g. `beemesh status` inside the node's, still works).
bm_partition() {
  local ns
  ns=$(bm_ns "$1")
  ip netns exec "$ns" iptables -I INPUT -i eth0 -j DROP
  ip netns exec "$ns" iptables -I OUTPUT -o eth0 -j DROP
}

bm_heal() {
  local ns
  ns=$(bm_ns "$1")
  ip netns exec "$ns" iptables -D INPUT -i eth0 -j DROP
  ip netns exec "$ns" iptables -D OUTPUT -o eth0 -j DROP
}

# --- Podman services ------------------------------------------------------------

bm_ping_sock() {
  curl -fsS --max-time 2 --unix-socket "$1" http://d/v4.0.0/libpod/_ping >/dev/null 2>&1
}

# Starts `podman system service` on a socket; prints its pid.
bm_start_service() {
  local sock=$1 log=$2 pid
  rm -f "$sock"
  podman system service --time=0 "unix://$sock" >>"$log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do
    bm_ping_sock "$sock" && break
    sleep 0.1
  done
  bm_ping_sock "$sock" || bm_die "podman service on $sock did not come up (see $log)"
  echo "$pid"
}

bm_podman_up() {
  command -v podman >/dev/null || bm_die "podman is missing: bash hack/install-podman.sh"
  podman image exists "$BM_IMAGE" || bm_die "$BM_IMAGE is missing: bash hack/build-test-image.sh"
  mkdir -p "$BM_PODMAN_DIR"
  BM_PODMAN_PID=$(bm_start_service "$BM_PODMAN_SOCK" "$BM_RUN_DIR/podman-service.log")
  BM_OBSERVER_PID=$(bm_start_service "$BM_OBSERVER_SOCK" "$BM_RUN_DIR/observer-service.log")
}

# Fault (e): SIGKILL the agents' Podman service (its containers live on under conmon).
bm_podman_kill() {
  [ -n "$BM_PODMAN_PID" ] && kill -KILL "$BM_PODMAN_PID" 2>/dev/null
  wait "$BM_PODMAN_PID" 2>/dev/null || true
  BM_PODMAN_PID=
}

bm_podman_restart() {
  BM_PODMAN_PID=$(bm_start_service "$BM_PODMAN_SOCK" "$BM_RUN_DIR/podman-service.log")
}

bm_podman_down() {
  local pid
  for pid in "$BM_PODMAN_PID" "$BM_OBSERVER_PID"; do
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  BM_PODMAN_PID="" BM_OBSERVER_PID=""
  rm -f "$BM_PODMAN_SOCK" "$BM_OBSERVER_SOCK"
}

# --- the mesh -------------------------------------------------------------------

bm_node_flags() {
  case $BM_TIMEOUTS in
    default) ;;
    short) echo "--agent-loss-seconds 3 --lease-seconds 6 --fencing-margin-seconds 2" ;;
    *) bm_die "BM_TIMEOUTS is default or short, not $BM_TIMEOUTS" ;;
  esac
}

bm_agent_flags() {
  [ "$BM_TIMEOUTS" = short ] && echo "--heartbeat-seconds 1"
  true
}

# The figures the node runs with (for reports).
bm_timeouts_text() {
  case $BM_TIMEOUTS in
    default) echo "defaults: agent-loss 6 s, lease 15 s, margin 5 s, heartbeat 2 s" ;;
    short) echo "short: agent-loss 3 s, lease 6 s, margin 2 s, heartbeat 1 s" ;;
  esac
}

# A fresh mesh for one fault: directories, the node's identity and a join token.
bm_mesh_init() {
  BM_FAULT=$1
  BM_FDIR=$BM_RUN_DIR/$BM_FAULT
  BM_FAULT_T0=$(bm_now)
  mkdir -p "$BM_FDIR/node" "$BM_FDIR/manifests" "$BM_SHM_DIR/$BM_FAULT"
  BM_NODE_PEER=$("$BM_BIN" id --state-dir "$BM_FDIR/node")
  BM_NODE_ADDR=/ip4/${BM_IP[node]}/tcp/$BM_PORT/p2p/$BM_NODE_PEER
  BM_TOKEN=$("$BM_BIN" token create --state-dir "$BM_FDIR/node")
  BM_AGENT_PID=() BM_AGENT_PEER=() BM_AGENT_ENV=()
  : >"$BM_FDIR/agents"
  printf '%s\n' "$(bm_status_cmd)" >"$BM_FDIR/status-cmd"
}

bm_node_start() {
  local flags
  read -r -a flags <<<"$(bm_node_flags)"
  ip netns exec "$(bm_ns node)" env RUST_LOG=info,beemesh=debug "$BM_BIN" node \
    --state-dir "$BM_FDIR/node" \
    --listen "/ip4/${BM_IP[node]}/tcp/$BM_PORT" \
    --pod-manifest-path "$BM_FDIR/manifests" \
    --metrics-addr "${BM_IP[node]}:9100" \
    "${flags[@]}" \
    >>"$BM_FDIR/node.out" 2>>"$BM_FDIR/node.log" &
  BM_NODE_PID=$!
  bm_log "node started (pid $BM_NODE_PID, $BM_NODE_PEER)"
}

bm_node_kill() {
  [ -n "$BM_NODE_PID" ] || return 0
  kill -KILL "$BM_NODE_PID" 2>/dev/null || true
  wait "$BM_NODE_PID" 2>/dev/null || true
  BM_NODE_PID=
}

# bm_agent_start a1: starts (or restarts, same state) an agent. BM_AGENT_ENV[a1] may
# hold extra environment (e.g. LD_PRELOAD for libfaketime).
bm_agent_start() {
  local a=$1 state flags envs=()
  state=$BM_FDIR/$a/state
  mkdir -p "$state" "$BM_SHM_DIR/$BM_FAULT/$a"
  if [ -z "${BM_AGENT_PEER[$a]:-}" ]; then
    BM_AGENT_PEER[$a]=$("$BM_BIN" id --state-dir "$state")
    echo "$a ${BM_AGENT_PEER[$a]}" >>"$BM_FDIR/agents"
  fi
  read -r -a flags <<<"$(bm_agent_flags)"
  [ -n "${BM_AGENT_ENV[$a]:-}" ] && read -r -a envs <<<"${BM_AGENT_ENV[$a]}"
  ip netns exec "$(bm_ns "$a")" env RUST_LOG=info,beemesh=debug "${envs[@]}" "$BM_BIN" agent \
    --state-dir "$state" \
    --listen "/ip4/${BM_IP[$a]}/tcp/$BM_PORT" \
    --bootstrap "$BM_NODE_ADDR" \
    --join "$BM_TOKEN" \
    --secrets-dir "$BM_SHM_DIR/$BM_FAULT/$a" \
    --podman-socket "unix://$BM_PODMAN_SOCK" \
    --metrics-addr "${BM_IP[$a]}:9101" \
    --label "host=$a" \
    "${flags[@]}" \
    >>"$BM_FDIR/$a.out" 2>>"$BM_FDIR/$a.log" &
  BM_AGENT_PID[$a]=$!
  bm_log "agent $a started (pid ${BM_AGENT_PID[$a]}, ${BM_AGENT_PEER[$a]})"
}

bm_agent_kill() {
  local a=$1 pid=${BM_AGENT_PID[$1]:-}
  [ -n "$pid" ] || return 0
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  BM_AGENT_PID[$a]=
}

bm_mesh_start() { # agents...
  local a
  bm_node_start
  for a in "$@"; do bm_agent_start "$a"; done
  bm_wait_agents "$#" 60 || bm_die "the node does not see $# agents"
}

bm_status_cmd() {
  printf '%q ' ip netns exec "$(bm_ns node)" "$BM_BIN" status -o json --timeout-seconds 5 \
    --bootstrap "$BM_NODE_ADDR" --client-key "$BM_FDIR/node/client.key"
}

# `beemesh status -o json` against the node, from inside its namespace.
bm_status() {
  ip netns exec "$(bm_ns node)" "$BM_BIN" status -o json --timeout-seconds 5 \
    --bootstrap "$BM_NODE_ADDR" --client-key "$BM_FDIR/node/client.key" 2>/dev/null
}

bm_wait_agents() { # count timeout
  local want=$1 deadline=$((SECONDS + $2)) n
  while [ "$SECONDS" -lt "$deadline" ]; do
    n=$(bm_status | python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("agents") or []))' 2>/dev/null || echo 0)
    [ "$n" -ge "$want" ] && return 0
    sleep 1
  done
  return 1
}

# Processes of this run that outlive their parent: the agents' fence watchdogs (own
# process group, reparented). Found by this run's unique secrets directory.
bm_stray_pids() {
  local p cmd
  for p in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
    case $cmd in
      *"$BM_SHM_DIR/"*) echo "${p#/proc/}" ;;
    esac
  done
}

# Podman pods of this fault's agents.
bm_our_podman_pods() {
  local a
  for a in "${!BM_AGENT_PEER[@]}"; do
    podman pod ps -q --filter "label=io.beemesh.agent=${BM_AGENT_PEER[$a]}"
  done
}

# Stops the fault's processes, removes its Podman pods and mounts.
bm_mesh_stop() {
  local a p pods m
  bm_monitor_stop
  bm_node_kill
  for a in "${!BM_AGENT_PID[@]}"; do bm_agent_kill "$a"; done
  for p in $(bm_stray_pids); do kill -KILL "$p" 2>/dev/null || true; done
  pods=$(bm_our_podman_pods)
  if [ -n "$pods" ]; then
    # shellcheck disable=SC2086 # one id a word
    podman pod rm -f -t 0 $pods >/dev/null 2>&1 || true
  fi
  for m in "${BM_MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  BM_MOUNTS=()
}

# --- pods -----------------------------------------------------------------------

# bm_pod NAME strict|relaxed [spec lines] [container lines]: writes one manifest
# (atomically: the node never reads half a file).
bm_pod() {
  local name=$1 fencing=$2 extra=${3:-} cextra=${4:-} tmp
  tmp=$BM_FDIR/.$name.tmp
  cat >"$tmp" <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $name
  annotations: {beemesh.io/fencing: $fencing}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: $BM_IMAGE
    imagePullPolicy: IfNotPresent
    command: ["sleep", "1000000"]
    resources: {requests: {cpu: 10m, memory: 8Mi}}
$cextra
$extra
EOF
  mv "$tmp" "$BM_FDIR/manifests/$name.yaml"
}

# bm_pods RELAXED STRICT: flt-r-NNN and flt-s-NNN.
bm_pods() {
  local i
  for ((i = 1; i <= $1; i++)); do bm_pod "$(printf '%sr-%03d' "$BM_PREFIX" "$i")" relaxed; done
  for ((i = 1; i <= $2; i++)); do bm_pod "$(printf '%ss-%03d' "$BM_PREFIX" "$i")" strict; done
}

bm_unpod() { rm -f "$BM_FDIR/manifests/$1.yaml"; }

# --- the sampler ----------------------------------------------------------------

bm_monitor_start() {
  python3 "$BM_FAULTS_DIR/monitor.py" watch \
    --socket "$BM_OBSERVER_SOCK" --prefix "$BM_PREFIX" --dir "$BM_FDIR" \
    --events-since "$BM_FAULT_T0" \
    >>"$BM_FDIR/monitor.log" 2>&1 &
  BM_MONITOR_PID=$!
  for _ in $(seq 1 50); do
    [ -s "$BM_FDIR/state.json" ] && return 0
    sleep 0.1
  done
  bm_die "the monitor did not start (see $BM_FDIR/monitor.log)"
}

bm_monitor_stop() {
  [ -n "$BM_MONITOR_PID" ] || return 0
  kill -TERM "$BM_MONITOR_PID" 2>/dev/null || true
  wait "$BM_MONITOR_PID" 2>/dev/null || true
  BM_MONITOR_PID=
}

# bm_mark LABEL [key=value ...]: a moment the analysis measures from; prints its time.
bm_mark() {
  local t
  t=$(bm_now)
  echo "$t $*" >>"$BM_FDIR/marks"
  bm_log "mark: $*"
  echo "$t"
}

# bm_wait_converged SINCE TIMEOUT: until every wanted pod runs exactly once (Podman),
# with nothing else of ours left, and the node's status (asked after SINCE) agrees:
# each Running where it runs, none Terminating. Prints the time it first held.
bm_wait_converged() {
  python3 "$BM_FAULTS_DIR/monitor.py" wait --dir "$BM_FDIR" --since "$1" --timeout "$2"
}

# bm_analyze [options]: the fault's figures (printed, and kept in report.json).
bm_analyze() {
  python3 "$BM_FAULTS_DIR/monitor.py" analyze --dir "$BM_FDIR" "$@"
}

# --- the whole run ----------------------------------------------------------------

bm_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  bm_mesh_stop
  bm_podman_down
  bm_net_rules_down
  bm_net_down
  [ -n "$BM_SHM_DIR" ] && rm -rf "$BM_SHM_DIR"
  # The run's own leftovers, checked: namespaces, processes, Podman pods.
  local left
  left=$(ip netns list | grep -c '^bm-' || true)
  [ "$left" = 0 ] || bm_log "LEFT BEHIND: $left network namespaces"
  exit "$rc"
}

bm_setup() {
  [ "$(id -u)" = 0 ] || bm_die "run as root (network namespaces)"
  [ -x "$BM_BIN" ] || bm_die "no beemesh binary at $BM_BIN (set BEEMESH_BIN or build)"
  [ -n "$BM_RUN_DIR" ] || BM_RUN_DIR=$(mktemp -d /tmp/bm-faults.XXXXXX)
  mkdir -p "$BM_RUN_DIR"
  BM_SHM_DIR=$(mktemp -d /dev/shm/bm-faults.XXXXXX)
  trap bm_cleanup EXIT
  trap 'exit 130' INT TERM
  bm_net_up
  bm_podman_up
  bm_log "run directory $BM_RUN_DIR; binary $BM_BIN; $(bm_timeouts_text)"
}
