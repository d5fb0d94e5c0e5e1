//! Placement: which agents fit an offer, how they score, and why none fit.
//!
//! Pure logic shared by agents (to decide whether to bid) and owners (to order bids
//! and to explain a pending pod), so both sides judge a fit the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use crate::wire::{AgentHealth, LabelRequirement, Offer, Resources};

/// The pod annotation holding a label selector over agents' labels.
pub const AGENT_SELECTOR_ANNOTATION: &str = "beemesh.io/agent-selector";
/// `"true"`: a pod larger than every agent waits for a larger one instead of being
/// rejected (see [`Shortfall`]).
pub const WAIT_FOR_AGENT_ANNOTATION: &str = "beemesh.io/wait-for-agent";

/// Whether the pod is annotated to wait for an agent large enough.
pub fn waits_for_agent(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(WAIT_FOR_AGENT_ANNOTATION))
        .is_some_and(|v| v == "true")
}

/// How agents score offers they fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ScoreMode {
    /// Prefer the emptiest agent (the default).
    #[default]
    Spread,
    /// Prefer the fullest agent that still fits.
    Binpack,
}

/// What an agent offers for placement.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentCapacity {
    /// Shared: an owner copies an agent's capacity to take its reservations off, for
    /// every agent it looks at for every pod, and the labels never change with them.
    pub labels: Arc<BTreeMap<String, String>>,
    pub capacity: Resources,
    pub free: Resources,
    pub used_host_ports: BTreeSet<u16>,
    pub health: AgentHealth,
}

/// Why an agent does not fit an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Misfit {
    Cpu,
    Memory,
    Pods,
    Selector,
    HostPort,
    /// Its container runtime fails its checks.
    Runtime,
    MemoryPressure,
    DiskPressure,
    PidPressure,
}

impl fmt::Display for Misfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Misfit::Cpu => "insufficient cpu",
            Misfit::Memory => "insufficient memory",
            Misfit::Pods => "too many pods",
            Misfit::Selector => "didn't match the pod's agent selector",
            Misfit::HostPort => "host port in use",
            Misfit::Runtime => "container runtime unhealthy",
            Misfit::MemoryPressure => "under memory pressure",
            Misfit::DiskPressure => "under disk pressure",
            Misfit::PidPressure => "under PID pressure",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid agent selector {selector:?}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub reason: String,
}

/// Parses a label selector in Kubernetes' string form:
/// `zone=a,arch!=arm64,gpu,!spot,tier in (web,api),env notin (dev)`.
pub fn parse_selector(text: &str) -> Result<Vec<LabelRequirement>, SelectorError> {
    let err = |reason: &str| SelectorError {
        selector: text.to_string(),
        reason: reason.to_string(),
    };
    let mut out = Vec::new();
    for term in split_terms(text) {
        let term = term.trim();
        if term.is_empty() {
            if text.trim().is_empty() {
                continue;
            }
            return Err(err("empty requirement"));
        }
        out.push(parse_term(term).map_err(|r| err(&r))?);
    }
    Ok(out)
}

/// The agent selector a pod's [`AGENT_SELECTOR_ANNOTATION`] holds; none selects every
/// agent.
pub fn agent_selector_of(pod: &Pod) -> Result<Vec<LabelRequirement>, SelectorError> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(AGENT_SELECTOR_ANNOTATION))
        .map_or(Ok(Vec::new()), |text| parse_selector(text))
}

/// Splits on commas that are not inside parentheses.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn checked_key(key: &str) -> Result<String, String> {
    let key = key.trim();
    if valid_key(key) {
        Ok(key.to_string())
    } else {
        Err(format!("{key:?} is not a valid label key"))
    }
}

fn checked_value(value: &str) -> Result<String, String> {
    let value = value.trim();
    if valid_value(value) {
        Ok(value.to_string())
    } else {
        Err(format!("{value:?} is not a valid label value"))
    }
}

