//! The chart catalogue: what well-known charts render with their default values
//! (`tests/fixtures/charts`, see its README), the pods their controllers would make of
//! it, and what BeeMesh is expected to do with each: run it, or refuse it with a
//! precise reason. `tests/catalogue.rs` checks each pod on the mesh; `tests/readme.rs`
//! keeps the README's table equal to [`table`].
// Each of those two test binaries uses only part of it.
#![allow(dead_code)]

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/charts");

/// What BeeMesh does with a catalogue pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Running, with every container started.
    Runs,
    /// `Failed`, reason `UnsupportedPodSpec`, with this message.
    Refused(&'static str),
}

/// Each catalogue pod, by name, with what BeeMesh does with it.
pub const EXPECTED: &[(&str, Expected)] = &[
    ("demo-grafana-catalogue", Expected::Runs),
    ("demo-nginx-catalogue", Expected::Runs),
    (
        "demo-postgresql-0",
        Expected::Refused(
            "spec.volumes[5].persistentVolumeClaim: persistentVolumeClaim volumes are not supported",
        ),
    ),
    ("demo-postgresql-ephemeral-0", Expected::Runs),
    (
        "demo-prometheus-node-exporter-catalogue",
        Expected::Refused("spec.hostNetwork: host networking is not supported"),
    ),
    (
        "demo-redis-master-0",
        Expected::Refused(
            "spec.volumes[4].persistentVolumeClaim: persistentVolumeClaim volumes are not supported",
        ),
    ),
    ("demo-redis-master-ephemeral-0", Expected::Runs),
    (
        "demo-redis-replicas-0",
        Expected::Refused(
            "spec.volumes[4].persistentVolumeClaim: persistentVolumeClaim volumes are not supported",
        ),
    ),
    ("demo-redis-replicas-ephemeral-0", Expected::Runs),
];

/// One chart's rendering.
pub struct Chart {
    /// The file's name without `.yaml`.
    pub name: String,
    /// `<repo>/<chart> <version>`, the header's first words (which
    /// hack/render-charts.sh renders from).
    pub title: String,
    pub objects: Vec<Value>,
}

/// A pod as the chart's controller (Deployment, StatefulSet, DaemonSet) would make it.
pub struct CataloguePod {
    pub chart: String,
    /// `Kind/name` of the workload it comes from.
    pub workload: String,
    pub pod: Value,
}

impl CataloguePod {
    pub fn name(&self) -> &str {
        self.pod["metadata"]["name"].as_str().unwrap_or_default()
    }

    pub fn expected(&self) -> Option<Expected> {
        EXPECTED
            .iter()
            .find(|(name, _)| *name == self.name())
            .map(|(_, expected)| *expected)
    }
}

/// Every chart of the catalogue, by name.
pub fn charts() -> Vec<Chart> {
    let mut files: Vec<_> = std::fs::read_dir(FIXTURES)
        .expect("tests/fixtures/charts")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files.iter().map(|path| chart(path)).collect()
}

