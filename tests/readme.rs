//! The README cannot drift from the program: its flag tables are the ones rendered
//! from the clap definitions, and its chart values table names the values of
//! `values.yaml` with their defaults. `BEEMESH_UPDATE_README=1 cargo test --test
//! readme` rewrites the flag tables after a flag changed.

use std::path::Path;

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");

/// The text between `<!-- flags: PATH -->` and the next `<!-- /flags -->`.
fn marked(readme: &str, path: &str) -> Option<(usize, usize)> {
    let open = format!("<!-- flags: {path} -->\n");
    let start = readme.find(&open)? + open.len();
    let end = start + readme[start..].find("<!-- /flags -->")?;
    Some((start, end))
}

#[test]
fn the_readmes_flag_tables_are_the_programs() {
    let mut readme = std::fs::read_to_string(README).expect("README.md");
    let update = std::env::var_os("BEEMESH_UPDATE_README").is_some();
    let mut stale = Vec::new();
    for (path, table) in beemesh::cli_reference::flag_tables() {
        let Some((start, end)) = marked(&readme, &path) else {
            stale.push(format!("{path}: no `<!-- flags: {path} -->` section"));
            continue;
        };
        if readme[start..end] != table {
            if update {
                readme.replace_range(start..end, &table);
            } else {
                stale.push(format!(
                    "{path}: the README has\n{}\nthe program has\n{table}",
                    &readme[start..end]
                ));
            }
        }
    }
    if update {
        std::fs::write(README, &readme).expect("README.md written");
    }
    assert!(
        stale.is_empty(),
        "the README's command-line reference differs from the program's flags \
         (BEEMESH_UPDATE_README=1 cargo test --test readme rewrites it):\n{}",
        stale.join("\n\n")
    );
}

#[test]
fn scripts_refer_only_to_files_in_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut outside = Vec::new();
    for dir in [
        "hack",
        "hack/faults",
        ".ci",
        "charts/beemesh/templates",
        "packaging/systemd",
    ] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            for (n, line) in text.lines().enumerate() {
                // The sibling folders of a checkout exist on the machines it was
                // written on, not in a clone.
                if line.contains("../shared") || line.contains("ENVIRONMENT.md") {
                    outside.push(format!("{}:{}: {line}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(
        outside.is_empty(),
        "outside the repository:\n{}",
        outside.join("\n")
    );
}
