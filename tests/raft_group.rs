//! A stateful workload's Raft group without Podman: members are real libp2p peers, each
//! with the agent's `raft::Groups`, storage on disk, and the owner's signed word; on
//! loopback, or each in a network namespace of its own where partitions are real
//! (packets dropped by the kernel). Checks that clients' reads, writes and
//! compare-and-swaps stay linearizable while members are partitioned away, killed and
//! restarted (a Jepsen-style history, checked by the WGL search in
//! `linearizability`), and measures the group (`bench_`, run by hack/bench-raft.sh).

mod common;
mod linearizability;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beemesh::mesh::{self, GossipFilter, MeshConfig};
use beemesh::metrics::Metrics;
use beemesh::raft::groups::ServiceError;
use beemesh::raft::kv::{Command, Outcome};
use beemesh::raft::rpc::Read;
use beemesh::raft::{GroupConfig, GroupKey, Groups};
use beemesh::trust::group::{sign, Group};
use beemesh::trust::TrustedPeers;
use beemesh::wire::{GroupMember, PeerRef, PodRef, PodUid, SignedGroup};
use common::ip;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use linearizability::{check, Input, Operation, Output, Verdict};
use tokio_util::sync::CancellationToken;

/// One member: an agent's mesh peer and groups, stopped and started again on the same
/// state directory and identity.
struct Member {
    keypair: Keypair,
    dir: PathBuf,
    running: Option<(Groups, CancellationToken, Multiaddr)>,
    metrics: Metrics,
    /// Its network namespace, for a cluster whose members can be partitioned.
    host: Option<Host>,
}

/// A member's own network namespace, on a bridge with the others': its address, and a
/// runtime whose threads live there, so that the sockets of the member's mesh do too.
struct Host {
    namespace: String,
    ip: std::net::Ipv4Addr,
    runtime: Option<tokio::runtime::Runtime>,
}

/// `nft -f -` with `script` in network namespace `namespace`.
fn nft_in(namespace: &str, script: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", namespace, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("script");
    assert!(child.wait().expect("nft").success(), "nft: {script}");
}

/// A runtime whose threads (workers and blocking ones) enter `namespace` as they start.
fn runtime_in(namespace: &str) -> tokio::runtime::Runtime {
    use std::os::fd::AsRawFd;
    let handle =
        Arc::new(std::fs::File::open(format!("/run/netns/{namespace}")).expect("the namespace"));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(move || {
            // SAFETY: setns on a valid namespace descriptor moves this thread only.
            let entered = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
        })
        .build()
        .expect("runtime")
}

/// The members of groups, and the owner that names them.
struct Cluster {
    owner: Keypair,
    _dir: tempfile::TempDir,
    members: Vec<Member>,
    /// The namespace that holds the members' bridge, for a partitionable cluster.
    hub: Option<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some((_, cancel, _)) = member.running.take() {
                cancel.cancel();
            }
            if let Some(host) = member.host.as_mut() {
                if let Some(runtime) = host.runtime.take() {
                    runtime.shutdown_background();
                }
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &host.namespace])
                    .output();
            }
        }
        if let Some(hub) = &self.hub {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", hub])
                .output();
        }
    }
}

impl Cluster {
    /// `size` members on loopback.
    async fn start(size: usize) -> Cluster {
        Cluster::start_with(size, false).await
    }

    /// `size` members, each in a network namespace of its own, on one bridge (in a
    /// namespace of its own too: nothing of the host's firewall in the way).
    async fn start_partitionable(size: usize) -> Cluster {
        Cluster::start_with(size, true).await
    }

