//! The scale harness: `cargo bench --bench scale -- run [options]` (hack/bench-scale.sh
//! runs it and plots the results). See `harness.rs` for what is real and what is
//! simulated.

mod harness;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use harness::{AgentsOptions, OwnerOptions, RunOptions, Spawn, TrackOptions, HEARTBEAT_INTERVAL};

#[derive(Parser)]
#[command(about = "BeeMesh scale harness: one owner, many simulated agents")]
struct Cli {
    #[command(subcommand)]
    command: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Runs every measurement and writes the results (the controller).
    Run(Box<Run>),
    /// Prints a results file's tables (Markdown).
    Table { results: PathBuf },
    /// The owner (started by `run`).
    Owner {
        #[arg(long)]
        agents: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        offer_window_ms: Option<u64>,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// A range of simulated agents (started by `run`).
    Agents {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        first: u64,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        owner: libp2p::Multiaddr,
        #[arg(long)]
        max_pods: usize,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// An owner placing pods among many agents, without the mesh (started by `run`).
    Place {
        #[arg(long)]
        agents: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 20)]
        pods: u64,
        #[arg(long, default_value_t = 120)]
        budget_secs: u64,
    },
    /// An owner tracking many placed pods (started by `run`).
    Track {
        #[arg(long)]
        pods: u64,
        #[arg(long)]
        agents: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 2)]
        rounds: u32,
        #[arg(long, default_value_t = 900)]
        round_budget_secs: u64,
    },
}

#[derive(clap::Args, Debug)]
struct Run {
    /// Agent counts, each measured with its own owner and agents. (10,000 agents' swarms
    /// need more than 2 cores and about 12 GiB here: see BENCHMARKS.md.)
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1000,3000")]
    agents: Vec<u64>,
    /// Offer rates (pods/s), one phase each, raised until one saturates.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "0.2,0.5,1,2,5,10,20,50,100,200,500,1000")]
    rates: Vec<f64>,
    #[arg(long, default_value_t = 20.0)]
    phase_secs: f64,
    /// A phase lasts long enough to offer at least this many pods.
    #[arg(long, default_value_t = 20)]
    min_pods: u64,
    /// How long every agent may take to be live at the owner (default: 120 s plus 50 ms
    /// per agent).
    #[arg(long)]
    connect_timeout_secs: Option<u64>,
    /// Run the owner and the agents on all CPUs, not the owner on CPU 0 and the agents
    /// on CPU 1.
    #[arg(long)]
    no_pin: bool,
    /// How long a phase's last pods may take to be placed.
    #[arg(long, default_value_t = 30.0)]
    drain_secs: f64,
    /// The window measured with no pods offered.
    #[arg(long, default_value_t = 10.0)]
    idle_secs: f64,
    #[arg(long, default_value_t = 5000)]
    agents_per_process: u64,
    /// A phase that places less than this share of its rate ends the ladder.
    #[arg(long, default_value_t = 0.9)]
    saturation: f64,
    /// Agent counts for which the owner's own work per placement is measured (no mesh).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "100,300,1000,3000,10000")]
    place: Vec<u64>,
    /// Pods placed per count, at most (and for at most --place-budget-secs).
    #[arg(long, default_value_t = 20)]
    place_pods: u64,
    #[arg(long, default_value_t = 120)]
    place_budget_secs: u64,
    /// Owners tracking placed pods, as pods:agents pairs.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "10000:100,100000:1000,250000:2500,1000000:10000")]
    track: Vec<String>,
    /// Heartbeat rounds timed per tracking run (the first finds every agent new).
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// A round running longer than this is cut short and its time extrapolated.
    #[arg(long, default_value_t = 900)]
    round_budget_secs: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The owner's offer window; the node's default (100 ms) if not given.
    #[arg(long)]
    offer_window_ms: Option<u64>,
    /// Where <name>.json and <name>.md go.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    #[arg(long, default_value = "scale")]
    name: String,
    /// Where the roles' logs go.
    #[arg(long, default_value = "target/scale-logs")]
    logs: PathBuf,
}

