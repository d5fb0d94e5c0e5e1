#!/usr/bin/env python3
"""Pod start latency: BeeMesh against Podman's own pod start, measured in one run.

For each agent count asked for (default 2 and 20, all agents on this machine's one
Podman):

- the floor: Podman's own create and start of the same pod through its REST API, the
  calls a BeeMesh agent makes (create the pod, start it, create the container, start
  it), timed from the first call until the container is seen running;
- BeeMesh: for each of N pods, one after another, the time from the pod's manifest file
  appearing in the node's manifest directory to its container running in Podman;
- the floor again, one pod just before each BeeMesh pod: the agents running, their pod
  networks and pods on the host, so that the two see Podman in the same state;
- `podman run -d` of the same image and command, as the earlier figures were;
- each agent's resident memory and open sockets when idle (no pod yet), and the CPU
  the agents took together since the sample before, at each of the times after start
  given by --idle-after (default: once, when the mesh has settled;
  a later time shows what an agent holds once the connections that discovery opened
  have been idle for the mesh's idle timeout, 60 s, and closed);
- agent loss: the agent hosting the most pods is killed (SIGKILL) and the time until
  each of its pods runs on another agent is taken, the first and the last.

"Running" is seen the same way everywhere: through Podman's REST API, polled every
5 ms. Prints medians, p99s and ratios.

Usage: hack/bench-pod-start.py [--pods 30] [--agents 2,20] [--idle-after 8,75]
                               [--bin target/release/beemesh]
Needs hack/install-podman.sh and hack/build-test-image.sh (hack/bench-pod-start.sh runs
all of it).
"""

import argparse
import http.client
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

SOCKET = "/run/podman/podman.sock"
IMAGE = "localhost/busybox:1.35"
COMMAND = ["sleep", "100000"]
POLL = 0.005
# Agents heartbeat every 2 s and the node waits for a round before it places: let the
# mesh settle so that only pod start is measured.
SETTLE_SECONDS = 8
# The node's default --agent-loss-seconds is 6; the move itself adds a pod start.
LOSS_DEADLINE_SECONDS = 60


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def podman(method, path, body=None):
    conn = UnixHTTPConnection(SOCKET)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn.request(method, "/v4.0.0/libpod" + path,
                 body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status >= 300:
        raise SystemExit(f"podman {method} {path}: {response.status} {data[:300]!r}")
    return json.loads(data) if data else None


def running_containers(label):
    """Running non-infra containers that carry `label` (a key, or key=value)."""
    filters = json.dumps({"label": [label], "status": ["running"]})
    return [c for c in podman("GET", "/containers/json?filters=" + urllib.parse.quote(filters))
            if not c.get("IsInfra")]


def wait_running(label, start, what, work):
    deadline = start + 30
    while not running_containers(label):
        if time.perf_counter() > deadline:
            raise SystemExit(f"{what} did not start within 30 s; see {work}/bench.log")
        time.sleep(POLL)
    return time.perf_counter() - start


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest(name):
    return f"""apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {IMAGE}
    command: {json.dumps(COMMAND)}
"""


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid):
    """User and system time so far (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sockets(pid):
    """Open sockets: listeners, mesh connections, Podman's."""
    fds = f"/proc/{pid}/fd"
    count = 0
    for fd in os.listdir(fds):
        try:
            count += os.readlink(os.path.join(fds, fd)).startswith("socket:")
        except OSError:
            pass
    return count


def remove_pods(label):
    # (`podman pod rm` takes no filter.)
    ids = subprocess.run(["podman", "pod", "ps", "-q", "--filter", f"label={label}"],
                         capture_output=True, text=True).stdout.split()
    if ids:
        subprocess.run(["podman", "pod", "rm", "-f", "-t", "0", *ids], capture_output=True)


def floor_pod(name, tag):
    """The agent's four calls for one pod, made directly: seconds to its container
    running. The pod is left running (labelled with `tag`), as BeeMesh's are."""
    start = time.perf_counter()
    pod = podman("POST", "/pods/create", {
        "name": name, "hostname": name, "labels": {"io.beemesh.bench": tag}})
    podman("POST", f"/pods/{pod['Id']}/start")
    container = podman("POST", "/containers/create", {
        "name": f"{name}-main", "pod": pod["Id"], "image": IMAGE,
        "labels": {"io.beemesh.bench": tag, "io.beemesh.bench.pod": name},
        "entrypoint": COMMAND[:1], "command": COMMAND[1:], "init": True,
        "stop_timeout": 1})
    podman("POST", f"/containers/{container['Id']}/start")
    return wait_running(f"io.beemesh.bench.pod={name}", start, name, ".")


def bench_podman_rest(runs, tag):
    """The floor BeeMesh is measured against, before any agent runs."""
    try:
        return [floor_pod(f"floor-{tag}-{i}", tag) for i in range(runs)]
    finally:
        remove_pods(f"io.beemesh.bench={tag}")


