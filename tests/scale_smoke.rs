//! The scale harness (benches/scale, run by hack/bench-scale.sh) in miniature, so that
//! it cannot rot: a real owner and ten simulated agents on loopback place a
//! few dozen pods, and an owner tracking a few hundred placed pods processes a heartbeat
//! round. Debug builds are slow at what the harness measures (signatures above all), so
//! the owner's offer window is 2 s here rather than 100 ms; only that everything is
//! placed and measured is checked, not how fast.

#[path = "../benches/scale/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{RunOptions, Spawn, TrackOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_agents_place_every_pod_and_an_owner_tracks_placements() {
    let opts = RunOptions {
        agents: 10,
        rates: vec![4.0],
        phase_secs: 10.0,
        drain_secs: 30.0,
        idle_secs: 2.0,
        agents_per_process: 1000,
        seed: 7,
        max_pods: 1000,
        saturation: 0.0,
        offer_window: Some(Duration::from_secs(2)),
        min_pods: 0,
        pin: false,
        connect_timeout: Duration::from_secs(60),
    };
    let run = harness::measure_agents(&opts, &Spawn::InProcess)
        .await
        .expect("measured");
    let phase = &run["phases"][0];
    assert_eq!(phase["pods"], 40, "{run:#}");
    assert_eq!(phase["unassigned"], 0, "{run:#}");
    assert!(phase["p99_ms"].as_f64().is_some_and(|p| p > 0.0), "{run:#}");
    // Placed from the agents' heartbeats: no offer, so no bids, and the first agent
    // asked takes each pod.
    assert_eq!(phase["bids_per_pod"].as_f64(), Some(0.0), "{run:#}");
    assert_eq!(phase["assigns"].as_f64(), Some(40.0), "{run:#}");
    assert!(
        run["idle"]["heartbeat_bytes_per_agent_s"]
            .as_f64()
            .is_some_and(|b| b > 0.0),
        "{run:#}"
    );
    let table = harness::markdown(&serde_json::json!({"agents": [run], "tracking": []}));
    assert!(table.contains("| 10 | 4 | 40 | 40 |"), "{table}");

    let track = harness::measure_tracking(
        &TrackOptions {
            pods: 400,
            agents: 4,
            seed: 7,
            rounds: 2,
            round_budget: Duration::from_secs(60),
        },
        &Spawn::InProcess,
    )
    .await
    .expect("measured");
    assert_eq!(track["status_reports_refused"], 0, "{track:#}");
    assert_eq!(track["rounds"][1]["agents_processed"], 4, "{track:#}");
    assert!(
        track["rss_end_mib"].as_f64().is_some_and(|r| r > 0.0),
        "{track:#}"
    );
}