fn parse_set(rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected (values) but found {rest:?}"))?;
    let values = inner
        .split(',')
        .map(checked_value)
        .collect::<Result<Vec<_>, _>>()?;
    if values.iter().any(String::is_empty) {
        return Err("empty value in set".into());
    }
    Ok(values)
}

fn parse_term(term: &str) -> Result<LabelRequirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelRequirement::DoesNotExist {
            key: checked_key(key)?,
        });
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(LabelRequirement::NotEquals {
            key: checked_key(key)?,
            value: checked_value(value)?,
        });
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(LabelRequirement::Equals {
            key: checked_key(key)?,
            value: checked_value(value)?,
        });
    }
    let mut words = term.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default();
    match words.next().map(str::trim_start) {
        None => Ok(LabelRequirement::Exists {
            key: checked_key(key)?,
        }),
        Some(rest) => {
            if let Some(set) = rest.strip_prefix("notin") {
                Ok(LabelRequirement::NotIn {
                    key: checked_key(key)?,
                    values: parse_set(set)?,
                })
            } else if let Some(set) = rest.strip_prefix("in") {
                Ok(LabelRequirement::In {
                    key: checked_key(key)?,
                    values: parse_set(set)?,
                })
            } else {
                Err(format!("cannot parse requirement {term:?}"))
            }
        }
    }
}

/// Whether `labels` satisfy every requirement.
pub fn selector_matches(selector: &[LabelRequirement], labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|req| match req {
        LabelRequirement::Equals { key, value } => labels.get(key) == Some(value),
        LabelRequirement::NotEquals { key, value } => labels.get(key) != Some(value),
        LabelRequirement::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
        LabelRequirement::NotIn { key, values } => {
            labels.get(key).is_none_or(|v| !values.contains(v))
        }
        LabelRequirement::Exists { key } => labels.contains_key(key),
        LabelRequirement::DoesNotExist { key } => !labels.contains_key(key),
    })
}

/// Every reason `agent` cannot take `offer`; empty when it fits.
pub fn misfits(offer: &Offer, agent: &AgentCapacity) -> Vec<Misfit> {
    let mut out = Vec::new();
    let need = offer.requests;
    if need.cpu_millis > agent.free.cpu_millis {
        out.push(Misfit::Cpu);
    }
    if need.memory_bytes > agent.free.memory_bytes {
        out.push(Misfit::Memory);
    }
    if need.pods.max(1) > agent.free.pods {
        out.push(Misfit::Pods);
    }
    if !selector_matches(&offer.agent_selector, &agent.labels) {
        out.push(Misfit::Selector);
    }
    if offer
        .host_ports
        .iter()
        .any(|p| agent.used_host_ports.contains(p))
    {
        out.push(Misfit::HostPort);
    }
    // As the kubelet's admission under pressure, but for every pod: an agent that
    // cannot take pods well takes none.
    let health = &agent.health;
    for (failing, misfit) in [
        (health.runtime_error.is_some(), Misfit::Runtime),
        (health.memory_pressure, Misfit::MemoryPressure),
        (health.disk_pressure, Misfit::DiskPressure),
        (health.pid_pressure, Misfit::PidPressure),
    ] {
        if failing {
            out.push(misfit);
        }
    }
    out
}

/// The agent's bid score for an offer it fits, 0..=1000; higher wins.
pub fn score(offer: &Offer, agent: &AgentCapacity, mode: ScoreMode) -> i64 {
    // Fraction of each resource left free after placing the pod, averaged over cpu and
    // memory, in thousandths.
    let left = |free: u64, need: u64, cap: u64| -> i64 {
        if cap == 0 {
            return 0;
        }
        (free.saturating_sub(need) as u128 * 1000 / cap as u128) as i64
    };
    let cpu = left(
        agent.free.cpu_millis,
        offer.requests.cpu_millis,
        agent.capacity.cpu_millis,
    );
    let mem = left(
        agent.free.memory_bytes,
        offer.requests.memory_bytes,
        agent.capacity.memory_bytes,
    );
    let pods = left(agent.free.pods, 1, agent.capacity.pods);
    // Pods count too, so that equal machines spread pods that request nothing.
    let free_share = (cpu + mem + pods) / 3;
    match mode {
        ScoreMode::Spread => free_share,
        ScoreMode::Binpack => 1000 - free_share,
    }
}

