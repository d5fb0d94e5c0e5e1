#!/usr/bin/env bash
# Installs a BeeMesh agent on a worker machine, as root, from a checkout of this
# repository. Idempotent: a second run changes nothing and says so.
#
#   hack/install-agent.sh [--bootstrap MULTIADDR]... [--join TOKEN] [--binary PATH]
#                         [--root DIR]
#
#   --bootstrap MULTIADDR  mesh peer to join through, written into the env file when
#                          it is first created (repeatable)
#   --join TOKEN           the node's join token (`beemesh token create`, or the chart's
#                          NOTES): written into the env file (made 0600), and removed
#                          from it once the agent has joined and pinned the node
#   --binary PATH          the beemesh binary to install (default:
#                          ${CARGO_TARGET_DIR:-target}/dist/beemesh, built with
#                          cargo --profile dist if absent)
#   --root DIR             install into the tree under DIR instead of / (for testing or
#                          image building): no Podman, no systemctl
#
# What it does: Podman with this project's containers.conf (hack/install-podman.sh);
# /usr/local/bin/beemesh; /etc/systemd/system/beemesh-agent.service; the example
# /etc/beemesh/agent.env only if there is none (a user's configuration is never
# overwritten); /var/lib/beemesh (mode 0700). When systemd is PID 1 it enables and
# starts podman.socket and the agent (restarting it when its binary or unit changed);
# otherwise it prints the command that starts the agent by hand.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)

