//! The kubelet's resource usage endpoints, rendered from the agents' samples: the
//! Summary API (`/stats/summary`, stats/v1alpha1) and the Prometheus resource metrics
//! (`/metrics/resource`) that metrics-server, and so `kubectl top`, reads. Pure.

use std::collections::HashMap;
use std::fmt::Write;

use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};

use crate::wire::{PodUid, PodUsage};

/// The agents' answers, taken at one time.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at: Timestamp,
    pub pods: Vec<PodUsage>,
}

type ContainerKey = (PodUid, String);

/// CPU rates from consecutive samples (the Summary API's usageNanoCores).
#[derive(Debug, Default)]
pub struct Rates {
    last: HashMap<ContainerKey, (u64, Timestamp)>,
}

impl Rates {
    /// Nanocores per container since the previous sample (absent on the first).
    pub fn update(&mut self, sample: &Sample) -> HashMap<ContainerKey, u64> {
        let mut rates = HashMap::new();
        let mut seen = HashMap::new();
        for pod in &sample.pods {
            for container in &pod.containers {
                let key = (pod.pod.uid.clone(), container.name.clone());
                if let Some((cpu, at)) = self.last.get(&key) {
                    let seconds = sample.at.duration_since(*at).as_secs_f64();
                    if seconds > 0.0 && container.cpu_nanos >= *cpu {
                        let rate = (container.cpu_nanos - cpu) as f64 / seconds;
                        rates.insert(key.clone(), rate as u64);
                    }
                }
                seen.insert(key, (container.cpu_nanos, sample.at));
            }
        }
        self.last = seen;
        rates
    }
}