/// Takes a pod's requests (and one pod) and its host ports off an agent's free
/// capacity: what it has been given and does not show yet.
pub fn reserve(agent: &mut AgentCapacity, requests: &Resources, host_ports: &[u16]) {
    let free = &mut agent.free;
    free.cpu_millis = free.cpu_millis.saturating_sub(requests.cpu_millis);
    free.memory_bytes = free.memory_bytes.saturating_sub(requests.memory_bytes);
    free.pods = free.pods.saturating_sub(1);
    agent.used_host_ports.extend(host_ports.iter().copied());
}

/// How many fitting agents an owner looks for before it stops searching, of `agents`
/// in all: as kube-scheduler's `numFeasibleNodesToFind` with its adaptive percentage
/// (all of them below 100; then 50% less 1% per 125 agents, at least 5%, and never
/// fewer than 100), so that placing one pod costs about the same at 10,000 agents as
/// at 1,000.
pub fn fitting_agents_to_find(agents: usize) -> usize {
    const MIN: usize = 100;
    if agents < MIN {
        return agents;
    }
    let percent = 50usize.saturating_sub(agents / 125).max(5);
    (agents * percent / 100).max(MIN)
}

/// Agents an owner's assignment goes to in turn when the first declines, before the
/// owner asks the agents instead.
pub const DIRECT_CANDIDATES: usize = 3;

/// A fitting agent as the owner ranks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<A> {
    pub agent: A,
    pub score: i64,
    /// Pods the owner gave it that its heartbeats do not show yet.
    pub unseen: usize,
}

/// Orders fitting agents best first: highest score; among equals, the agent with the
/// fewest pods given it lately (its heartbeats do not show them yet, so pods placed
/// together spread), then by `agent` so that the order is the same on every run.
pub fn rank<A: Ord>(candidates: &mut [Candidate<A>]) {
    candidates.sort_by(better);
}

/// Keeps the best `k` of `candidates`, ranked as [`rank`] does, without sorting the
/// rest: an owner looks at hundreds of fitting agents to try a few.
pub fn keep_best<A: Ord>(candidates: &mut Vec<Candidate<A>>, k: usize) {
    if k == 0 {
        candidates.clear();
        return;
    }
    if candidates.len() > k {
        candidates.select_nth_unstable_by(k - 1, better);
        candidates.truncate(k);
    }
    rank(candidates);
}

fn better<A: Ord>(a: &Candidate<A>, b: &Candidate<A>) -> std::cmp::Ordering {
    b.score
        .cmp(&a.score)
        .then(a.unseen.cmp(&b.unseen))
        .then(a.agent.cmp(&b.agent))
}

/// A pod that requests more of one resource than any agent (of those its selector
/// matches) has at all: no agent on the mesh will ever fit it, however empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// `cpu` (millicores) or `memory` (bytes), as the kubelet names them.
    pub resource: &'static str,
    pub requested: u64,
    /// The most any of those agents has.
    pub largest: u64,
    /// The most any of those agents has free now.
    pub largest_free: u64,
    pub agents: usize,
}

impl Shortfall {
    /// The kubelet's reason when a pod does not fit its node: `OutOfcpu`, `OutOfmemory`.
    pub fn reason(&self) -> String {
        format!("OutOf{}", self.resource)
    }

    /// What is short, for a waiting pod's message.
    pub fn beyond_every_agent(&self) -> String {
        format!(
            "it asks for more {} than any agent has ({} > {})",
            self.resource, self.requested, self.largest
        )
    }

    /// In the kubelet's words, for the mesh.
    pub fn message(&self) -> String {
        format!(
            "Pod was rejected: no agent has enough resource: {}, requested: {}, largest \
             capacity: {}, largest free: {} ({} agent{})",
            self.resource,
            self.requested,
            self.largest,
            self.largest_free,
            self.agents,
            if self.agents == 1 { "" } else { "s" }
        )
    }
}

