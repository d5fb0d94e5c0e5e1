//! Plain-text tables for people: `beemesh status` (as `kubectl get -o wide` lays
//! pods out) and `beemesh token list`.

use crate::wire::{AgentHealth, MeshView};

/// The mesh view as two aligned tables, agents then pods; ages against `now` (Unix
/// seconds).
pub fn render_status(view: &MeshView, now: i64) -> String {
    let mut rows = vec![[
        "AGENT",
        "LABELS",
        "HEALTH",
        "PODS",
        "CPU FREE/TOTAL",
        "MEMORY FREE/TOTAL",
        "LAST HEARTBEAT",
    ]
    .map(String::from)
    .to_vec()];
    for a in &view.agents {
        rows.push(vec![
            a.peer.to_string(),
            or_none(
                a.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            health_text(&a.health),
            format!("{}/{}", a.pods, a.capacity.pods),
            format!("{}m/{}m", a.free.cpu_millis, a.capacity.cpu_millis),
            format!(
                "{}/{}",
                human_bytes(a.free.memory_bytes),
                human_bytes(a.capacity.memory_bytes)
            ),
            format!("{} ago", human_age(a.last_seen_secs as i64)),
        ]);
    }
    let mut out = table(&rows);
    out.push('\n');
    let mut rows = vec![[
        "NAMESPACE",
        "NAME",
        "READY",
        "STATUS",
        "RESTARTS",
        "AGE",
        "MESH IP",
        "AGENT",
        "NODE",
        "MESSAGE",
    ]
    .map(String::from)
    .to_vec()];
    for p in &view.pods {
        rows.push(vec![
            p.pod.namespace.clone(),
            p.pod.name.clone(),
            p.ready
                .map_or_else(|| "-".into(), |r| format!("{}/{}", r.ready, r.total)),
            p.status.clone().unwrap_or_else(|| p.phase.clone()),
            p.restarts.to_string(),
            p.created_at
                .map_or_else(|| "<unknown>".into(), |at| human_age(now - at)),
            or_none(p.ip.clone().unwrap_or_default()),
            p.agent.map_or_else(|| "<none>".into(), |a| a.to_string()),
            or_none(p.node.clone().unwrap_or_default()),
            match (&p.reason, &p.message) {
                (Some(r), Some(m)) => format!("{r}: {m}"),
                (Some(r), None) => r.clone(),
                (None, Some(m)) => m.clone(),
                (None, None) => String::new(),
            },
        ]);
    }
    out.push_str(&table(&rows));
    if !view.services.is_empty() {
        let mut rows = vec![
            ["NAMESPACE", "SERVICE", "CLUSTER-IP", "PORT(S)", "ENDPOINTS"]
                .map(String::from)
                .to_vec(),
        ];
        for s in &view.services {
            rows.push(vec![
                s.namespace.clone(),
                s.name.clone(),
                s.cluster_ip.clone(),
                s.ports.join(","),
                s.ready_endpoints.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    out
}

fn or_none(text: String) -> String {
    if text.is_empty() {
        "<none>".into()
    } else {
        text
    }
}

/// "ok", or what is wrong with an agent.
fn health_text(health: &AgentHealth) -> String {
    let mut problems = Vec::new();
    if let Some(error) = &health.runtime_error {
        problems.push(format!("runtime failing ({error})"));
    }
    for (under, kind) in [
        (health.memory_pressure, "memory"),
        (health.disk_pressure, "disk"),
        (health.pid_pressure, "PID"),
    ] {
        if under {
            problems.push(format!("{kind} pressure"));
        }
    }
    if problems.is_empty() {
        "ok".into()
    } else {
        problems.join(", ")
    }
}

/// A duration in seconds as kubectl says an age (apimachinery's `HumanDuration`):
/// `45s`, `3m20s`, `25m`, `5h12m`, `30h`, `3d4h`, `40d`, `2y10d`.
pub fn human_age(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let secs = secs.max(0);
    let (minutes, hours) = (secs / 60, secs / 3600);
    let (days, years) = (hours / 24, hours / 24 / 365);
    match secs {
        s if s < 120 => format!("{s}s"),
        _ if minutes < 10 => with_rest(minutes, "m", secs % 60, "s"),
        _ if minutes < 180 => format!("{minutes}m"),
        _ if hours < 8 => with_rest(hours, "h", minutes % 60, "m"),
        _ if hours < 48 => format!("{hours}h"),
        _ if hours < 24 * 8 => with_rest(days, "d", hours % 24, "h"),
        _ if hours < 24 * 365 * 2 => format!("{days}d"),
        _ if hours < 24 * 365 * 8 => with_rest(years, "y", days % 365, "d"),
        _ => format!("{years}y"),
    }
}

fn with_rest(whole: i64, unit: &str, rest: i64, rest_unit: &str) -> String {
    if rest == 0 {
        format!("{whole}{unit}")
    } else {
        format!("{whole}{unit}{rest}{rest_unit}")
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["", "Ki", "Mi", "Gi", "Ti"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// Rows as columns aligned on their widest cell, three spaces apart.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |cell| cell.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{
        AgentSummary, Epoch, PeerRef, PodRef, PodSummary, PodUid, ReadyCount, Resources,
        ServiceSummary,
    };
    use libp2p::PeerId;

    fn view() -> MeshView {
        let agent = PeerId::random();
        MeshView {
            agents: vec![AgentSummary {
                peer: PeerRef(agent),
                labels: [("zone".to_string(), "a".to_string())].into(),
                capacity: Resources {
                    cpu_millis: 2000,
                    memory_bytes: 4 << 30,
                    pods: 110,
                },
                free: Resources {
                    cpu_millis: 1500,
                    memory_bytes: 3 << 30,
                    pods: 109,
                },
                pods: 1,
                last_seen_secs: 1,
                health: AgentHealth {
                    disk_pressure: true,
                    ..AgentHealth::default()
                },
            }],
            pods: vec![
                PodSummary {
                    reason: Some("Unschedulable".into()),
                    message: Some("0/1 agents fit: 1 insufficient memory".into()),
                    status: Some("Pending".into()),
                    ready: Some(ReadyCount { ready: 0, total: 1 }),
                    created_at: Some(1_000),
                    node: Some("beemesh".into()),
                    ..PodSummary::new(
                        PodRef {
                            uid: PodUid("u".into()),
                            namespace: "default".into(),
                            name: "big".into(),
                        },
                        None,
                        Epoch(0),
                        "Pending".into(),
                    )
                },
                PodSummary {
                    status: Some("CrashLoopBackOff".into()),
                    ready: Some(ReadyCount { ready: 0, total: 2 }),
                    restarts: 7,
                    created_at: Some(1_000 - 3 * 3600),
                    ip: Some("10.88.0.7".into()),
                    node: Some("beemesh".into()),
                    ..PodSummary::new(
                        PodRef {
                            uid: PodUid("v".into()),
                            namespace: "web".into(),
                            name: "crasher".into(),
                        },
                        Some(PeerRef(agent)),
                        Epoch(3),
                        "Running".into(),
                    )
                },
            ],
            services: vec![ServiceSummary {
                namespace: "web".into(),
                name: "front".into(),
                cluster_ip: "10.80.3.4".into(),
                ports: vec!["80/TCP".into(), "443/TCP".into()],
                ready_endpoints: 2,
            }],
        }
    }

    #[test]
    fn status_tables_show_what_kubectl_get_wide_shows_and_align() {
        let view = view();
        let agent = view.agents[0].peer.to_string();
        let text = render_status(&view, 1_125);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("AGENT") && lines[0].ends_with("LAST HEARTBEAT"));
        let agent_row = lines[1];
        for cell in [
            "zone=a",
            "disk pressure",
            "1/110",
            "1500m/2000m",
            "3.0Gi/4.0Gi",
        ] {
            assert!(agent_row.contains(cell), "{cell} in {agent_row}");
        }
        assert!(agent_row.ends_with("1s ago"), "{agent_row}");
        let header = lines
            .iter()
            .find(|l| l.starts_with("NAMESPACE"))
            .expect("pods");
        let big = lines.iter().find(|l| l.contains(" big ")).expect("big");
        assert!(big.starts_with("default"));
        assert!(big.contains("0/1") && big.contains("Pending") && big.contains("2m5s"));
        let cell = |row: &str, column: &str| {
            let at = header.find(column).expect("column");
            row[at..]
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(cell(big, "MESH IP"), "<none>");
        assert_eq!(cell(big, "AGENT"), "<none>");
        assert_eq!(cell(big, "NODE"), "beemesh");
        assert!(big.ends_with("Unschedulable: 0/1 agents fit: 1 insufficient memory"));
        let crasher = lines
            .iter()
            .find(|l| l.contains("crasher"))
            .expect("crasher");
        for cell in [
            "0/2",
            "CrashLoopBackOff",
            " 7 ",
            "3h2m",
            "10.88.0.7",
            &agent,
        ] {
            assert!(crasher.contains(cell), "{cell} in {crasher}");
        }
        // Columns line up under their headers.
        for (column, value) in [("STATUS", "CrashLoopBackOff"), ("MESH IP", "10.88.0.7")] {
            assert_eq!(cell(crasher, column), value);
        }
        // Then the Services, as kubectl get services shows them, with their endpoints.
        let services = lines
            .iter()
            .position(|l| l.starts_with("NAMESPACE") && l.contains("CLUSTER-IP"))
            .expect("services");
        assert!(
            lines[services].ends_with("ENDPOINTS"),
            "{}",
            lines[services]
        );
        let front: Vec<&str> = lines[services + 1].split_whitespace().collect();
        assert_eq!(front, ["web", "front", "10.80.3.4", "80/TCP,443/TCP", "2"]);
    }

    #[test]
    fn ages_read_as_kubectl_says_them() {
        for (secs, age) in [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (200, "3m20s"),
            (599, "9m59s"),
            (600, "10m"),
            (3 * 3600 - 1, "179m"),
            (3 * 3600, "3h"),
            (5 * 3600 + 12 * 60, "5h12m"),
            (30 * 3600, "30h"),
            (3 * 86400 + 4 * 3600, "3d4h"),
            (40 * 86400, "40d"),
            (2 * 365 * 86400 + 10 * 86400, "2y10d"),
            (9 * 365 * 86400, "9y"),
        ] {
            assert_eq!(human_age(secs), age, "{secs} s");
        }
    }
}
