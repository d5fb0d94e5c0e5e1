#!/usr/bin/env python3
"""The fault suite's eyes (hack/faults/lib.sh starts it).

watch   samples Podman every 100 ms through a Podman REST socket (the equivalent of
        `podman ps -a --filter label=io.beemesh.pod.name --format json`) and the node's
        `beemesh status -o json` every second; writes every change of a pod's copies
        (agent, epoch, state) to events.jsonl and the current verdict to state.json.
wait    waits until the fault's mesh has converged after a moment: every wanted pod
        (a manifest in the node's directory) runs exactly once in Podman, nothing else
        of ours is left there, and a status asked after that moment agrees (each pod
        Running on the agent and epoch Podman shows, none Terminating, none extra).
analyze the figures of one fault from events.jsonl and the marks bash wrote.

Only the standard library: the suite runs on a bare machine.
"""

import argparse
import http.client
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=5.0):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


def podman_containers(sock_path):
    """All containers (any state) carrying a BeeMesh pod label, or None on failure."""
    filters = urllib.parse.quote(json.dumps({"label": ["io.beemesh.pod.name"]}))
    conn = UnixHTTPConnection(sock_path)
    try:
        conn.request("GET", f"/v4.0.0/libpod/containers/json?all=true&filters={filters}")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return None
        return json.loads(body) or []
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def read_agents(fdir):
    """peer -> short name (a1, ...), from the agents file lib.sh appends to."""
    agents = {}
    try:
        with open(os.path.join(fdir, "agents")) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    agents[parts[1]] = parts[0]
    except OSError:
        pass
    return agents


def read_wanted(fdir):
    """name -> strict?, from the manifest directory (one pod per file, named after it)."""
    wanted = {}
    mdir = os.path.join(fdir, "manifests")
    try:
        names = os.listdir(mdir)
    except OSError:
        return wanted
    for name in names:
        if not name.endswith(".yaml"):
            continue
        try:
            with open(os.path.join(mdir, name)) as f:
                text = f.read()
        except OSError:
            continue
        wanted[name[: -len(".yaml")]] = "fencing: strict" in text
    return wanted


class Status(threading.Thread):
    """Asks the node's status every second (in its own thread: it may take seconds)."""

    def __init__(self, fdir, prefix):
        super().__init__(daemon=True)
        with open(os.path.join(fdir, "status-cmd")) as f:
            self.cmd = shlex.split(f.read())
        self.prefix = prefix
        self.lock = threading.Lock()
        self.latest = None  # (asked_at, answered_at, {name: [phase, agent_peer, epoch]})
        self.failures = 0

    def run(self):
        while True:
            asked = time.time()
            try:
                out = subprocess.run(
                    self.cmd, capture_output=True, timeout=10, check=False
                ).stdout
                view = json.loads(out)
                pods = {}
                for p in view.get("pods") or []:
                    name = p["pod"]["name"]
                    if name.startswith(self.prefix):
                        agent = p.get("agent")
                        pods[name] = [p.get("phase"), agent, p.get("epoch"), p.get("reason")]
                with self.lock:
                    self.latest = (asked, time.time(), pods)
            except (subprocess.TimeoutExpired, ValueError, KeyError, TypeError, OSError):
                with self.lock:
                    self.failures += 1
            time.sleep(max(0.0, 1.0 - (time.time() - asked)))

    def get(self):
        with self.lock:
            return self.latest


