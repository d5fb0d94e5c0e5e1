//! The README's flag tables, rendered from the clap definitions so that the reference
//! cannot drift from the program (`tests/readme.rs` compares them).

use clap::{Arg, Command, CommandFactory};

use crate::cli::Cli;

/// Each command with flags of its own (`beemesh`, `beemesh agent`, `beemesh token
/// create`, ...) and its flag table in Markdown: flag, environment variable, default,
/// meaning.
pub fn flag_tables() -> Vec<(String, String)> {
    let cli = Cli::command();
    let mut tables = Vec::new();
    collect(&cli, "beemesh", &mut tables);
    tables
}

fn collect(command: &Command, path: &str, tables: &mut Vec<(String, String)>) {
    let args: Vec<&Arg> = command.get_arguments().filter(|a| shown(a)).collect();
    if !args.is_empty() {
        tables.push((path.to_string(), table(&args)));
    }
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        collect(sub, &format!("{path} {}", sub.get_name()), tables);
    }
}

fn shown(arg: &Arg) -> bool {
    !arg.is_hide_set() && !matches!(arg.get_id().as_str(), "help" | "version")
}

fn table(args: &[&Arg]) -> String {
    let mut out = String::from("| flag | environment | default | meaning |\n|---|---|---|---|\n");
    for arg in args {
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if arg.is_required_set() {
            "required".to_string()
        } else if defaults.is_empty() || takes_no_value(arg) {
            String::new()
        } else {
            format!("`{}`", defaults.join(","))
        };
        let meaning = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        out.push_str(&format!(
            "| {} | {env} | {default} | {} |\n",
            cell(&flag(arg)),
            cell(&meaning.split_whitespace().collect::<Vec<_>>().join(" ")),
        ));
    }
    out
}

/// `--listen MULTIADDR`, `-o, --output table|json|yaml`, `--watch`, or a positional
/// `WHAT`, in backticks.
fn flag(arg: &Arg) -> String {
    let value = || {
        let possible: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| v.get_name().to_string())
            .collect();
        if !possible.is_empty() {
            possible.join("|")
        } else {
            arg.get_value_names()
                .map(|names| {
                    names
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_else(|| arg.get_id().as_str().to_uppercase())
        }
    };
    let name = match (arg.get_short(), arg.get_long()) {
        (None, None) => return format!("`{}`", value()),
        (Some(short), Some(long)) => format!("-{short}, --{long}"),
        (Some(short), None) => format!("-{short}"),
        (None, Some(long)) => format!("--{long}"),
    };
    if takes_no_value(arg) {
        format!("`{name}`")
    } else {
        format!("`{name} {}`", value())
    }
}

fn takes_no_value(arg: &Arg) -> bool {
    !arg.get_action().takes_values()
}

/// A table cell: pipes escaped.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_of(path: &str) -> String {
        flag_tables()
            .into_iter()
            .find(|(p, _)| p == path)
            .map(|(_, t)| t)
            .unwrap_or_else(|| panic!("no table for {path}"))
    }

    #[test]
    fn every_visible_command_with_flags_has_a_table() {
        let paths: Vec<String> = flag_tables().into_iter().map(|(p, _)| p).collect();
        for path in [
            "beemesh",
            "beemesh id",
            "beemesh agent",
            "beemesh node",
            "beemesh status",
            "beemesh token",
            "beemesh token create",
            "beemesh token revoke",
        ] {
            assert!(paths.iter().any(|p| p == path), "{path} in {paths:?}");
        }
        assert!(
            !paths.iter().any(|p| p.contains("fence-watchdog")),
            "hidden"
        );
        assert!(!paths.iter().any(|p| p == "beemesh token list"), "no flags");
    }

    #[test]
    fn rows_carry_flag_value_environment_and_default() {
        let agent = table_of("beemesh agent");
        assert!(agent
            .contains("| `--max-pods N` | `BEEMESH_MAX_PODS` | `110` | Most pods run at once |"));
        assert!(agent.contains("| `--listen MULTIADDR` | `BEEMESH_LISTEN` | required |"));
        assert!(agent.contains("| `--label K=V` | `BEEMESH_LABELS` |  |"));
        // A switch takes no value and has no default to show.
        assert!(agent.contains("| `--insecure-trust-any` | `BEEMESH_INSECURE_TRUST_ANY` |  |"));
        let status = table_of("beemesh status");
        assert!(status.contains("| `-o, --output table\\|json\\|yaml` |  | `table` |"));
        assert!(status.contains("| `-w, --watch` |"));
        assert!(table_of("beemesh token revoke").contains("| `WHAT` |  | required |"));
    }
}