fn main() -> std::process::ExitCode {
    // `cargo bench` adds `--bench`.
    let args = std::env::args().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    // Before the runtime starts its threads, which inherit it.
    if let Role::Owner { cpu: Some(cpu), .. } | Role::Agents { cpu: Some(cpu), .. } = &cli.command {
        if let Err(e) = harness::pin_to_cpu(*cpu) {
            eprintln!("cannot pin to CPU {cpu}: {e}");
        }
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        match cli.command {
            Role::Run(run) => match controller(*run).await {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("scale: {e}");
                    std::process::ExitCode::FAILURE
                }
            },
            Role::Table { results } => {
                let text = std::fs::read_to_string(&results).unwrap_or_default();
                match serde_json::from_str::<Value>(&text) {
                    Ok(results) => {
                        println!("{}", harness::markdown(&results));
                        std::process::ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("scale: {}: {e}", results.display());
                        std::process::ExitCode::FAILURE
                    }
                }
            }
            Role::Owner {
                agents,
                seed,
                offer_window_ms,
                ..
            } => {
                init_logs();
                let opts = OwnerOptions {
                    agents,
                    seed,
                    listen: "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr"),
                    offer_window: offer_window_ms.map(Duration::from_millis),
                };
                harness::serve_stdio(|cmds, out| harness::owner_role(opts, cmds, out)).await;
                std::process::ExitCode::SUCCESS
            }
            Role::Agents {
                seed,
                first,
                count,
                owner,
                max_pods,
                ..
            } => {
                let opts = AgentsOptions {
                    seed,
                    first,
                    count,
                    owner,
                    max_pods,
                };
                harness::serve_stdio(|cmds, out| harness::agents_role(opts, cmds, out)).await;
                std::process::ExitCode::SUCCESS
            }
            Role::Place {
                agents,
                seed,
                pods,
                budget_secs,
            } => {
                let opts = harness::PlaceOptions {
                    agents,
                    seed,
                    pods,
                    budget: Duration::from_secs(budget_secs),
                };
                harness::serve_stdio(|_cmds, out| harness::place(opts, out)).await;
                std::process::ExitCode::SUCCESS
            }
            Role::Track {
                pods,
                agents,
                seed,
                rounds,
                round_budget_secs,
            } => {
                let opts = TrackOptions {
                    pods,
                    agents,
                    seed,
                    rounds,
                    round_budget: Duration::from_secs(round_budget_secs),
                };
                harness::serve_stdio(|_cmds, out| harness::track(opts, out)).await;
                std::process::ExitCode::SUCCESS
            }
        }
    })
}

/// The owner logs as `beemesh node` does (info, to stderr: the role's log file).
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn controller(run: Run) -> Result<(), String> {
    std::fs::create_dir_all(&run.out).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&run.logs).map_err(|e| e.to_string())?;
    let spawn = Spawn::Processes {
        logs: run.logs.clone(),
    };
    let date = jiff::Timestamp::now()
        .strftime("%Y-%m-%d %H:%M UTC")
        .to_string();
    let command = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect::<Vec<_>>()
        .join(" ");
    let mut results = json!({
        "date": date,
        "command": command,
        "machine": harness::machine(),
        "heartbeat_interval_secs": HEARTBEAT_INTERVAL.as_secs_f64(),
        "agents": [],
        "placement": [],
        "tracking": [],
    });
    let out_json = run.out.join(format!("{}.json", run.name));
    let save = |results: &Value| {
        let text = serde_json::to_string_pretty(results).expect("json");
        std::fs::write(&out_json, text + "\n").map_err(|e| e.to_string())
    };
    // Pods the ladder may offer, at most, plus room.
    let max_pods = (run.rates.iter().map(|r| r * run.phase_secs).sum::<f64>() as usize) + 1024;
    for &agents in &run.agents {
        eprintln!("scale: {agents} agents");
        let opts = RunOptions {
            agents,
            rates: run.rates.clone(),
            phase_secs: run.phase_secs,
            drain_secs: run.drain_secs,
            idle_secs: run.idle_secs,
            agents_per_process: run.agents_per_process,
            seed: run.seed,
            max_pods,
            saturation: run.saturation,
            offer_window: run.offer_window_ms.map(Duration::from_millis),
            min_pods: run.min_pods,
            connect_timeout: Duration::from_secs(
                run.connect_timeout_secs.unwrap_or(120 + agents / 20),
            ),
            pin: !run.no_pin && harness::machine()["cpus"].as_u64().unwrap_or(1) >= 2,
        };
        let measured = harness::measure_agents(&opts, &spawn)
            .await
            .unwrap_or_else(|e| json!({"agents": agents, "error": e}));
        results["agents"]
            .as_array_mut()
            .expect("array")
            .push(measured);
        save(&results)?;
    }
    for &agents in &run.place {
        eprintln!("scale: the owner's work per placement with {agents} agents");
        let opts = harness::PlaceOptions {
            agents,
            seed: run.seed,
            pods: run.place_pods,
            budget: Duration::from_secs(run.place_budget_secs),
        };
        let measured = harness::measure_placement(&opts, &spawn)
            .await
            .unwrap_or_else(|e| json!({"agents": agents, "error": e}));
        eprintln!("  {measured}");
        results["placement"]
            .as_array_mut()
            .expect("array")
            .push(measured);
        save(&results)?;
    }
    for pair in run.track.iter().filter(|p| !p.is_empty()) {
        let (pods, agents) = pair
            .split_once(':')
            .and_then(|(p, a)| Some((p.parse().ok()?, a.parse().ok()?)))
            .ok_or_else(|| format!("--track {pair}: expected pods:agents"))?;
        eprintln!("scale: owner tracking {pods} pods on {agents} agents");
        let opts = TrackOptions {
            pods,
            agents,
            seed: run.seed,
            rounds: run.rounds,
            round_budget: Duration::from_secs(run.round_budget_secs),
        };
        let measured = harness::measure_tracking(&opts, &spawn)
            .await
            .unwrap_or_else(|e| json!({"pods": pods, "agents": agents, "error": e}));
        eprintln!("  {measured}");
        results["tracking"]
            .as_array_mut()
            .expect("array")
            .push(measured);
        save(&results)?;
    }
    let table = harness::markdown(&results);
    println!("{table}");
    std::fs::write(run.out.join(format!("{}.md", run.name)), table).map_err(|e| e.to_string())?;
    Ok(())
}