fn time(at: Timestamp) -> String {
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn usage(at: Timestamp, cpu_nanos: u64, rate: Option<u64>, memory: u64) -> (Value, Value) {
    let mut cpu = json!({"time": time(at), "usageCoreNanoSeconds": cpu_nanos});
    if let Some(rate) = rate {
        cpu["usageNanoCores"] = json!(rate);
    }
    let memory = json!({"time": time(at), "usageBytes": memory, "workingSetBytes": memory});
    (cpu, memory)
}

/// The Summary API's answer.
pub fn summary(
    node_name: &str,
    node_start: Timestamp,
    sample: &Sample,
    rates: &HashMap<ContainerKey, u64>,
) -> Value {
    let (mut node_cpu, mut node_rate, mut node_memory) = (0u64, 0u64, 0u64);
    let pods: Vec<Value> = sample
        .pods
        .iter()
        .map(|pod| {
            let (mut pod_cpu, mut pod_rate, mut pod_memory) = (0u64, 0u64, 0u64);
            let mut started: Option<i64> = None;
            let containers: Vec<Value> = pod
                .containers
                .iter()
                .map(|c| {
                    let rate = rates.get(&(pod.pod.uid.clone(), c.name.clone())).copied();
                    pod_cpu += c.cpu_nanos;
                    pod_rate += rate.unwrap_or(0);
                    pod_memory += c.memory_bytes;
                    started = match (started, c.started_at) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    let (cpu, memory) = usage(sample.at, c.cpu_nanos, rate, c.memory_bytes);
                    let mut container = json!({"name": c.name, "cpu": cpu, "memory": memory});
                    if let Some(start) = c.started_at.and_then(|s| Timestamp::from_second(s).ok()) {
                        container["startTime"] = json!(time(start));
                    }
                    container
                })
                .collect();
            node_cpu += pod_cpu;
            node_rate += pod_rate;
            node_memory += pod_memory;
            let (cpu, memory) = usage(sample.at, pod_cpu, Some(pod_rate), pod_memory);
            let mut value = json!({
                "podRef": {"name": pod.pod.name, "namespace": pod.pod.namespace, "uid": pod.pod.uid.0},
                "containers": containers,
                "cpu": cpu,
                "memory": memory,
            });
            if let Some(start) = started.and_then(|s| Timestamp::from_second(s).ok()) {
                value["startTime"] = json!(time(start));
            }
            value
        })
        .collect();
    let (cpu, memory) = usage(sample.at, node_cpu, Some(node_rate), node_memory);
    json!({
        "node": {"nodeName": node_name, "startTime": time(node_start), "cpu": cpu, "memory": memory},
        "pods": pods,
    })
}

/// The kubelet's /metrics/resource, in the Prometheus text format.
pub fn resource_metrics(sample: &Sample) -> String {
    let ms = sample.at.as_millisecond();
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} [STABLE] {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value} {ms}");
        }
    };
    let quote = |text: &str| {
        text.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let container_labels = |pod: &PodUsage, container: &str| {
        format!(
            "{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}}",
            quote(container),
            quote(&pod.pod.namespace),
            quote(&pod.pod.name)
        )
    };
    let pod_labels = |pod: &PodUsage| {
        format!(
            "{{namespace=\"{}\",pod=\"{}\"}}",
            quote(&pod.pod.namespace),
            quote(&pod.pod.name)
        )
    };
    let containers = || {
        sample
            .pods
            .iter()
            .flat_map(|pod| pod.containers.iter().map(move |c| (pod, c)))
    };
    let seconds = |nanos: u64| nanos as f64 / 1e9;
    family(
        "container_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the container in core-seconds",
        containers()
            .map(|(pod, c)| (container_labels(pod, &c.name), seconds(c.cpu_nanos)))
            .collect(),
    );
    family(
        "container_memory_working_set_bytes",
        "gauge",
        "Current working set of the container in bytes",
        containers()
            .map(|(pod, c)| (container_labels(pod, &c.name), c.memory_bytes as f64))
            .collect(),
    );
    family(
        "container_start_time_seconds",
        "gauge",
        "Start time of the container since unix epoch in seconds",
        containers()
            .filter_map(|(pod, c)| Some((container_labels(pod, &c.name), c.started_at? as f64)))
            .collect(),
    );
    let pod_total = |pod: &PodUsage, pick: fn(&crate::wire::ContainerUsage) -> u64| {
        pod.containers.iter().map(pick).sum::<u64>()
    };
    family(
        "pod_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the pod in core-seconds",
        sample
            .pods
            .iter()
            .map(|pod| (pod_labels(pod), seconds(pod_total(pod, |c| c.cpu_nanos))))
            .collect(),
    );
    family(
        "pod_memory_working_set_bytes",
        "gauge",
        "Current working set of the pod in bytes",
        sample
            .pods
            .iter()
            .map(|pod| (pod_labels(pod), pod_total(pod, |c| c.memory_bytes) as f64))
            .collect(),
    );
    let all_cpu: u64 = sample
        .pods
        .iter()
        .map(|p| pod_total(p, |c| c.cpu_nanos))
        .sum();
    let all_memory: u64 = sample
        .pods
        .iter()
        .map(|p| pod_total(p, |c| c.memory_bytes))
        .sum();
    family(
        "node_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the node in core-seconds",
        vec![(String::new(), seconds(all_cpu))],
    );
    family(
        "node_memory_working_set_bytes",
        "gauge",
        "Current working set of the node in bytes",
        vec![(String::new(), all_memory as f64)],
    );
    let _ = writeln!(out, "# HELP scrape_error [ALPHA] 1 if there was an error while getting container metrics, 0 otherwise");
    let _ = writeln!(out, "# TYPE scrape_error gauge");
    let _ = writeln!(out, "scrape_error 0");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ContainerUsage, PodRef};

    fn sample(at: i64, cpu: u64) -> Sample {
        Sample {
            at: Timestamp::from_second(at).expect("time"),
            pods: vec![PodUsage {
                pod: PodRef {
                    uid: PodUid("u1".into()),
                    namespace: "default".into(),
                    name: "web".into(),
                },
                containers: vec![
                    ContainerUsage {
                        name: "app".into(),
                        cpu_nanos: cpu,
                        memory_bytes: 4 << 20,
                        started_at: Some(at - 100),
                    },
                    ContainerUsage {
                        name: "side".into(),
                        cpu_nanos: 1_000_000,
                        memory_bytes: 1 << 20,
                        started_at: Some(at - 50),
                    },
                ],
            }],
        }
    }

    #[test]
    fn the_summary_sums_containers_into_pods_and_the_node_with_rates() {
        let mut rates = Rates::default();
        assert!(rates.update(&sample(1_000, 2_000_000_000)).is_empty());
        let later = sample(1_010, 7_000_000_000);
        let per_container = rates.update(&later);
        // 5 s of CPU over 10 s: half a core.
        assert_eq!(
            per_container[&(PodUid("u1".into()), "app".to_string())],
            500_000_000
        );
        let start = Timestamp::from_second(500).expect("time");
        let summary = summary("beemesh", start, &later, &per_container);
        let pod = &summary["pods"][0];
        assert_eq!(pod["podRef"]["name"], "web");
        assert_eq!(pod["containers"][0]["cpu"]["usageNanoCores"], 500_000_000);
        assert_eq!(pod["cpu"]["usageCoreNanoSeconds"], 7_001_000_000u64);
        assert_eq!(pod["memory"]["workingSetBytes"], 5u64 << 20);
        assert_eq!(summary["node"]["memory"]["workingSetBytes"], 5u64 << 20);
        assert_eq!(pod["startTime"], "1970-01-01T00:15:10Z");
    }

    #[test]
    fn resource_metrics_are_the_kubelets_families() {
        let text = resource_metrics(&sample(1_000, 2_500_000_000));
        assert!(text.contains(
            "container_cpu_usage_seconds_total{container=\"app\",namespace=\"default\",pod=\"web\"} 2.5 1000000"
        ), "{text}");
        assert!(
            text.contains(
                "pod_memory_working_set_bytes{namespace=\"default\",pod=\"web\"} 5242880 1000000"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE node_cpu_usage_seconds_total counter"));
        assert!(text.ends_with("scrape_error 0\n"));
    }
}