def bench_podman_run(runs):
    samples = []
    ids = []
    try:
        for _ in range(runs):
            start = time.perf_counter()
            out = subprocess.check_output(["podman", "run", "-d", IMAGE, *COMMAND], text=True)
            samples.append(time.perf_counter() - start)
            ids.append(out.strip())
    finally:
        if ids:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *ids], capture_output=True)
    return samples


def placements(agent_ids):
    """Pod name -> agent peer ID, for every running BeeMesh container."""
    out = {}
    for c in running_containers("io.beemesh.pod.name"):
        labels = c.get("Labels") or {}
        if labels.get("io.beemesh.agent") in agent_ids:
            out.setdefault(labels["io.beemesh.pod.name"], set()).add(labels["io.beemesh.agent"])
    return out


def agent_loss(procs, agent_ids, names):
    """Kills the agent hosting the most pods; seconds until its first and last pod run
    on another agent."""
    hosted = placements(agent_ids)
    counts = {a: sum(1 for n in names if a in hosted.get(n, ())) for a in agent_ids}
    victim = max(counts, key=counts.get)
    moving = [n for n in names if victim in hosted.get(n, ())]
    if not moving or len(agent_ids) < 2:
        return None
    procs[1 + agent_ids.index(victim)].send_signal(signal.SIGKILL)
    start = time.perf_counter()
    moved = {}
    while len(moved) < len(moving):
        if time.perf_counter() - start > LOSS_DEADLINE_SECONDS:
            raise SystemExit(f"{len(moving) - len(moved)} pods of a killed agent did not "
                             f"move within {LOSS_DEADLINE_SECONDS} s")
        now = placements(agent_ids)
        for n in moving:
            if n not in moved and now.get(n, set()) - {victim}:
                moved[n] = time.perf_counter() - start
        time.sleep(POLL)
    return {"pods": len(moving), "first": min(moved.values()), "last": max(moved.values())}


def bench_beemesh(binary, pods, agents, work, floor_tag, idle_after):
    """BeeMesh's pods one after another, each after a floor pod made beside it (the
    agents running, their pod networks there): both see the host in the same state."""
    node_state = os.path.join(work, "node")
    node_id = subprocess.check_output([binary, "id", "--state-dir", node_state], text=True).strip()
    port = free_port()
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{node_id}"
    manifests = os.path.join(work, "manifests")
    os.makedirs(manifests)
    logs = open(os.path.join(work, "bench.log"), "w")
    agent_ids = [subprocess.check_output(
        [binary, "id", "--state-dir", os.path.join(work, f"agent{i}")], text=True).strip()
        for i in range(agents)]
    # Each trusts the other by peer ID; the agents keep pods' secrets in memory.
    secrets = tempfile.mkdtemp(prefix="beemesh-bench-", dir="/dev/shm")
    procs = [subprocess.Popen(
        [binary, "node", "--state-dir", node_state, "--listen", f"/ip4/127.0.0.1/tcp/{port}",
         "--pod-manifest-path", manifests, "--kubelet-port", str(free_port()),
         "--trust-agent", ",".join(agent_ids)],
        stdout=subprocess.DEVNULL, stderr=logs)]
    for i in range(agents):
        procs.append(subprocess.Popen(
            [binary, "agent", "--state-dir", os.path.join(work, f"agent{i}"),
             "--listen", f"/ip4/127.0.0.1/tcp/{free_port()}", "--bootstrap", addr,
             "--trust", node_id, "--secrets-dir", os.path.join(secrets, f"agent{i}")],
            stdout=subprocess.DEVNULL, stderr=logs))
    samples = []
    beside = []
    names = []
    try:
        started = time.perf_counter()
        idle = []
        since, cpu_before = 0.0, 0.0
        for at in idle_after:
            time.sleep(max(0.0, at - (time.perf_counter() - started)))
            cpu = sum(cpu_seconds(p.pid) for p in procs[1:])
            idle.append((at, [rss_mib(p.pid) for p in procs[1:]],
                         [sockets(p.pid) for p in procs[1:]], since,
                         (cpu - cpu_before) / (at - since)))
            since, cpu_before = at, cpu
        for i in range(pods):
            beside.append(floor_pod(f"beside-{floor_tag}-{i}", floor_tag))
            name = f"bench-{os.getpid()}-{agents}-{i}"
            names.append(name)
            tmp = os.path.join(work, name + ".tmp")
            with open(tmp, "w") as f:
                f.write(manifest(name))
            start = time.perf_counter()
            os.rename(tmp, os.path.join(manifests, name + ".yaml"))
            samples.append(wait_running(f"io.beemesh.pod.name={name}", start, name, work))
        hosted = placements(agent_ids)
        seen = set()
        first_on_agent = []
        for name in names:
            agent = next(iter(hosted.get(name, ())), None)
            first_on_agent.append(agent not in seen)
            seen.add(agent)
        loss = agent_loss(procs, agent_ids, names)
        for name in os.listdir(manifests):
            os.remove(os.path.join(manifests, name))
        deadline = time.time() + 60
        while placements(agent_ids) and time.time() < deadline:
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()
        for a in agent_ids:
            remove_pods(f"io.beemesh.agent={a}")
        remove_pods(f"io.beemesh.bench={floor_tag}")
        shutil.rmtree(secrets, ignore_errors=True)
    return samples, beside, first_on_agent, idle, loss