    async fn start_with(size: usize, namespaced: bool) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        // Apart from other clusters: of other test processes, and of this one's tests.
        static CLUSTERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!(
            "{}{}",
            std::process::id(),
            char::from(b'a' + (n % 26) as u8)
        );
        let hub = namespaced.then(|| {
            let hub = format!("bmrg{tag}h");
            ip(&["netns", "add", &hub]);
            ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
            ip(&["-n", &hub, "link", "set", "br0", "up"]);
            hub
        });
        let members = (0..size)
            .map(|i| Member {
                keypair: Keypair::generate_ed25519(),
                dir: dir.path().join(format!("member{i}")),
                running: None,
                metrics: Metrics::new(),
                host: hub.as_ref().map(|hub| {
                    let namespace = format!("bmrg{tag}m{i}");
                    // Each cluster's bridge is a world of its own: addresses may repeat.
                    let ip_address = std::net::Ipv4Addr::new(10, 213, 0, i as u8 + 2);
                    let port = format!("v{i}");
                    ip(&["netns", "add", &namespace]);
                    ip(&[
                        "-n", hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                        "netns", &namespace,
                    ]);
                    ip(&["-n", hub, "link", "set", &port, "master", "br0", "up"]);
                    let address = format!("{ip_address}/24");
                    ip(&["-n", &namespace, "addr", "add", &address, "dev", "eth0"]);
                    ip(&["-n", &namespace, "link", "set", "eth0", "up"]);
                    ip(&["-n", &namespace, "link", "set", "lo", "up"]);
                    Host {
                        runtime: Some(runtime_in(&namespace)),
                        namespace,
                        ip: ip_address,
                    }
                }),
            })
            .collect();
        let mut cluster = Cluster {
            owner: Keypair::generate_ed25519(),
            _dir: dir,
            members,
            hub,
        };
        for i in 0..size {
            cluster.start_member(i).await;
        }
        cluster
    }

    /// Cuts member `i` off from every other member: the kernel drops what it sends
    /// them and what they send it.
    fn isolate(&self, i: usize) {
        let host = self.members[i]
            .host
            .as_ref()
            .expect("a partitionable cluster");
        let others: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .filter_map(|(_, m)| m.host.as_ref().map(|h| h.ip.to_string()))
            .collect();
        let others = others.join(", ");
        nft_in(
            &host.namespace,
            &format!(
                "table inet partition {{\n  chain in {{ type filter hook input priority 0; ip saddr {{ {others} }} drop; }}\n  chain out {{ type filter hook output priority 0; ip daddr {{ {others} }} drop; }}\n}}\n"
            ),
        );
    }

    /// Ends member `i`'s partition.
    fn heal(&self, i: usize) {
        let host = self.members[i]
            .host
            .as_ref()
            .expect("a partitionable cluster");
        nft_in(&host.namespace, "delete table inet partition\n");
    }

    /// The member that leads group `name`, as the running members see it.
    fn leader_index(&self, name: &str) -> Option<usize> {
        let key = self.key(name);
        let leader = (0..self.members.len())
            .filter_map(|i| self.groups(i))
            .find_map(|g| g.leader(&key).ok().and_then(|(leader, _)| leader))?;
        (0..self.members.len()).find(|&i| self.peer(i) == leader)
    }

    fn peer(&self, i: usize) -> PeerId {
        self.members[i].keypair.public().to_peer_id()
    }

    fn groups(&self, i: usize) -> Option<Groups> {
        self.members[i].running.as_ref().map(|(g, _, _)| g.clone())
    }

    /// Starts member `i`, connected to every running member.
    async fn start_member(&mut self, i: usize) {
        let bootstrap = self
            .members
            .iter()
            .filter_map(|m| m.running.as_ref().map(|(_, _, addr)| addr.clone()))
            .collect();
        let member = &mut self.members[i];
        let listen_ip = member
            .host
            .as_ref()
            .map_or(std::net::Ipv4Addr::LOCALHOST, |h| h.ip);
        let config = MeshConfig {
            listen: vec![format!("/ip4/{listen_ip}/tcp/0")
                .parse()
                .expect("multiaddr")],
            bootstrap,
            accept_gossip: GossipFilter::new([], |_| true),
            ..MeshConfig::default()
        };
        let metrics = member.metrics.clone();
        let keypair = member.keypair.clone();
        let start_metrics = metrics.clone();
        // Started and run where the member's sockets belong: its namespace's runtime,
        // or this one.
        let runtime = member
            .host
            .as_ref()
            .and_then(|h| h.runtime.as_ref())
            .map_or_else(tokio::runtime::Handle::current, |r| r.handle().clone());
        let (handle, mut events, event_loop) = runtime
            .spawn(async move { mesh::start(keypair, config, start_metrics) })
            .await
            .expect("started")
            .expect("mesh starts");
        let cancel = CancellationToken::new();
        runtime.spawn(event_loop.run(cancel.clone()));
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        let addr = loop {
            let listening = handle.listen_addrs().await.expect("loop runs");
            if let Some(addr) = listening.into_iter().next() {
                break addr;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let owner = self.owner.public().to_peer_id();
        let groups = Groups::new(
            handle.local_peer_id(),
            handle.clone(),
            TrustedPeers::new([owner]),
            member.dir.clone(),
            GroupConfig::default(),
            metrics,
        );
        tokio::spawn(groups.clone().serve(cancel.clone()));
        member.running = Some((groups, cancel, addr));
    }

    /// Stops member `i` as a killed agent stops: its peer gone, its state on disk.
    fn kill(&mut self, i: usize) {
        if let Some((_, cancel, _)) = self.members[i].running.take() {
            cancel.cancel();
        }
    }

    /// The owner's word on group `name`: every member runs one of its pods.
    fn word(&self, name: &str, version: u64) -> SignedGroup {
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.word_of(name, version, &all)
    }

    /// The owner's word on group `name`: each of `members` runs its pod `<name>-<i>`.
    fn word_of(&self, name: &str, version: u64, members: &[usize]) -> SignedGroup {
        self.word_placing(name, version, &Self::own_pods(name, members))
    }

    /// Each of `members` with its pod `<name>-<i>`.
    fn own_pods(name: &str, members: &[usize]) -> Vec<(usize, String)> {
        members
            .iter()
            .map(|&i| (i, format!("{name}-{i}")))
            .collect()
    }

    /// The owner's word on group `name`: member `i` runs pod `pod` for each `(i, pod)`
    /// of `pods`, the first one founds it.
    fn word_placing(&self, name: &str, version: u64, pods: &[(usize, String)]) -> SignedGroup {
        let founder = pods.first().map(|&(i, _)| self.peer(i));
        let members = pods
            .iter()
            .map(|(i, pod)| GroupMember {
                agent: PeerRef(self.peer(*i)),
                pod: PodRef {
                    uid: PodUid(format!("uid-{pod}-on-{i}")),
                    namespace: "default".into(),
                    name: pod.clone(),
                },
            })
            .collect();
        sign(
            &self.owner,
            Group {
                namespace: "default".into(),
                name: name.into(),
                version,
                founder,
                members,
            },
        )
    }

    fn key(&self, name: &str) -> GroupKey {
        GroupKey {
            owner: self.owner.public().to_peer_id(),
            namespace: "default".into(),
            name: name.into(),
        }
    }

    /// Tells every running member of group `name`, whose pod runs there (as an agent
    /// runs its group's pods: without one it would leave the group).
    async fn tell(&self, name: &str) {
        let all: Vec<usize> = (0..self.members.len()).collect();
        self.tell_of(name, 1, &all, &all).await;
    }

    /// Tells the running members `to` the word `version` naming `members`, whose
    /// pods run on them.
    async fn tell_of(&self, name: &str, version: u64, members: &[usize], to: &[usize]) {
        self.tell_placing(name, version, &Self::own_pods(name, members), to)
            .await;
    }

    /// Tells the running members `to` the word `version` placing `pods`, which run on
    /// them.
    async fn tell_placing(&self, name: &str, version: u64, pods: &[(usize, String)], to: &[usize]) {
        let word = self.word_placing(name, version, pods);
        let owner = self.owner.public().to_peer_id();
        for member in &word.members {
            let i = (0..self.members.len()).find(|&i| self.peer(i) == member.agent.0);
            if let Some(groups) = i.and_then(|i| self.groups(i)) {
                groups
                    .attach_pod(self.key(name), &member.pod, beemesh::wire::Epoch(1))
                    .expect("the pod's socket");
            }
        }
        for &i in to {
            if let Some(groups) = self.groups(i) {
                groups.on_word(owner, word.clone()).await;
            }
        }
    }

    /// The leader every running member agrees on.
    async fn agreed_leader(&self, name: &str, timeout: Duration) -> PeerId {
        self.agreed_leader_but(name, None, timeout).await
    }

    /// The leader every running member agrees on, once it is not `old`.
    async fn agreed_leader_but(
        &self,
        name: &str,
        old: Option<PeerId>,
        timeout: Duration,
    ) -> PeerId {
        let key = self.key(name);
        let deadline = Instant::now() + timeout;
        loop {
            let leaders: Vec<Option<PeerId>> = (0..self.members.len())
                .filter_map(|i| self.groups(i))
                .map(|g| g.leader(&key).ok().and_then(|(leader, _)| leader))
                .collect();
            if let Some(Some(first)) = leaders.first() {
                if Some(*first) != old && leaders.iter().all(|l| *l == Some(*first)) {
                    return *first;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader agreed in {timeout:?}: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn nanos(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}

/// What clients saw: the operations, recorded as they completed.
type History = Arc<Mutex<Vec<Operation>>>;

/// One client: random reads, writes, deletes and compare-and-swaps on a few keys,
/// through member `member`, until `stop`.
async fn client(
    id: u64,
    member: Groups,
    key: GroupKey,
    history: History,
    started: Instant,
    stop: CancellationToken,
) {
    // The last value and revision this client read of each key, for its CAS.
    let mut seen: HashMap<String, (Option<String>, u64)> = HashMap::new();
    let mut n = 0u64;
    while !stop.is_cancelled() {
        n += 1;
        let k = format!("k{}", (id + n) % 3);
        let choice = (id * 7919 + n * 104_729) % 20;
        let call = nanos(started);
        let (input, output) = match choice {
            0..=7 => {
                let found = member.read(&key, Read::Key { key: k.clone() }).await;
                let Ok(found) = found else { continue };
                let item = found.items.into_iter().next().map(|(_, item)| item);
                seen.insert(
                    k.clone(),
                    (
                        item.as_ref().map(|i| i.value.clone()),
                        item.map_or(0, |i| i.revision),
                    ),
                );
                (Input::Read, Output::Read(seen[&k].0.clone()))
            }
            8..=14 => {
                let value = format!("c{id}-{n}");
                let put = Command::Put {
                    key: k.clone(),
                    value: value.clone(),
                    expect: None,
                };
                match outcome(member.propose(&key, put).await) {
                    Some(Some(Outcome::Stored { .. })) => (Input::Write(value), Output::Written),
                    Some(None) => (Input::Write(value), Output::Unknown),
                    _ => continue,
                }
            }
            15 => match outcome(
                member
                    .propose(
                        &key,
                        Command::Delete {
                            key: k.clone(),
                            expect: None,
                        },
                    )
                    .await,
            ) {
                Some(Some(Outcome::Deleted { .. })) => (Input::Delete, Output::Deleted),
                Some(None) => (Input::Delete, Output::Unknown),
                _ => continue,
            },
            _ => {
                // Values are unique, so "revision R" is "the value written at R".
                let (expected, revision) = seen.get(&k).cloned().unwrap_or((None, 0));
                let new = format!("c{id}-{n}");
                let put = Command::Put {
                    key: k.clone(),
                    value: new.clone(),
                    expect: Some(revision),
                };
                let input = Input::Cas { expected, new };
                match outcome(member.propose(&key, put).await) {
                    Some(Some(Outcome::Stored { .. })) => (input, Output::Cas(true)),
                    Some(Some(Outcome::Conflict { .. })) => (input, Output::Cas(false)),
                    Some(None) => (input, Output::Unknown),
                    _ => continue,
                }
            }
        };
        let ret = (!matches!(output, Output::Unknown)).then(|| nanos(started));
        history.lock().expect("history").push(Operation {
            client: id,
            key: k,
            input,
            call,
            output,
            ret,
        });
    }
}

/// A write's outcome: Some(Some) applied, Some(None) unknown (it may have been
/// committed), None not applied (nobody led: the client saw an error).
fn outcome(result: Result<(u64, Outcome), ServiceError>) -> Option<Option<Outcome>> {
    match result {
        Ok((_, outcome)) => Some(Some(outcome)),
        Err(ServiceError::Unknown(_)) => Some(None),
        Err(_) => None,
    }
}

/// Clients on every member while, one round at a time, the leader is cut off from the
/// others for a while (in turn) or a member is killed and restarted; the history must
/// be linearizable. BEEMESH_JEPSEN_OPS operations (default 2,000; the long run in
/// hack/bench-raft.sh takes 10,000 or more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_writes_and_cas_stay_linearizable_while_members_are_partitioned_killed_and_restarted()
{
    let wanted: usize = std::env::var("BEEMESH_JEPSEN_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let mut cluster = Cluster::start_partitionable(3).await;
    cluster.tell("db").await;
    let key = cluster.key("db");
    cluster.agreed_leader("db", Duration::from_secs(15)).await;
    let history: History = Arc::default();
    let started = Instant::now();
    let (mut kills, mut partitions, mut deposed) = (0, 0, 0);
    let mut round = 0u64;
    // Until there are enough operations and both faults have happened (a fast run
    // reaches the operations within the first round); a bounded number of rounds.
    while (history.lock().expect("history").len() < wanted || kills == 0 || deposed == 0)
        && round < 20
    {
        // A round: clients on every member; midway, the leader is cut off from the
        // others (its clients carry on against it) and reconnected, or one member is
        // killed (its clients go with it, as a killed agent's pods lose their socket)
        // and started again at the end.
        round += 1;
        let victim = (round as usize) % cluster.members.len();
        let stops: Vec<CancellationToken> = (0..cluster.members.len())
            .map(|_| CancellationToken::new())
            .collect();
        let mut clients = Vec::new();
        for (i, stop) in stops.iter().enumerate() {
            let Some(groups) = cluster.groups(i) else {
                continue;
            };
            for c in 0..2 {
                let id = round * 100 + (i * 2 + c) as u64;
                clients.push(tokio::spawn(client(
                    id,
                    groups.clone(),
                    key.clone(),
                    history.clone(),
                    started,
                    stop.clone(),
                )));
            }
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let partition = round.is_multiple_of(2);
        if partition {
            let cut = cluster.leader_index("db").unwrap_or(victim);
            let leader = cluster.peer(cut);
            cluster.isolate(cut);
            partitions += 1;
            // Held until the majority's side has a leader of its own (10 s at most),
            // and a while longer, clients busy on both sides.
            let cut_off = Instant::now();
            while cut_off.elapsed() < Duration::from_secs(10) {
                let elected = (0..cluster.members.len())
                    .filter(|&i| i != cut)
                    .filter_map(|i| cluster.groups(i))
                    .any(|g| {
                        g.leader(&key)
                            .is_ok_and(|(l, _)| l.is_some_and(|l| l != leader))
                    });
                if elected {
                    deposed += 1;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
            cluster.heal(cut);
            tokio::time::sleep(Duration::from_millis(1000)).await;
        } else {
            stops[victim].cancel();
            cluster.kill(victim);
            kills += 1;
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        for stop in &stops {
            stop.cancel();
        }
        for c in clients {
            let _ = c.await;
        }
        if !partition {
            cluster.start_member(victim).await;
            cluster.tell("db").await;
        }
    }
    let history = history.lock().expect("history").clone();
    let unknown = history.iter().filter(|o| o.ret.is_none()).count();
    let writes = history
        .iter()
        .filter(|o| matches!(o.output, Output::Written | Output::Cas(true)))
        .count();
    let reads = history
        .iter()
        .filter(|o| matches!(o.input, Input::Read))
        .count();
    let checking = Instant::now();
    let verdict = check(&history, Duration::from_secs(120));
    eprintln!(
        "{} operations ({reads} reads, {writes} writes and swaps applied, {unknown} of unknown outcome) over {:?}, {kills} kills, {partitions} partitions of the leader ({deposed} deposed it); checked in {:?}: {verdict:?}",
        history.len(),
        started.elapsed(),
        checking.elapsed()
    );
    assert!(
        kills >= 1 && deposed >= 1 && writes > history.len() / 5,
        "the run did too little to tell"
    );
    assert_eq!(verdict, Verdict::Linearizable);
    // The history constrains: one read changed to a value nobody wrote is caught.
    let mut corrupted = history.clone();
    let read = corrupted
        .iter_mut()
        .find(|o| matches!(o.output, Output::Read(Some(_))))
        .expect("a read that saw a value");
    read.output = Output::Read(Some("never written".into()));
    assert!(matches!(
        check(&corrupted, Duration::from_secs(120)),
        Verdict::NotLinearizable { .. }
    ));
}

/// One copy of pod `db-0` as its agent keeps it: its lease book (an owner lease that
/// never runs out, so only the seat decides) and the member it asks through, whose
/// agent runs the copy.
struct PodCopy {
    book: beemesh::agent::lease::LeaseBook,
    member: Groups,
    holder: String,
}

impl PodCopy {
    fn new(owner: PeerId, epoch: u64, member: Groups) -> PodCopy {
        use beemesh::agent::lease::{Lease, LeaseBook, SeatLease};
        let holder = format!("{}/{epoch}", member.me());
        let mut book = LeaseBook::default();
        book.take(
            PodUid("db-0".into()),
            Lease {
                owner: PeerRef(owner),
                epoch: beemesh::wire::Epoch(1),
                lease_ms: u64::MAX / 4,
                expires_at_ms: u64::MAX / 2,
                grace_ms: 0,
                fenced: false,
                seat: Some(SeatLease::new("default", "db", "db-0", holder.clone())),
            },
        );
        PodCopy {
            book,
            member,
            holder,
        }
    }

    /// One turn of the agent's check: the seat attempts due, proposed and answered;
    /// true once the copy may run, false once it must stop (it never runs again).
    async fn turn(&mut self, key: &GroupKey) -> Option<bool> {
        use beemesh::agent::lease::{SeatNews, SEAT_LEASE_MS};
        use beemesh::fencing::boottime_ms;
        let now = boottime_ms();
        if !self.book.fence(now).is_empty() {
            return Some(false);
        }
        let mut news = None;
        for (uid, attempt) in self.book.seats_due(now) {
            assert_eq!(attempt.group, *key);
            let proposed = tokio::time::timeout(
                Duration::from_millis(SEAT_LEASE_MS / 3),
                self.member.propose(key, attempt.command),
            )
            .await;
            if let Ok(Ok((_, outcome))) = proposed {
                news = self.book.seat_answered(&uid, now, boottime_ms(), &outcome);
            }
        }
        match news {
            Some(SeatNews::Seated) => Some(true),
            Some(SeatNews::Lost) => Some(false),
            _ => None,
        }
    }
}

/// Seats across a real partition: the copy that holds db-0's seat is cut off with its
/// member (the owner placed db-0 on two agents, as while a deleted pod's copy is still
/// stopping and its replacement starts). The copy on the other side gets the seat only after the cut-off copy's seat
/// ran out and it stopped, so the two never run at once; reconnected, the group tells
/// the old holder the seat is another's.
/// A leader cut off from its quorum cannot commit a write: its client hears so within
/// the time a forwarded call gets, instead of waiting for the partition to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_leader_cut_off_from_its_quorum_ends_in_time_with_an_unknown_outcome() {
    let cluster = Cluster::start_partitionable(3).await;
    cluster.tell("db").await;
    let key = cluster.key("db");
    cluster.agreed_leader("db", Duration::from_secs(15)).await;
    let cut = cluster.leader_index("db").expect("a leader");
    let leader = cluster.groups(cut).expect("the leader runs");
    cluster.isolate(cut);
    let put = Command::Put {
        key: "k".into(),
        value: "v".into(),
        expect: None,
    };
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(30), leader.propose(&key, put)).await;
    let took = started.elapsed();
    cluster.heal(cut);
    let answer = answer.expect("the write ends while the partition lasts");
    assert!(
        matches!(answer, Err(ServiceError::Unknown(_))),
        "{answer:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seat_moves_across_a_partition_only_after_the_cut_off_copy_stopped() {
    let cluster = Cluster::start_partitionable(3).await;
    let mut pods = Cluster::own_pods("db", &[0, 1, 2]);
    pods.push((1, "db-0".into()));
    cluster.tell_placing("db", 1, &pods, &[0, 1, 2]).await;
    let key = cluster.key("db");
    cluster.agreed_leader("db", Duration::from_secs(15)).await;
    let owner = cluster.owner.public().to_peer_id();
    let mut old = PodCopy::new(owner, 1, cluster.groups(0).expect("running"));
    let (old_holder, new_holder) = (old.holder.clone(), format!("{}/2", cluster.peer(1)));
    let deadline = Instant::now() + Duration::from_secs(15);
    while old.turn(&key).await != Some(true) {
        assert!(
            Instant::now() < deadline,
            "the first copy never got its seat"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old_key = key.clone();
    let old_runs = tokio::spawn(async move {
        while old.turn(&old_key).await != Some(false) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Instant::now()
    });
    let mut new = PodCopy::new(owner, 2, cluster.groups(1).expect("running"));
    // Waiting for a held seat, as a new copy does.
    for _ in 0..20 {
        assert_ne!(
            new.turn(&key).await,
            Some(true),
            "a held seat was given away"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.isolate(0);
    let cut = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while new.turn(&key).await != Some(true) {
        assert!(Instant::now() < deadline, "the seat never moved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new_runs = Instant::now();
    let old_stopped = old_runs.await.expect("the old copy's loop");
    eprintln!(
        "cut off at 0 s: the old copy stopped at {:?}, the new one ran at {:?}",
        old_stopped.duration_since(cut),
        new_runs.duration_since(cut)
    );
    assert!(old_stopped <= new_runs, "both copies ran at once");
    cluster.heal(0);
    // The old holder, reconnected, cannot renew: the seat is the new copy's.
    let deadline = Instant::now() + Duration::from_secs(30);
    let renewal = Command::Seat {
        pod: "db-0".into(),
        holder: old_holder,
        expect: 0,
    };
    loop {
        match cluster
            .groups(0)
            .expect("running")
            .propose(&key, renewal.clone())
            .await
        {
            Ok((_, Outcome::SeatTaken { holder, .. })) => {
                assert_eq!(holder, new_holder);
                break;
            }
            other => {
                assert!(Instant::now() < deadline, "{other:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// A member is trusted with its own pods only: through the leader (a real peer, as the
/// group's other member), it cannot take the seat of a pod the owner placed elsewhere,
/// take it in another agent's name, give back another agent's seat or take a lock for
/// another agent's pod; the seat stays its holder's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_seat_unseat_or_lock_for_another_agents_pod() {
    let cluster = Cluster::start(3).await;
    cluster.tell("db").await;
    let key = cluster.key("db");
    let leader = cluster.agreed_leader("db", Duration::from_secs(15)).await;
    let leader = (0..3)
        .find(|&i| cluster.peer(i) == leader)
        .expect("a member");
    // The member that tries is not the leader, so its calls cross the mesh.
    let (victim, intruder) = match leader {
        0 => (0, 1),
        _ => (leader, 3 - leader),
    };
    let victims_pod = format!("db-{victim}");
    let victims_copy = format!("{}/1", cluster.peer(victim));
    let own = cluster.groups(victim).expect("running");
    let seated = own
        .propose(
            &key,
            Command::Seat {
                pod: victims_pod.clone(),
                holder: victims_copy.clone(),
                expect: 0,
            },
        )
        .await;
    assert!(
        matches!(seated, Ok((_, Outcome::Seated { .. }))),
        "{seated:?}"
    );
    let intruding = cluster.groups(intruder).expect("running");
    let tries = [
        (
            Command::Seat {
                pod: victims_pod.clone(),
                holder: format!("{}/1", cluster.peer(intruder)),
                expect: 0,
            },
            "placed no such pod",
        ),
        (
            Command::Seat {
                pod: victims_pod.clone(),
                holder: victims_copy.clone(),
                expect: 1,
            },
            "not a copy of its own",
        ),
        (
            Command::Unseat {
                pod: victims_pod.clone(),
                holder: victims_copy.clone(),
            },
            "not a copy of its own",
        ),
        (
            Command::Lock {
                name: "primary".into(),
                holder: victims_pod.clone(),
                lease_ms: 60_000,
                now_ms: 0,
            },
            "placed no such pod",
        ),
    ];
    for (command, why) in tries {
        let refused = intruding.propose(&key, command.clone()).await;
        assert!(
            matches!(&refused, Err(ServiceError::Failed(message)) if message.contains(why)),
            "{command:?}: {refused:?}"
        );
    }
    let holder = own
        .state(&key)
        .expect("a member")
        .read(|applied| applied.kv.seat_of(&victims_pod).map(|s| s.holder.clone()));
    assert_eq!(holder, Some(victims_copy));
    // Its own pod's seat it takes.
    let own_seat = intruding
        .propose(
            &key,
            Command::Seat {
                pod: format!("db-{intruder}"),
                holder: format!("{}/1", cluster.peer(intruder)),
                expect: 0,
            },
        )
        .await;
    assert!(
        matches!(own_seat, Ok((_, Outcome::Seated { .. }))),
        "{own_seat:?}"
    );
}

/// A peer that reaches the members but is named in no word: its Raft calls are
/// closed unread and counted (a vote of a higher term would have deposed the leader), and a
/// word it forges, or one that claims to be the owner's but is not signed by it, is
/// refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_and_only_the_trusted_owners_word_counts() {
    use beemesh::raft::rpc::{self, Call, CallError};
    use beemesh::wire::Response;
    use openraft::raft::VoteRequest;
    use openraft::Vote;

    let cluster = Cluster::start(2).await;
    cluster.tell("db").await;
    let key = cluster.key("db");
    let leader = cluster.agreed_leader("db", Duration::from_secs(15)).await;
    let (_, term) = cluster
        .groups(0)
        .expect("running")
        .leader(&key)
        .expect("a member");

    // The stranger: a real peer on loopback, connected to both members.
    let stranger_key = Keypair::generate_ed25519();
    let bootstrap = cluster
        .members
        .iter()
        .filter_map(|m| m.running.as_ref().map(|(_, _, addr)| addr.clone()))
        .collect();
    let config = MeshConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")],
        bootstrap,
        accept_gossip: GossipFilter::new([], |_| true),
        ..MeshConfig::default()
    };
    let (stranger, mut events, event_loop) =
        mesh::start(stranger_key.clone(), config, Metrics::new()).expect("mesh starts");
    let cancel = CancellationToken::new();
    tokio::spawn(event_loop.run(cancel.clone()));
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    let stranger_id = stranger.local_peer_id();
    // Each call's stream is closed unread: the stranger's write or read of it fails.
    let vote = VoteRequest::new(
        Vote::new(term + 10, beemesh::raft::node_id(&stranger_id)),
        None,
    );
    for i in 0..2 {
        let answer = rpc::call(
            &stranger,
            cluster.peer(i),
            &key,
            Call::Vote(vote.clone()),
            Duration::from_secs(10),
        )
        .await;
        assert!(matches!(answer, Err(CallError::Relay(_))), "{answer:?}");
        let put = Command::Put {
            key: "k".into(),
            value: "stranger".into(),
            expect: None,
        };
        let answer = rpc::call(
            &stranger,
            cluster.peer(i),
            &key,
            Call::Propose(put),
            Duration::from_secs(10),
        )
        .await;
        assert!(matches!(answer, Err(CallError::Relay(_))), "{answer:?}");
        let dropped = cluster.members[i].metrics.render();
        assert!(
            dropped.contains(
                r#"mesh_messages_dropped_total{kind="raft_stream",reason="not_a_member"} 2"#
            ),
            "{dropped}"
        );
    }
    let groups = cluster.groups(0).expect("running");
    assert_eq!(groups.leader(&key).expect("a member"), (Some(leader), term));

    // A word the stranger signs, naming itself: not from a trusted owner.
    let mut members = cluster.word("db", 2).members;
    members.push(GroupMember {
        agent: PeerRef(stranger_id),
        pod: PodRef {
            uid: PodUid("uid-x".into()),
            namespace: "default".into(),
            name: "db-x".into(),
        },
    });
    let forged = sign(
        &stranger_key,
        Group {
            namespace: "default".into(),
            name: "db".into(),
            version: 2,
            founder: Some(cluster.peer(0)),
            members,
        },
    );
    let refused = groups.on_word(stranger_id, forged.clone()).await;
    assert!(matches!(refused, Response::Error { .. }), "{refused:?}");
    // The same word passed off as the owner's: its signature does not verify.
    let owner = cluster.owner.public().to_peer_id();
    let mut passed_off = forged;
    passed_off.owner = PeerRef(owner);
    let refused = groups.on_word(owner, passed_off).await;
    assert!(
        matches!(&refused, Response::Error { message } if message.contains("signature")),
        "{refused:?}"
    );
    let answer = rpc::call(
        &stranger,
        cluster.peer(0),
        &key,
        Call::Read(Read::Prefix {
            prefix: String::new(),
        }),
        Duration::from_secs(10),
    )
    .await;
    assert!(matches!(answer, Err(CallError::Relay(_))), "{answer:?}");
    assert_eq!(groups.word(&key).expect("the word").version, 1);
    cancel.cancel();
}

/// A pod moved from one agent to another moves its member: the leader adds the new
/// agent as a learner, then replaces the voters through joint consensus; the new member
/// has everything written before, and the agent left out leaves and deletes its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_pod_moves_its_member_through_joint_consensus() {
    // db-2's pod now runs on member 3 instead of member 2.
    move_a_pod(&[0, 1, 3], 2).await;
}

/// The founder's pod moved to a fresh agent, which the owner then names founder (the
/// oldest pod's agent): that agent starts a log of its own, but cannot lead over
/// members with the group's longer log; it joins the group as any new member does,
/// with everything written before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_founders_new_agent_joins_the_group_it_did_not_found() {
    move_a_pod(&[3, 1, 2], 0).await;
}

/// Members 0, 1 and 2 found group db and take 20 writes; then the owner's word names
/// `after` (member 3 among them; the first is the founder): member 3 becomes a voter
/// with the writes, `left` leaves and deletes its state, and the group takes writes.
async fn move_a_pod(after: &[usize], left: usize) {
    let cluster = Cluster::start(4).await;
    cluster.tell_of("db", 1, &[0, 1, 2], &[0, 1, 2]).await;
    let key = cluster.key("db");
    let writer = cluster.groups(1).expect("running");
    let deadline = Instant::now() + Duration::from_secs(15);
    for n in 0..20 {
        let put = Command::Put {
            key: format!("k{n}"),
            value: n.to_string(),
            expect: None,
        };
        while writer.propose(&key, put.clone()).await.is_err() {
            assert!(Instant::now() < deadline, "the group takes no writes");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    cluster.tell_of("db", 2, after, &[0, 1, 2, 3]).await;
    let newcomer = cluster.groups(3).expect("running");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut wanted: Vec<PeerId> = after.iter().map(|&i| cluster.peer(i)).collect();
    wanted.sort();
    loop {
        let state = newcomer.state(&key).map(|s| {
            s.read(|a| {
                let membership = a.membership.membership();
                let voters: Vec<PeerId> = membership
                    .voter_ids()
                    .filter_map(|id| membership.get_node(&id).and_then(beemesh::raft::peer_of))
                    .collect();
                (voters, a.kv.len())
            })
        });
        if let Some((voters, keys)) = &state {
            let mut voters = voters.clone();
            voters.sort();
            if voters == wanted && *keys == 20 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "member 3 never became a voter with the data: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = cluster.members[left].dir.join(key.dir_name());
    let leaver = cluster.groups(left).expect("running");
    let deadline = Instant::now() + Duration::from_secs(10);
    while leaver.word(&key).is_some() || gone.exists() {
        assert!(
            Instant::now() < deadline,
            "member {left} is still in the group"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let put = Command::Put {
        key: "after".into(),
        value: "moved".into(),
        expect: None,
    };
    newcomer
        .propose(&key, put)
        .await
        .expect("a write through the new member");
    // The voters agree on one leader among them.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let leaders: Vec<Option<PeerId>> = after
            .iter()
            .map(|&i| {
                let (leader, _) = cluster.groups(i)?.leader(&key).ok()?;
                leader
            })
            .collect();
        if leaders[0].is_some_and(|l| wanted.contains(&l))
            && leaders.iter().all(|l| *l == leaders[0])
        {
            break;
        }
        assert!(Instant::now() < deadline, "no leader agreed: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Percentiles of `samples` (sorted here), nearest rank.
fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// Figures for BENCHMARKS.md (hack/bench-raft.sh): write and read latency through a
/// follower and through the leader, writes per second from 16 concurrent writers, and
/// fail-over time, with 3 and 5 members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: hack/bench-raft.sh"]
async fn bench_kv_latency_throughput_and_failover() {
    for size in [3, 5] {
        let mut cluster = Cluster::start(size).await;
        cluster.tell("db").await;
        let key = cluster.key("db");
        let leader = cluster.agreed_leader("db", Duration::from_secs(15)).await;
        let leader_index = (0..size)
            .find(|i| cluster.peer(*i) == leader)
            .expect("a member leads");
        let follower_index = (leader_index + 1) % size;
        for (via, index) in [("leader", leader_index), ("follower", follower_index)] {
            let groups = cluster.groups(index).expect("running");
            let (mut writes, mut reads) = (Vec::new(), Vec::new());
            for n in 0..500 {
                let put = Command::Put {
                    key: format!("k{}", n % 10),
                    value: format!("{n}"),
                    expect: None,
                };
                let t = Instant::now();
                groups.propose(&key, put).await.expect("writes");
                writes.push(t.elapsed());
                let t = Instant::now();
                groups
                    .read(
                        &key,
                        Read::Key {
                            key: format!("k{}", n % 10),
                        },
                    )
                    .await
                    .expect("reads");
                reads.push(t.elapsed());
            }
            println!(
                "BENCH members={size} via={via} write_p50_ms={:.2} write_p99_ms={:.2} read_p50_ms={:.2} read_p99_ms={:.2}",
                percentile(&mut writes, 50.0).as_secs_f64() * 1e3,
                percentile(&mut writes, 99.0).as_secs_f64() * 1e3,
                percentile(&mut reads, 50.0).as_secs_f64() * 1e3,
                percentile(&mut reads, 99.0).as_secs_f64() * 1e3,
            );
        }
        // 16 writers, 5 s.
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = CancellationToken::new();
        let mut writers = Vec::new();
        for w in 0..16u64 {
            let groups = cluster.groups(w as usize % size).expect("running");
            let (key, written, stop) = (key.clone(), written.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.is_cancelled() {
                    n += 1;
                    let put = Command::Put {
                        key: format!("w{w}"),
                        value: format!("{n}"),
                        expect: None,
                    };
                    if groups.propose(&key, put).await.is_ok() {
                        written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.cancel();
        for w in writers {
            let _ = w.await;
        }
        println!(
            "BENCH members={size} writers=16 writes_per_s={:.0}",
            written.load(std::sync::atomic::Ordering::Relaxed) as f64 / 5.0
        );
        // Fail-over: the leader killed; time until the others agree on another.
        let killed = Instant::now();
        cluster.kill(leader_index);
        cluster
            .agreed_leader_but("db", Some(leader), Duration::from_secs(30))
            .await;
        let elected = killed.elapsed();
        let survivor = cluster.groups(follower_index).expect("running");
        let put = Command::Put {
            key: "after".into(),
            value: "failover".into(),
            expect: None,
        };
        survivor
            .propose(&key, put)
            .await
            .expect("writes after fail-over");
        println!(
            "BENCH members={size} failover_elected_ms={} failover_first_write_ms={}",
            elected.as_millis(),
            killed.elapsed().as_millis()
        );
    }
}

/// Memory of idle groups: 100 groups on 3 members (in this one process), each with
/// ten keys written, then the growth of the process's RSS per group and member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: hack/bench-raft.sh"]
async fn bench_idle_group_memory() {
    const GROUPS: usize = 100;
    let cluster = Cluster::start(3).await;
    // A first group settles the process (runtime, mesh connections) before measuring.
    cluster.tell("warm").await;
    cluster.agreed_leader("warm", Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = common::rss_kib(std::process::id());
    for g in 0..GROUPS {
        let name = format!("g{g}");
        cluster.tell(&name).await;
    }
    for g in 0..GROUPS {
        let name = format!("g{g}");
        cluster.agreed_leader(&name, Duration::from_secs(60)).await;
        let groups = cluster.groups(0).expect("running");
        for k in 0..10 {
            let put = Command::Put {
                key: format!("k{k}"),
                value: "v".repeat(100),
                expect: None,
            };
            groups
                .propose(&cluster.key(&name), put)
                .await
                .expect("writes");
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = common::rss_kib(std::process::id());
    println!(
        "BENCH idle_groups={GROUPS} members=3 rss_growth_kib={} per_group_member_kib={:.0}",
        after.saturating_sub(before),
        after.saturating_sub(before) as f64 / (GROUPS * 3) as f64
    );
}