fn chart(path: &Path) -> Chart {
    let text = std::fs::read_to_string(path).expect("chart rendering");
    let title = text
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("# "))
        .map(|line| {
            line.split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let objects = serde_yaml::Deserializer::from_str(&text)
        .filter_map(|document| {
            let mut value =
                Value::deserialize(document).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            yaml_1_1_modes(&mut value);
            (!value.is_null()).then_some(value)
        })
        .collect();
    Chart {
        name: path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string(),
        title,
        objects,
    }
}

/// File modes written as YAML 1.1 octals (`defaultMode: 0755`), which kubectl reads as
/// octal numbers and serde_yaml (YAML 1.2) as strings.
fn yaml_1_1_modes(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                let octal = child
                    .as_str()
                    .filter(|_| key == "defaultMode" || key == "mode")
                    .and_then(|text| text.strip_prefix('0'))
                    .and_then(|digits| u32::from_str_radix(digits, 8).ok());
                match octal {
                    Some(mode) => *child = json!(mode),
                    None => yaml_1_1_modes(child),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(yaml_1_1_modes),
        _ => {}
    }
}

impl Chart {
    /// The objects the pods need in the API: what mounts, env and service accounts
    /// name (the fake API server serves no Services, policies or workloads).
    pub fn pod_objects(&self) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|o| {
                matches!(
                    o["kind"].as_str(),
                    Some("ConfigMap" | "Secret" | "ServiceAccount")
                )
            })
            .collect()
    }

    /// The pods the chart's workloads make first: a Deployment's or DaemonSet's one
    /// pod on the virtual node, a StatefulSet's ordinal 0 (ordered, as its controller
    /// starts them) with its claims as the controller names them. A StatefulSet with
    /// claims also gives `<name>-ephemeral-0`, its pod with each claim an emptyDir: what
    /// these charts render with persistence disabled.
    pub fn pods(&self) -> Vec<CataloguePod> {
        let mut pods = Vec::new();
        for object in &self.objects {
            let (Some(kind), Some(name)) =
                (object["kind"].as_str(), object["metadata"]["name"].as_str())
            else {
                continue;
            };
            let claims: Vec<&str> = object["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|claim| claim["metadata"]["name"].as_str())
                .collect();
            let template = &object["spec"]["template"];
            let pod = |pod_name: &str, claim_volume: &dyn Fn(&str) -> Value| {
                let mut spec = template["spec"].clone();
                for claim in &claims {
                    push(&mut spec["volumes"], claim_volume(claim));
                }
                CataloguePod {
                    chart: self.name.clone(),
                    workload: format!("{kind}/{name}"),
                    pod: json!({
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {
                            "name": pod_name,
                            "namespace": "default",
                            "labels": template["metadata"]["labels"],
                            "annotations": template["metadata"]["annotations"],
                        },
                        "spec": spec,
                    }),
                }
            };
            match kind {
                "Deployment" | "DaemonSet" => {
                    pods.push(pod(&format!("{name}-catalogue"), &|_| Value::Null));
                }
                "StatefulSet" => {
                    let first = format!("{name}-0");
                    pods.push(pod(&first, &|claim| {
                        json!({
                            "name": claim,
                            "persistentVolumeClaim": {"claimName": format!("{claim}-{first}")},
                        })
                    }));
                    if !claims.is_empty() {
                        let mut ephemeral = pod(
                            &format!("{name}-ephemeral-0"),
                            &|claim| json!({"name": claim, "emptyDir": {}}),
                        );
                        ephemeral.workload.push_str(" (persistence off)");
                        pods.push(ephemeral);
                    }
                }
                _ => {}
            }
        }
        pods
    }
}

fn push(list: &mut Value, item: Value) {
    match list.as_array_mut() {
        Some(items) => items.push(item),
        None => *list = json!([item]),
    }
}

/// The pod as the test runs it: bound to the virtual node (its nodeSelector and
/// toleration), each image the test image, since no registry is reachable here, and so
/// each program the stand-in the test image has: app containers and sidecars sleep,
/// init containers end at once, exec probes and hooks succeed. Everything else (users,
/// groups, capabilities, read-only roots, volumes, mounts, env, ports, resources,
/// HTTP and TCP probes) is the chart's.
pub fn with_stand_ins(pod: &Value, image: &str) -> Value {
    let mut pod = pod.clone();
    let spec = &mut pod["spec"];
    spec["nodeSelector"] = json!({"type": "virtual-kubelet"});
    push(
        &mut spec["tolerations"],
        json!({"key": "virtual-kubelet.io/provider", "operator": "Exists"}),
    );
    spec["terminationGracePeriodSeconds"] = json!(1);
    for (list, program) in [("initContainers", "true"), ("containers", "sleep")] {
        for container in spec[list].as_array_mut().into_iter().flatten() {
            let sidecar = container["restartPolicy"] == "Always";
            container["image"] = json!(image);
            container["imagePullPolicy"] = json!("IfNotPresent");
            container["command"] = if program == "sleep" || sidecar {
                json!(["sleep", "3600"])
            } else {
                json!(["true"])
            };
            if let Some(c) = container.as_object_mut() {
                c.remove("args");
            }
            for path in [
                "/livenessProbe",
                "/readinessProbe",
                "/startupProbe",
                "/lifecycle/postStart",
                "/lifecycle/preStop",
            ] {
                let Some(handler) = container.pointer_mut(path) else {
                    continue;
                };
                if handler.get("exec").is_some() {
                    handler["exec"] = json!({"command": ["true"]});
                }
            }
        }
    }
    pod
}