die() {
  echo "install-agent.sh: $*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

root=/
binary=
bootstrap=
join=
while [ $# -gt 0 ]; do
  case "$1" in
    --bootstrap)
      [ $# -ge 2 ] || die "--bootstrap needs a multiaddr"
      case "$2" in
        /*) ;;
        *) die "--bootstrap $2 is not a multiaddr (e.g. /ip4/10.0.0.5/tcp/4001/p2p/12D3KooW...)" ;;
      esac
      bootstrap=${bootstrap:+$bootstrap,}$2
      shift 2
      ;;
    --join)
      [ $# -ge 2 ] || die "--join needs a token"
      printf '%s' "$2" | grep -qE '^[a-z0-9]{6}\.[a-z0-9]{16}$' ||
        die "--join $2 is not a join token (like abcdef.0123456789abcdef)"
      join=$2
      shift 2
      ;;
    --binary)
      [ $# -ge 2 ] || die "--binary needs a path"
      binary=$2
      shift 2
      ;;
    --root)
      [ $# -ge 2 ] || die "--root needs a directory"
      root=$2
      shift 2
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

if [ "$root" = / ]; then
  [ "$(id -u)" = 0 ] || die "run as root (or use --root DIR to install into a directory tree)"
  dest=
else
  mkdir -p "$root"
  dest=$(cd "$root" && pwd)
fi

changed=0
# Set when the agent must restart to run what was installed.
restart_needed=0

# Installs $1 as $2 with mode $3 when the content or mode differs. Returns 1 if it was
# already so. Called in && lists, where set -e does not apply: failures are explicit.
install_file() {
  if cmp -s "$1" "$2" && [ "$(stat -c %a "$2")" = "$3" ]; then
    echo "unchanged: ${2#"$dest"}"
    return 1
  fi
  install -D -m "$3" "$1" "$2" || die "cannot install $2"
  echo "installed: ${2#"$dest"}"
  changed=1
}

# Podman: packages and containers.conf come from install-podman.sh. Under systemd,
# podman.socket serves the API (enabled below); without it, install-podman.sh starts
# the service by hand, as on this project's development machines.
systemd=0
[ -d /run/systemd/system ] && systemd=1
if [ -n "$dest" ]; then
  echo "skipped: Podman (--root: install it on the target with hack/install-podman.sh)"
elif [ "$systemd" = 1 ]; then
  bash "$repo/hack/install-podman.sh" --no-service
else
  bash "$repo/hack/install-podman.sh"
fi

if [ -z "$binary" ]; then
  binary=${CARGO_TARGET_DIR:-$repo/target}/dist/beemesh
  if [ ! -e "$binary" ]; then
    command -v cargo >/dev/null 2>&1 || die "$binary is absent and cargo is not installed: build it elsewhere and pass --binary PATH"
    echo "building $binary"
    (cd "$repo" && cargo build --profile dist --locked)
  fi
fi
if [ ! -f "$binary" ] || [ ! -x "$binary" ]; then
  die "$binary is not an executable file"
fi
# A binary that cannot run here (wrong architecture, missing libraries) fails now
# rather than at every start of the unit.
"$binary" --version >/dev/null || die "$binary does not run on this machine"

install_file "$binary" "$dest/usr/local/bin/beemesh" 755 && restart_needed=1
unit_changed=0
install_file "$repo/packaging/systemd/beemesh-agent.service" \
  "$dest/etc/systemd/system/beemesh-agent.service" 644 && unit_changed=1 && restart_needed=1

env_file=$dest/etc/beemesh/agent.env
if [ -e "$env_file" ]; then
  echo "kept: /etc/beemesh/agent.env (existing configuration is never overwritten)"
  if [ -n "$bootstrap" ] && ! grep -qxF "BEEMESH_BOOTSTRAP=$bootstrap" "$env_file"; then
    echo "note: --bootstrap not applied; set BEEMESH_BOOTSTRAP=$bootstrap in /etc/beemesh/agent.env yourself" >&2
  fi
else
  mkdir -p "$(dirname "$env_file")"
  # The multiaddr goes through the environment: awk -v would interpret backslashes.
  BOOTSTRAP=$bootstrap awk '
    ENVIRON["BOOTSTRAP"] != "" && /^#BEEMESH_BOOTSTRAP=/ { print "BEEMESH_BOOTSTRAP=" ENVIRON["BOOTSTRAP"]; next }
    { print }' "$repo/packaging/systemd/agent.env" >"$env_file.tmp"
  if [ -n "$bootstrap" ] && ! grep -q '^BEEMESH_BOOTSTRAP=' "$env_file.tmp"; then
    rm -f "$env_file.tmp"
    die "packaging/systemd/agent.env has no #BEEMESH_BOOTSTRAP= line to fill in"
  fi
  chmod 644 "$env_file.tmp"
  mv "$env_file.tmp" "$env_file"
  echo "installed: /etc/beemesh/agent.env${bootstrap:+ (BEEMESH_BOOTSTRAP=$bootstrap)}"
  changed=1
fi

# The join token is a credential: the env file that holds it is private, and it stays
# there only until the agent has joined (see below).
if [ -n "$join" ] && grep -qxF "BEEMESH_JOIN=$join" "$env_file" && [ "$(stat -c %a "$env_file")" = 600 ]; then
  echo "unchanged: BEEMESH_JOIN in /etc/beemesh/agent.env"
elif [ -n "$join" ]; then
  grep -v '^BEEMESH_JOIN=' "$env_file" >"$env_file.tmp" || true
  echo "BEEMESH_JOIN=$join" >>"$env_file.tmp"
  chmod 600 "$env_file.tmp"
  mv "$env_file.tmp" "$env_file"
  echo "installed: BEEMESH_JOIN in /etc/beemesh/agent.env (mode 0600)"
  changed=1
  restart_needed=1
fi

# The unit's StateDirectory= also makes it, but the agent can be started by hand too.
state_dir=$dest/var/lib/beemesh
if [ -d "$state_dir" ] && [ "$(stat -c %a "$state_dir")" = 700 ]; then
  echo "unchanged: /var/lib/beemesh"
else
  install -d -m 0700 "$state_dir"
  echo "installed: /var/lib/beemesh (mode 0700)"
  changed=1
fi

if [ "$changed" = 0 ]; then
  echo "agent files: nothing changed"
fi

if [ -n "$dest" ]; then
  echo "installed into $dest; systemd units not enabled (--root)"
elif [ "$systemd" = 1 ]; then
  [ "$unit_changed" = 1 ] && systemctl daemon-reload
  systemctl enable --now podman.socket
  if systemctl is-active --quiet beemesh-agent.service; then
    systemctl enable beemesh-agent.service
    if [ "$restart_needed" = 1 ]; then
      systemctl restart beemesh-agent.service
      echo "restarted beemesh-agent.service (its pods keep running and are adopted)"
    fi
  else
    systemctl enable --now beemesh-agent.service
  fi
  echo "beemesh-agent.service: $(systemctl is-active beemesh-agent.service); logs: journalctl -u beemesh-agent"
  if [ -n "$join" ]; then
    for _ in $(seq 60); do
      [ -s "$state_dir/trust/owners.json" ] && break
      sleep 1
    done
    if [ -s "$state_dir/trust/owners.json" ]; then
      sed -i '/^BEEMESH_JOIN=/d' "$env_file"
      echo "joined the node; the token is removed from /etc/beemesh/agent.env"
    else
      echo "the agent has not joined within 60 s (journalctl -u beemesh-agent says why);" \
        "BEEMESH_JOIN stays in /etc/beemesh/agent.env until it has" >&2
    fi
  fi
else
  echo "systemd is not running (PID 1 is $(cat /proc/1/comm)): units installed but not enabled."
  echo "Start the agent by hand with:"
  echo "  (set -a; . /etc/beemesh/agent.env; set +a; exec /usr/local/bin/beemesh agent)"
  if [ -n "$join" ]; then
    echo "Once it has joined (it logs \"node enrolled this agent\"), remove BEEMESH_JOIN"
    echo "from /etc/beemesh/agent.env: the token is no longer needed."
  fi
fi
