#!/usr/bin/env python3
"""Pod start latency: BeeMesh against bare Podman, measured in one run.

For each of N pods, the time from its manifest file appearing in the node's manifest
directory to its container running in Podman (seen through Podman's REST API, polled
every 5 ms), next to `podman run -d` of the same image and command timed the same
number of times. Prints medians and their ratio.

Usage: hack/bench-pod-start.py [--pods 20] [--agents 2] [--bin target/release/beemesh]
Needs hack/install-podman.sh and hack/build-test-image.sh (hack/bench-pod-start.sh runs
all of it).
"""

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

SOCKET = "/run/podman/podman.sock"
IMAGE = "localhost/busybox:1.35"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def running_containers(label):
    filters = json.dumps({"label": [label], "status": ["running"]})
    conn = UnixHTTPConnection(SOCKET)
    conn.request("GET", "/v4.0.0/libpod/containers/json?filters=" + urllib.parse.quote(filters))
    body = conn.getresponse().read()
    conn.close()
    return [c for c in json.loads(body) if not c.get("IsInfra")]


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
    command: ["sleep", "100000"]
"""


def bench_beemesh(binary, pods, agents, work):
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
    procs = [subprocess.Popen(
        [binary, "node", "--state-dir", node_state, "--listen", f"/ip4/127.0.0.1/tcp/{port}",
         "--pod-manifest-path", manifests],
        stdout=subprocess.DEVNULL, stderr=logs)]
    for i in range(agents):
        procs.append(subprocess.Popen(
            [binary, "agent", "--state-dir", os.path.join(work, f"agent{i}"),
             "--listen", f"/ip4/127.0.0.1/tcp/{free_port()}", "--bootstrap", addr,
             "--trust", node_id],
            stdout=subprocess.DEVNULL, stderr=logs))
    samples = []
    try:
        # Agents heartbeat every 3 s and the node waits one round before its first
        # offer: let the mesh settle so that only pod start is measured.
        time.sleep(8)
        for i in range(pods):
            name = f"bench-{os.getpid()}-{i}"
            tmp = os.path.join(work, name + ".tmp")
            with open(tmp, "w") as f:
                f.write(manifest(name))
            start = time.perf_counter()
            os.rename(tmp, os.path.join(manifests, name + ".yaml"))
            deadline = start + 30
            while not running_containers(f"io.beemesh.pod.name={name}"):
                if time.perf_counter() > deadline:
                    raise SystemExit(f"{name} did not start within 30 s; see {work}/bench.log")
                time.sleep(0.005)
            samples.append(time.perf_counter() - start)
        for name in os.listdir(manifests):
            os.remove(os.path.join(manifests, name))
        deadline = time.time() + 60
        while any(running_containers(f"io.beemesh.agent={a}") for a in agent_ids) and time.time() < deadline:
            time.sleep(0.5)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        for a in agent_ids:
            subprocess.run(["podman", "pod", "rm", "-f", "-t", "0", "--filter",
                            f"label=io.beemesh.agent={a}"], capture_output=True)
    return samples


def bench_podman(runs):
    samples = []
    ids = []
    try:
        for _ in range(runs):
            start = time.perf_counter()
            out = subprocess.check_output(["podman", "run", "-d", IMAGE, "sleep", "100000"], text=True)
            samples.append(time.perf_counter() - start)
            ids.append(out.strip())
    finally:
        if ids:
            subprocess.run(["podman", "rm", "-f", "-t", "0", *ids], capture_output=True)
    return samples


def describe(samples):
    return (f"median {statistics.median(samples) * 1000:.0f} ms, "
            f"min {min(samples) * 1000:.0f} ms, max {max(samples) * 1000:.0f} ms")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=20)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--bin", default="target/release/beemesh")
    args = parser.parse_args()
    if args.pods < 1 or args.agents < 1:
        raise SystemExit("--pods and --agents must be at least 1")
    if not shutil.which(args.bin) and not os.access(args.bin, os.X_OK):
        raise SystemExit(f"{args.bin} not found: build it with cargo build --release")
    work = tempfile.mkdtemp(prefix="beemesh-bench-")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, podman "
          + subprocess.check_output(["podman", "version", "--format", "{{.Server.Version}}"], text=True).strip())
    bare = bench_podman(args.pods)
    mesh = bench_beemesh(os.path.abspath(args.bin), args.pods, args.agents, work)
    print(f"bare `podman run -d` ({args.pods} runs):            {describe(bare)}")
    print(f"beemesh manifest -> container running ({args.pods} pods, {args.agents} agents): {describe(mesh)}")
    ratio = statistics.median(mesh) / statistics.median(bare)
    print(f"ratio (median beemesh / median bare podman): {ratio:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