/// What of the README's "What a pod can use" a pod uses, in that table's words.
pub fn features(pod: &Value) -> Vec<&'static str> {
    let spec = &pod["spec"];
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|list| spec[*list].as_array().into_iter().flatten())
        .collect();
    let any_container = |test: &dyn Fn(&Value) -> bool| containers.iter().any(|c| test(c));
    let volume = |kind: &str| {
        spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v.get(kind).is_some())
    };
    // Set to something: empty lists and maps (`sysctls: []`) and false say nothing.
    let set = |value: &Value| match value {
        Value::Null | Value::Bool(false) => false,
        Value::Array(items) => !items.is_empty(),
        Value::Object(map) => !map.is_empty(),
        _ => true,
    };
    let context = |field: &str| {
        set(&spec["securityContext"][field])
            || any_container(&|c| set(&c["securityContext"][field]))
    };
    let checks: Vec<(&'static str, bool)> = vec![
        ("hostNetwork", spec["hostNetwork"] == true),
        ("hostPID", spec["hostPID"] == true),
        (
            "init containers",
            spec["initContainers"]
                .as_array()
                .is_some_and(|i| i.iter().any(|c| c["restartPolicy"] != "Always")),
        ),
        (
            "sidecars",
            any_container(&|c| c["restartPolicy"] == "Always"),
        ),
        ("runAsUser", context("runAsUser")),
        ("runAsNonRoot", context("runAsNonRoot")),
        ("fsGroup", set(&spec["securityContext"]["fsGroup"])),
        (
            "fsGroupChangePolicy",
            set(&spec["securityContext"]["fsGroupChangePolicy"]),
        ),
        (
            "supplementalGroups",
            set(&spec["securityContext"]["supplementalGroups"]),
        ),
        ("sysctls", set(&spec["securityContext"]["sysctls"])),
        ("seccompProfile", context("seccompProfile")),
        ("readOnlyRootFilesystem", context("readOnlyRootFilesystem")),
        ("capabilities", context("capabilities")),
        (
            "allowPrivilegeEscalation: false",
            spec["securityContext"]["allowPrivilegeEscalation"] == false
                || any_container(&|c| c["securityContext"]["allowPrivilegeEscalation"] == false),
        ),
        ("emptyDir", volume("emptyDir")),
        ("configMap", volume("configMap")),
        ("secret", volume("secret")),
        ("projected", volume("projected")),
        ("hostPath", volume("hostPath")),
        ("persistentVolumeClaim", volume("persistentVolumeClaim")),
        (
            "subPath",
            any_container(&|c| {
                c["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| m.get("subPath").is_some())
            }),
        ),
        (
            "env from secrets",
            any_container(&|c| c.to_string().contains("\"secretKeyRef\"")),
        ),
        (
            "fieldRef",
            any_container(&|c| c.to_string().contains("\"fieldRef\"")),
        ),
        (
            "probes",
            any_container(&|c| {
                ["livenessProbe", "readinessProbe", "startupProbe"]
                    .iter()
                    .any(|p| !c[*p].is_null())
            }),
        ),
        (
            "lifecycle hooks",
            any_container(&|c| !c["lifecycle"].is_null()),
        ),
        (
            "resources",
            any_container(&|c| !c["resources"]["limits"].is_null()),
        ),
        (
            "ephemeral-storage",
            any_container(&|c| c["resources"].to_string().contains("ephemeral-storage")),
        ),
        (
            "hostPort",
            any_container(&|c| c.to_string().contains("\"hostPort\"")),
        ),
    ];
    checks
        .into_iter()
        .filter_map(|(name, used)| used.then_some(name))
        .collect()
}

/// The README's catalogue table: every chart's pods, what they use, what BeeMesh does.
pub fn table() -> String {
    let mut out = String::from("| chart | pod | uses | on BeeMesh |\n|---|---|---|---|\n");
    for chart in charts() {
        for pod in chart.pods() {
            let outcome = match pod.expected() {
                Some(Expected::Runs) => "runs".to_string(),
                Some(Expected::Refused(message)) => {
                    format!("refused: `{}`", message.replace('|', "\\|"))
                }
                None => "not checked".to_string(),
            };
            out.push_str(&format!(
                "| {} | `{}` ({}) | {} | {} |\n",
                chart.title,
                pod.name(),
                pod.workload,
                features(&pod.pod).join(", "),
                outcome
            ));
        }
    }
    out
}