/// Whether `offer` asks for more cpu or memory than any of `agents` matching its
/// selector has in all (not just free). None when no agent matches: a matching one may
/// yet join, and the selector is what the user would change.
pub fn shortfall<'a>(
    offer: &Offer,
    agents: impl IntoIterator<Item = &'a AgentCapacity>,
) -> Option<Shortfall> {
    let matching: Vec<&AgentCapacity> = agents
        .into_iter()
        .filter(|a| selector_matches(&offer.agent_selector, &a.labels))
        .collect();
    let largest =
        |amount: fn(&Resources) -> u64| matching.iter().map(|a| amount(&a.capacity)).max();
    let largest_free =
        |amount: fn(&Resources) -> u64| matching.iter().map(|a| amount(&a.free)).max();
    let cpu: (&'static str, u64, fn(&Resources) -> u64) =
        ("cpu", offer.requests.cpu_millis, |r| r.cpu_millis);
    let memory: (&'static str, u64, fn(&Resources) -> u64) =
        ("memory", offer.requests.memory_bytes, |r| r.memory_bytes);
    [cpu, memory]
        .into_iter()
        .find_map(|(resource, requested, amount)| {
            let largest = largest(amount)?;
            (requested > largest).then(|| Shortfall {
                resource,
                requested,
                largest,
                largest_free: largest_free(amount).unwrap_or(0),
                agents: matching.len(),
            })
        })
}

/// The message of a pod no agent can take, in the scheduler's words:
/// `0/3 agents fit: 2 insufficient memory, 1 didn't match the pod's agent selector`.
pub fn explain<'a>(offer: &Offer, agents: impl IntoIterator<Item = &'a AgentCapacity>) -> String {
    let mut total = 0;
    let mut fitting = 0;
    let mut counts: BTreeMap<Misfit, usize> = BTreeMap::new();
    for agent in agents {
        total += 1;
        let reasons = misfits(offer, agent);
        if reasons.is_empty() {
            fitting += 1;
        }
        for r in reasons {
            *counts.entry(r).or_default() += 1;
        }
    }
    if total == 0 {
        return "0/0 agents fit: no agent has joined the mesh".to_string();
    }
    let mut parts: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
    if fitting > 0 {
        // Their heartbeats say they fit, yet no bid came.
        parts.push(format!(
            "{fitting} declined or did not bid (agents take pods only from owners they \
             trust, that their policy allows and within the owner's quota there)"
        ));
    }
    format!("{fitting}/{total} agents fit: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Epoch, PodRef, PodUid};

    fn offer(cpu: u64, mem: u64, selector: &str) -> Offer {
        Offer {
            pod: PodRef {
                uid: PodUid("u".into()),
                namespace: "default".into(),
                name: "p".into(),
            },
            epoch: Epoch(1),
            requests: Resources {
                cpu_millis: cpu,
                memory_bytes: mem,
                pods: 1,
            },
            agent_selector: parse_selector(selector).expect("valid selector"),
            host_ports: vec![],
            spec_digest: String::new(),
        }
    }

    #[test]
    fn a_pod_beyond_every_matching_agents_capacity_is_a_shortfall_and_a_full_one_is_not() {
        let mut small = agent(2000, 4 << 30, &[("zone", "a")]);
        small.capacity = small.free;
        // 4 cpus and 8 GiB in all, nothing free.
        let full = agent(0, 0, &[("zone", "b")]);
        // 3 cpus: more than the zone-a agent has at all; the zone-b agent is only full.
        assert_eq!(shortfall(&offer(3000, 0, ""), [&small, &full]), None);
        let wanted = shortfall(&offer(3000, 0, "zone=a"), [&small, &full]).expect("shortfall");
        assert_eq!(wanted.reason(), "OutOfcpu");
        assert_eq!(
            wanted.beyond_every_agent(),
            "it asks for more cpu than any agent has (3000 > 2000)"
        );
        assert_eq!(
            wanted.message(),
            "Pod was rejected: no agent has enough resource: cpu, requested: 3000, largest \
             capacity: 2000, largest free: 2000 (1 agent)"
        );
        let memory = shortfall(&offer(100, 9 << 30, ""), [&small, &full]).expect("shortfall");
        assert_eq!(
            (memory.reason().as_str(), memory.agents),
            ("OutOfmemory", 2)
        );
        // No agent matches the selector: one may join; not a shortfall.
        assert_eq!(shortfall(&offer(3000, 0, "zone=c"), [&small, &full]), None);
        assert_eq!(shortfall(&offer(3000, 0, ""), []), None);
    }

    #[test]
    fn an_unhealthy_agent_fits_nothing_and_says_why() {
        let mut sick = agent(4000, 8 << 30, &[]);
        sick.health = AgentHealth {
            runtime_error: Some("ping: connection refused".into()),
            memory_pressure: true,
            ..AgentHealth::default()
        };
        let o = offer(100, 1 << 20, "");
        assert_eq!(
            misfits(&o, &sick),
            vec![Misfit::Runtime, Misfit::MemoryPressure]
        );
        let well = agent(4000, 8 << 30, &[]);
        assert_eq!(
            explain(&o, [&sick, &well]),
            "1/2 agents fit: 1 container runtime unhealthy, 1 under memory pressure, 1 declined or did not bid (agents take pods only from owners they trust, that their policy allows and within the owner's quota there)"
        );
    }

    fn agent(free_cpu: u64, free_mem: u64, labels: &[(&str, &str)]) -> AgentCapacity {
        AgentCapacity {
            labels: Arc::new(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            capacity: Resources {
                cpu_millis: 4000,
                memory_bytes: 8 << 30,
                pods: 110,
            },
            free: Resources {
                cpu_millis: free_cpu,
                memory_bytes: free_mem,
                pods: 10,
            },
            used_host_ports: BTreeSet::new(),
            health: AgentHealth::default(),
        }
    }

    #[test]
    fn reservations_spread_a_burst_over_agents_of_unequal_room() {
        // Twelve pods placed before either agent's heartbeat shows any of them: by
        // the heartbeats alone the emptier agent would get all twelve.
        let mut agents = [agent(4000, 8 << 30, &[]), agent(3000, 8 << 30, &[])];
        let o = offer(250, 256 << 20, "");
        let mut given = [0, 0];
        for _ in 0..12 {
            let best = (0..2)
                .max_by_key(|&i| score(&o, &agents[i], ScoreMode::Spread))
                .expect("two agents");
            reserve(&mut agents[best], &o.requests, &[]);
            given[best] += 1;
        }
        assert!(given[1] >= 4, "{given:?}");
        assert!(given[0] > given[1], "{given:?}");
        assert_eq!(agents[0].free.pods + agents[1].free.pods, 20 - 12);
    }

    #[test]
    fn a_reserved_host_port_is_taken() {
        let mut a = agent(4000, 8 << 30, &[]);
        let mut o = offer(100, 1 << 20, "");
        o.host_ports = vec![8080];
        reserve(&mut a, &Resources::default(), &[8080]);
        assert_eq!(misfits(&o, &a), vec![Misfit::HostPort]);
    }

    #[test]
    fn fitting_agents_to_find_follows_the_scheduler() {
        // kube-scheduler's figures: all below 100, 42% of 1,000, 5% of 10,000.
        assert_eq!(fitting_agents_to_find(0), 0);
        assert_eq!(fitting_agents_to_find(99), 99);
        assert_eq!(fitting_agents_to_find(100), 100);
        assert_eq!(fitting_agents_to_find(200), 100);
        assert_eq!(fitting_agents_to_find(1000), 420);
        assert_eq!(fitting_agents_to_find(5000), 500);
        assert_eq!(fitting_agents_to_find(10_000), 500);
        assert_eq!(fitting_agents_to_find(100_000), 5000);
    }

    #[test]
    fn ranking_prefers_score_then_fewer_unseen_pods_then_the_agent() {
        let c = |agent, score, unseen| Candidate {
            agent,
            score,
            unseen,
        };
        let mut candidates = vec![c(1, 500, 0), c(2, 700, 3), c(3, 700, 1), c(0, 700, 1)];
        rank(&mut candidates);
        let order: Vec<u32> = candidates.iter().map(|c| c.agent).collect();
        assert_eq!(order, vec![0, 3, 2, 1]);
    }

    #[test]
    fn keeping_the_best_ranks_as_a_full_ranking_begins() {
        let all: Vec<Candidate<u32>> = (0..50u32)
            .map(|i| Candidate {
                agent: i * 7 % 50,
                score: i64::from(i * 13 % 5) * 100,
                unseen: (i % 3) as usize,
            })
            .collect();
        let mut ranked = all.clone();
        rank(&mut ranked);
        for k in [0, 1, 3, 49, 50, 80] {
            let mut best = all.clone();
            keep_best(&mut best, k);
            assert_eq!(best, ranked[..k.min(50)], "k = {k}");
        }
    }

    #[test]
    fn selector_syntax() {
        let sel =
            parse_selector("zone=a, arch!=arm64,gpu,!spot,tier in (web, api),env notin (dev)")
                .expect("parses");
        assert_eq!(sel.len(), 6);
        let labels: BTreeMap<String, String> = [("zone", "a"), ("gpu", "1"), ("tier", "api")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(selector_matches(&sel, &labels));
        let mut other = labels.clone();
        other.insert("spot".into(), "true".into());
        assert!(!selector_matches(&sel, &other));
        assert!(parse_selector("").expect("empty ok").is_empty());
        for bad in [
            "zone in web",
            "a=b=c d",
            "=x",
            "zone in ()",
            "k=v,,",
            "x y z",
            "tier in (a b)",
        ] {
            assert!(parse_selector(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn fit_checks_every_resource_and_the_selector() {
        let o = offer(500, 1 << 30, "zone=a");
        assert!(misfits(&o, &agent(1000, 2 << 30, &[("zone", "a")])).is_empty());
        assert_eq!(
            misfits(&o, &agent(100, 100, &[("zone", "b")])),
            vec![Misfit::Cpu, Misfit::Memory, Misfit::Selector]
        );
        let mut full = agent(1000, 2 << 30, &[("zone", "a")]);
        full.free.pods = 0;
        assert_eq!(misfits(&o, &full), vec![Misfit::Pods]);
        let mut ported = agent(1000, 2 << 30, &[("zone", "a")]);
        ported.used_host_ports.insert(8080);
        let mut o2 = o.clone();
        o2.host_ports = vec![8080];
        assert_eq!(misfits(&o2, &ported), vec![Misfit::HostPort]);
    }

    #[test]
    fn spread_prefers_the_emptier_agent_and_binpack_the_fuller() {
        let o = offer(100, 1 << 20, "");
        let empty = agent(4000, 8 << 30, &[]);
        let busy = agent(1000, 1 << 30, &[]);
        assert!(score(&o, &empty, ScoreMode::Spread) > score(&o, &busy, ScoreMode::Spread));
        assert!(score(&o, &empty, ScoreMode::Binpack) < score(&o, &busy, ScoreMode::Binpack));
    }

    #[test]
    fn explanation_counts_reasons_like_the_scheduler() {
        let o = offer(0, 4 << 30, "");
        let agents = [
            agent(1000, 1 << 30, &[]),
            agent(1000, 1 << 30, &[]),
            agent(1000, 1 << 30, &[]),
        ];
        assert_eq!(
            explain(&o, &agents),
            "0/3 agents fit: 3 insufficient memory"
        );
        assert_eq!(
            explain(&o, &[]),
            "0/0 agents fit: no agent has joined the mesh"
        );
        let roomy = agent(1000, 8 << 30, &[]);
        assert_eq!(
            explain(&o, &[roomy, agent(1000, 1 << 30, &[])]),
            "1/2 agents fit: 1 insufficient memory, 1 declined or did not bid (agents take pods only from owners they trust, that their policy allows and within the owner's quota there)"
        );
    }
}