def p99(samples):
    """Nearest rank, as the Kubernetes SLO's percentiles: with fewer than 100 samples,
    the highest."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def describe(samples):
    return (f"median {statistics.median(samples) * 1000:.0f} ms, "
            f"p99 {p99(samples) * 1000:.0f} ms, "
            f"min {min(samples) * 1000:.0f} ms, max {max(samples) * 1000:.0f} ms")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=30)
    parser.add_argument("--agents", default="2,20",
                        help="agent counts, comma-separated; each is one run beside its own floor")
    parser.add_argument("--idle-after", default=str(SETTLE_SECONDS),
                        help="seconds after start at which idle agents are measured, "
                             f"comma-separated, each at least {SETTLE_SECONDS}; pods follow")
    parser.add_argument("--bin", default="target/release/beemesh")
    args = parser.parse_args()
    try:
        idle_after = sorted(float(a) for a in args.idle_after.split(","))
    except ValueError:
        raise SystemExit(f"--idle-after: not a comma-separated list of numbers: {args.idle_after!r}")
    if idle_after[0] < SETTLE_SECONDS:
        raise SystemExit(f"--idle-after: the mesh needs {SETTLE_SECONDS} s to settle first")
    try:
        agent_counts = [int(a) for a in args.agents.split(",")]
    except ValueError:
        raise SystemExit(f"--agents: not a comma-separated list of numbers: {args.agents!r}")
    if args.pods < 1 or any(a < 1 for a in agent_counts):
        raise SystemExit("--pods and every --agents count must be at least 1")
    if not shutil.which(args.bin) and not os.access(args.bin, os.X_OK):
        raise SystemExit(f"{args.bin} not found: build it with cargo build --release")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, podman "
          + subprocess.check_output(["podman", "version", "--format", "{{.Server.Version}}"], text=True).strip()
          + time.strftime(", %Y-%m-%d %H:%M UTC", time.gmtime()))
    for agents in agent_counts:
        work = tempfile.mkdtemp(prefix="beemesh-bench-")
        floor = bench_podman_rest(args.pods, f"{os.getpid()}-{agents}")
        run = bench_podman_run(args.pods)
        mesh, beside, first_on_agent, idle, loss = bench_beemesh(
            os.path.abspath(args.bin), args.pods, agents, work, f"{os.getpid()}-{agents}-beside",
            idle_after)
        print(f"\n{agents} agents, {args.pods} pods one after another:")
        print(f"  podman REST create+start of the pod (floor): {describe(floor)}")
        print(f"  podman run -d:                               {describe(run)}")
        print(f"  the floor again, beside each BeeMesh pod:    {describe(beside)}")
        print(f"  beemesh manifest -> container running:       {describe(mesh)}")
        print(f"  ratio to the floor: median {statistics.median(mesh) / statistics.median(floor):.2f}x, "
              f"p99 {p99(mesh) / p99(floor):.2f}x; to podman run -d: median "
              f"{statistics.median(mesh) / statistics.median(run):.2f}x")
        print(f"  ratio to the floor beside it: median "
              f"{statistics.median(mesh) / statistics.median(beside):.2f}x, "
              f"p99 {p99(mesh) / p99(beside):.2f}x")
        for first, what in ((True, "an agent's first pod"), (False, "an agent's later pods")):
            mine = [m for m, f in zip(mesh, first_on_agent) if f == first]
            theirs = [b for b, f in zip(beside, first_on_agent) if f == first]
            if mine:
                print(f"    {what} ({len(mine)}): median {statistics.median(mine) * 1000:.0f} ms, "
                      f"{statistics.median(mine) / statistics.median(theirs):.2f}x the floor beside")
        for at, rss, socks, since, cores in idle:
            print(f"  idle agent after {at:.0f} s: RSS median {statistics.median(rss):.1f} MiB, "
                  f"max {max(rss):.1f} MiB; sockets median {statistics.median(socks):.0f}, "
                  f"max {max(socks)}; the agents' CPU from {since:.0f} s: "
                  f"{cores * 100:.1f} % of a core")
        if loss:
            print(f"  agent killed with {loss['pods']} pods: first running elsewhere after "
                  f"{loss['first']:.1f} s, last after {loss['last']:.1f} s")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