class PodmanEvents(threading.Thread):
    """`podman events --stream`: every start and death of our pods' containers, with
    Podman's own nanosecond timestamps, so that an overlap of two copies is seen even
    when it is shorter than a sampling gap."""

    def __init__(self, fdir, prefix, since):
        super().__init__(daemon=True)
        self.fdir, self.prefix = fdir, prefix
        self.out = open(os.path.join(fdir, "podman-events.jsonl"), "a", buffering=1)
        self.proc = subprocess.Popen(
            ["podman", "events", "--stream", "--format", "json", "--filter", "type=container",
             "--since", str(int(since) - 1)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def run(self):
        agents, loaded = {}, 0.0
        for line in self.proc.stdout:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            attrs = e.get("Attributes") or {}
            name = attrs.get("io.beemesh.pod.name", "")
            if not name.startswith(self.prefix) or "io.beemesh.container" not in attrs:
                continue
            if e.get("Status") not in ("start", "died", "remove", "kill", "stop"):
                continue
            if time.time() - loaded > 0.5 or attrs.get("io.beemesh.agent") not in agents:
                agents, loaded = read_agents(self.fdir), time.time()
            agent = agents.get(attrs.get("io.beemesh.agent", ""))
            if agent is None:
                continue
            self.out.write(json.dumps({
                "t": parse_time(e.get("Time", "")), "status": e["Status"], "pod": name,
                "agent": agent, "epoch": int(attrs.get("io.beemesh.epoch", "0")),
                "id": e.get("ID", "")[:12]}) + "\n")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def parse_time(text):
    """Podman's RFC 3339 time with nanoseconds (UTC or an offset) -> unix seconds."""
    import datetime
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        return time.time()
    base = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
    tz = m.group(3)
    offset = 0 if tz == "Z" else (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60) * (1 if tz[0] == "+" else -1)
    frac = float("0" + m.group(2)) if m.group(2) else 0.0
    return base.replace(tzinfo=datetime.timezone.utc).timestamp() - offset + frac


def watch(args):
    fdir = args.dir
    events = open(os.path.join(fdir, "events.jsonl"), "a", buffering=1)
    status = Status(fdir, args.prefix)
    status.start()
    podman_events = PodmanEvents(fdir, args.prefix, args.events_since or time.time())
    podman_events.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    agents, wanted = {}, {}
    last_reload = 0.0
    last_copies = {}  # pod -> sorted list of [agent, epoch, state, id]
    last_status = {}
    last_status_asked = None
    converged_since = None
    samples, failed, gaps = 0, 0, []
    prev_t = None
    while not stop.is_set():
        t = time.time()
        if prev_t is not None:
            gaps.append(t - prev_t)
        prev_t = t
        if t - last_reload >= 0.5:
            agents = read_agents(fdir)
            new_wanted = read_wanted(fdir)
            if new_wanted != wanted:
                wanted = new_wanted
                events.write(json.dumps({"t": t, "wanted": sorted(wanted),
                                         "strict": sorted(n for n, s in wanted.items() if s)}) + "\n")
            last_reload = t
        listed = podman_containers(args.socket)
        if listed is None:
            failed += 1
            time.sleep(0.1)
            continue
        samples += 1
        copies = {}
        for c in listed:
            labels = c.get("Labels") or {}
            name = labels.get("io.beemesh.pod.name", "")
            agent = labels.get("io.beemesh.agent", "")
            if c.get("IsInfra") or not name.startswith(args.prefix) or agent not in agents:
                continue
            copies.setdefault(name, []).append(
                [agents[agent], int(labels.get("io.beemesh.epoch", "0")), c.get("State", ""), c.get("Id", "")[:12]]
            )
        for name in copies:
            copies[name].sort()
        for name in set(copies) | set(last_copies):
            now = copies.get(name, [])
            if now != last_copies.get(name, []):
                events.write(json.dumps({"t": t, "pod": name, "copies": now}) + "\n")
        last_copies = copies

        latest = status.get()
        if latest is not None and latest[0] != last_status_asked:
            last_status_asked = latest[0]
            for name in set(latest[2]) | set(last_status):
                if latest[2].get(name) != last_status.get(name):
                    events.write(json.dumps({"t": latest[1], "status_pod": name,
                                             "status": latest[2].get(name)}) + "\n")
            last_status = latest[2]

        # The verdict.
        problems = []
        peer_of = {v: k for k, v in agents.items()}
        for name in sorted(set(wanted) | set(copies)):
            cs = copies.get(name, [])
            running = [c for c in cs if c[2] == "running"]
            if name not in wanted:
                if cs:
                    problems.append(f"{name}: unwanted, {len(cs)} copies left")
                continue
            if len(running) != 1:
                problems.append(f"{name}: {len(running)} running copies")
            elif len(cs) != 1:
                problems.append(f"{name}: {len(cs) - 1} stale copies beside the running one")
        if latest is None or t - latest[1] > 5.0:
            problems.append("no recent status")
        else:
            st = latest[2]
            for name in sorted(set(wanted) | set(st)):
                s = st.get(name)
                if name not in wanted:
                    problems.append(f"{name}: in status ({s[0] if s else '?'}) but not wanted")
                    continue
                if s is None:
                    problems.append(f"{name}: not in status")
                    continue
                if s[0] != "Running":
                    problems.append(f"{name}: status {s[0]} ({s[3]})")
                    continue
                running = [c for c in copies.get(name, []) if c[2] == "running"]
                if len(running) == 1 and (peer_of.get(running[0][0]) != s[1] or running[0][1] != s[2]):
                    problems.append(f"{name}: status says {agents.get(s[1], s[1])}/{s[2]}, Podman runs {running[0][0]}/{running[0][1]}")
        converged = not problems
        # Agents without which every wanted pod still runs exactly once (after one is
        # lost: its pods run elsewhere, whatever it left behind).
        covered_without = []
        for a in sorted(agents.values()):
            if all(len([c for c in copies.get(n, []) if c[2] == "running" and c[0] != a]) == 1
                   for n in wanted):
                covered_without.append(a)
        if converged and converged_since is None:
            converged_since = t
        if not converged:
            converged_since = None
        write_json(os.path.join(fdir, "state.json"), {
            "t": t,
            "converged": converged,
            "converged_since": converged_since,
            "status_asked": latest[0] if latest else None,
            "problems": problems[:8],
            "problem_count": len(problems),
            "covered_without": covered_without,
            "wanted": len(wanted),
            "samples": samples,
        })
        time.sleep(max(0.0, 0.1 - (time.time() - t)))

    podman_events.stop()
    summary = {
        "samples": samples,
        "failed_samples": failed,
        "status_failures": status.failures,
        "gap_mean": statistics.mean(gaps) if gaps else None,
        "gap_max": max(gaps) if gaps else None,
        "gap_p99": sorted(gaps)[int(len(gaps) * 0.99)] if gaps else None,
    }
    write_json(os.path.join(fdir, "sampler.json"), summary)


# How long convergence must hold before it counts (two status rounds).
SETTLE_S = 2.0


def wait(args):
    deadline = time.time() + args.timeout
    path = os.path.join(args.dir, "state.json")
    state = {}
    while time.time() < deadline:
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            time.sleep(0.1)
            continue
        if args.without:
            if args.without in (state.get("covered_without") or []) and state["t"] > args.since:
                print(f"{state['t']:.3f}")
                return 0
        elif (state.get("converged") and (state.get("status_asked") or 0) > args.since
              and state["t"] - state["converged_since"] >= SETTLE_S
              and state["status_asked"] > state["converged_since"]):
            # Held for a while and confirmed by a status asked after it began: a sample
            # between a copy's release and its listing is no convergence.
            print(f"{max(state['converged_since'], args.since):.3f}")
            return 0
        time.sleep(0.1)
    print(f"not converged after {args.timeout} s: {state.get('problem_count')} problems, e.g. "
          + "; ".join(state.get("problems") or []), file=sys.stderr)
    return 1


def read_marks(fdir):
    marks = []
    try:
        with open(os.path.join(fdir, "marks")) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2:
                    marks.append((float(parts[0]), parts[1], dict(p.split("=", 1) for p in parts[2:] if "=" in p)))
    except OSError:
        pass
    return marks


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def analyze(args):
    fdir = args.dir
    marks = read_marks(fdir)
    mark_t = {label: t for t, label, _ in marks}
    t_fault = mark_t.get(args.fault)
    t_heal = mark_t.get(args.heal) if args.heal else None
    t_end = mark_t.get(args.end) if args.end else None
    history = []  # (t, pod, copies)
    wanted_hist = []  # (t, wanted set, strict set)
    status_hist = []
    with open(os.path.join(fdir, "events.jsonl")) as f:
        for line in f:
            e = json.loads(line)
            if "pod" in e:
                history.append((e["t"], e["pod"], e["copies"]))
            elif "wanted" in e:
                wanted_hist.append((e["t"], set(e["wanted"]), set(e["strict"])))
            elif "status_pod" in e:
                status_hist.append((e["t"], e["status_pod"], e["status"]))
    strict_names = set()
    for _, _, s in wanted_hist:
        strict_names |= s

    def wanted_at(t):
        w = set()
        for tw, ws, _ in wanted_hist:
            if tw <= t:
                w = ws
        return w

    # Replay: copies per pod over time.
    current = {}
    dup_open = {}  # pod -> (start, max copies)
    dups = []  # (pod, strict, start, end, copies)
    at_fault = None
    all_running_after = {}  # mark label -> first t all wanted pods ran exactly once
    check_from = sorted([(t, label) for t, label, _ in marks if t_fault is not None and t >= t_fault])
    running = lambda cs: [c for c in cs if c[2] == "running"]

    moved = {}  # pod -> {"gone": t, "elsewhere": t}
    victim_pods = {}
    epochs_at_fault = {}
    ids_at_fault = {}
    events_after = sorted(history)

    def snapshot_fault():
        nonlocal at_fault
        at_fault = {p: list(cs) for p, cs in current.items()}
        for p, cs in at_fault.items():
            r = running(cs)
            if r:
                epochs_at_fault[p] = r[0][1]
                ids_at_fault[p] = r[0][3]
            if args.victim and any(c[0] == args.victim for c in r):
                victim_pods[p] = p in strict_names

    for t, pod, cs in events_after:
        if t_fault is not None and at_fault is None and t >= t_fault:
            snapshot_fault()
        current[pod] = cs
        n = len(running(cs))
        if n >= 2 and pod not in dup_open:
            dup_open[pod] = [t, n]
        elif n >= 2:
            dup_open[pod][1] = max(dup_open[pod][1], n)
        elif n < 2 and pod in dup_open:
            start, mx = dup_open.pop(pod)
            dups.append((pod, pod in strict_names, start, t, mx))
        if at_fault is not None and pod in victim_pods:
            m = moved.setdefault(pod, {})
            r = running(cs)
            if "gone" not in m and not any(c[0] == args.victim for c in r):
                m["gone"] = t
            if "elsewhere" not in m and any(c[0] != args.victim for c in r):
                m["elsewhere"] = t
        # Every wanted pod running exactly once, first after each mark since the fault.
        for tm, label in check_from:
            if label in all_running_after or t < tm:
                continue
            w = wanted_at(t)
            if w and all(len(running(current.get(p, []))) == 1 for p in w):
                all_running_after[label] = t
    if t_fault is not None and at_fault is None:
        snapshot_fault()
    last_t = events_after[-1][0] if events_after else 0
    for pod, (start, mx) in dup_open.items():
        dups.append((pod, pod in strict_names, start, None, mx))

    final_wanted = wanted_at(float("inf"))
    lost = sorted(p for p in final_wanted if len(running(current.get(p, []))) != 1)
    final_status = {}
    for t, p, s in status_hist:
        final_status[p] = s
    terminating = sorted(p for p, s in final_status.items() if s and s[0] == "Terminating")
    not_running_status = sorted(p for p in final_wanted if not final_status.get(p) or final_status[p][0] != "Running")
    changed_epoch = sorted(
        p for p in epochs_at_fault
        if p in final_wanted and running(current.get(p, [])) and running(current[p])[0][1] != epochs_at_fault[p])
    recreated = sorted(
        p for p in ids_at_fault
        if p in final_wanted and running(current.get(p, [])) and running(current[p])[0][3] != ids_at_fault[p])

    def rel(t, base):
        return None if t is None or base is None else round(t - base, 1)

    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"n": len(values), "p50": round(pct(values, 0.5), 1), "max": round(max(values), 1),
                "min": round(min(values), 1)}

    # The same from Podman's events: each container's running intervals, start to
    # death, and any two copies of one pod whose intervals overlap.
    seen, intervals = set(), {}
    try:
        with open(os.path.join(fdir, "podman-events.jsonl")) as f:
            evs = [json.loads(line) for line in f]
    except OSError:
        evs = []
    open_at = {}
    for e in sorted(evs, key=lambda e: e["t"]):
        key = (e["id"], e["status"], round(e["t"], 6))
        if key in seen:
            continue
        seen.add(key)
        if e["status"] == "start":
            open_at[e["id"]] = e
        elif e["status"] in ("died", "remove") and e["id"] in open_at:
            s0 = open_at.pop(e["id"])
            intervals.setdefault(e["pod"], []).append((s0["t"], e["t"], s0["agent"], s0["epoch"], e["id"]))
    for cid, s0 in open_at.items():
        intervals.setdefault(s0["pod"], []).append((s0["t"], float("inf"), s0["agent"], s0["epoch"], cid))
    ev_overlaps = []
    for pod, ivs in intervals.items():
        ivs.sort()
        for i, a in enumerate(ivs):
            for b in ivs[i + 1:]:
                if b[0] >= a[1]:
                    break
                if b[4] != a[4]:
                    ev_overlaps.append({"pod": pod, "strict": pod in strict_names,
                                        "first": f"{a[2]}/{a[3]}", "second": f"{b[2]}/{b[3]}",
                                        "from": rel(b[0], t_fault), "overlap_s": round(min(a[1], b[1]) - b[0], 3)
                                        if min(a[1], b[1]) != float("inf") else "open"})
    # Moves from Podman's events as well: they are written as things happen, while a
    # listing can stall for seconds when Podman is busy.
    ev_moved = {}
    if t_fault is not None:
        for e in sorted(evs, key=lambda e: e["t"]):
            if e["t"] < t_fault or e["pod"] not in victim_pods:
                continue
            m = ev_moved.setdefault(e["pod"], {})
            if e["status"] == "died" and e["agent"] == args.victim and "gone" not in m:
                m["gone"] = e["t"]
            if e["status"] == "start" and e["agent"] != args.victim and "elsewhere" not in m:
                m["elsewhere"] = e["t"]
    strict_dups = [d for d in dups if d[1]]
    relaxed_dups = [d for d in dups if not d[1]]
    overlap = []
    for p, m in moved.items():
        if victim_pods.get(p) and "elsewhere" in m and ("gone" not in m or m["gone"] > m["elsewhere"]):
            overlap.append(p)
    report = {
        "fault": os.path.basename(fdir.rstrip("/")),
        "wanted": len(final_wanted),
        "strict": len([p for p in final_wanted if p in strict_names]),
        "victim": args.victim,
        "victim_relaxed": len([p for p, s in victim_pods.items() if not s]),
        "victim_strict": len([p for p, s in victim_pods.items() if s]),
        "relaxed_elsewhere_s": stats([rel(m.get("elsewhere"), t_fault) for p, m in moved.items() if not victim_pods[p]]),
        "relaxed_not_moved": sorted(p for p, s in victim_pods.items() if not s and "elsewhere" not in moved.get(p, {})),
        "strict_old_stopped_s": stats([rel(m.get("gone"), t_fault) for p, m in moved.items() if victim_pods[p]]),
        "strict_elsewhere_s": stats([rel(m.get("elsewhere"), t_fault) for p, m in moved.items() if victim_pods[p]]),
        "strict_not_moved": sorted(p for p, s in victim_pods.items() if s and "elsewhere" not in moved.get(p, {})),
        "strict_new_before_old_stopped": sorted(overlap),
        "events_relaxed_elsewhere_s": stats([rel(m.get("elsewhere"), t_fault) for p, m in ev_moved.items() if not victim_pods[p]]),
        "events_strict_old_died_s": stats([rel(m.get("gone"), t_fault) for p, m in ev_moved.items() if victim_pods[p]]),
        "events_strict_elsewhere_s": stats([rel(m.get("elsewhere"), t_fault) for p, m in ev_moved.items() if victim_pods[p]]),
        "events_strict_started_before_old_died": sorted(
            p for p, m in ev_moved.items() if victim_pods[p] and "elsewhere" in m and m.get("gone", float("inf")) > m["elsewhere"]),
        "strict_duplicates": len(strict_dups),
        "strict_duplicate_detail": [
            {"pod": d[0], "from": rel(d[2], t_fault), "to": rel(d[3], t_fault), "copies": d[4]} for d in strict_dups[:20]],
        "strict_overlaps_by_events": [o for o in ev_overlaps if o["strict"]],
        "relaxed_overlaps_by_events": len([o for o in ev_overlaps if not o["strict"]]),
        "containers_seen_by_events": sum(len(v) for v in intervals.values()),
        "relaxed_duplicates": len(relaxed_dups),
        "relaxed_duplicate_longest_s": round(max(((d[3] or last_t) - d[2]) for d in relaxed_dups), 1) if relaxed_dups else None,
        "all_running_after": {label: rel(t, mark_t[label]) for label, t in all_running_after.items()},
        "epoch_changed": len(changed_epoch),
        "epoch_changed_pods": changed_epoch[:20],
        "container_recreated": len(recreated),
        "lost": lost,
        "terminating": terminating,
        "status_not_running": not_running_status,
        "marks": {label: rel(t, t_fault) for t, label, _ in marks},
    }
    if args.converged:
        report["converged_s"] = {
            "from_fault": rel(args.converged, t_fault),
            "from_heal": rel(args.converged, t_heal) if t_heal else None,
            "from_end": rel(args.converged, t_end) if t_end else None,
        }
    try:
        with open(os.path.join(fdir, "sampler.json")) as f:
            report["sampler"] = json.load(f)
    except (OSError, ValueError):
        pass
    write_json(os.path.join(fdir, "report.json"), report)
    json.dump(report, sys.stdout, indent=1)
    print()
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch")
    w.add_argument("--socket", required=True)
    w.add_argument("--prefix", required=True)
    w.add_argument("--dir", required=True)
    w.add_argument("--events-since", type=float, help="read Podman's events from then on")
    wt = sub.add_parser("wait")
    wt.add_argument("--dir", required=True)
    wt.add_argument("--since", type=float, required=True)
    wt.add_argument("--timeout", type=float, required=True)
    wt.add_argument("--without", help="only: every wanted pod runs exactly once off this agent")
    an = sub.add_parser("analyze")
    an.add_argument("--dir", required=True)
    an.add_argument("--fault", default="fault")
    an.add_argument("--heal")
    an.add_argument("--end")
    an.add_argument("--victim")
    an.add_argument("--converged", type=float)
    args = ap.parse_args()
    if args.cmd == "watch":
        watch(args)
        return 0
    if args.cmd == "wait":
        return wait(args)
    return analyze(args)


if __name__ == "__main__":
    sys.exit(main())
