//! The README cannot drift from the program: its flag tables are the ones rendered
//! from the clap definitions, and its chart values table the one rendered from
//! `values.yaml` (every value documented there with `# --`, its default, its comment),
//! its chart catalogue the one of `tests/chart_catalogue` (which `tests/catalogue.rs`
//! checks on the mesh). `BEEMESH_UPDATE_README=1 cargo test --test readme` rewrites them
//! after a change.

mod chart_catalogue;

use std::path::Path;

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");

/// The text between `<!-- NAME -->` and the next `<!-- /END -->`.
fn marked(readme: &str, name: &str, end: &str) -> Option<(usize, usize)> {
    let open = format!("<!-- {name} -->\n");
    let start = readme.find(&open)? + open.len();
    let end = start + readme[start..].find(&format!("<!-- /{end} -->"))?;
    Some((start, end))
}

/// Compares (or, with BEEMESH_UPDATE_README set, rewrites) each generated section of
/// the README with its rendering.
fn check_sections(sections: Vec<(String, String, String)>) {
    // The tests run in parallel, and a rewrite is a read, then a write.
    static README_FILE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _only_one = README_FILE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut readme = std::fs::read_to_string(README).expect("README.md");
    let update = std::env::var_os("BEEMESH_UPDATE_README").is_some();
    let mut stale = Vec::new();
    for (name, end, rendered) in sections {
        let Some((start, stop)) = marked(&readme, &name, &end) else {
            stale.push(format!("no `<!-- {name} -->` section"));
            continue;
        };
        if readme[start..stop] != rendered {
            if update {
                readme.replace_range(start..stop, &rendered);
            } else {
                stale.push(format!(
                    "{name}: the README has\n{}\nrendered:\n{rendered}",
                    &readme[start..stop]
                ));
            }
        }
    }
    if update {
        let written = format!("{README}.new");
        std::fs::write(&written, &readme).expect("README.md written");
        std::fs::rename(&written, README).expect("README.md replaced");
    }
    assert!(
        stale.is_empty(),
        "the README differs from what it documents \
         (BEEMESH_UPDATE_README=1 cargo test --test readme rewrites it):\n{}",
        stale.join("\n\n")
    );
}

#[test]
fn the_readmes_flag_tables_are_the_programs() {
    check_sections(
        beemesh::cli_reference::flag_tables()
            .into_iter()
            .map(|(path, table)| (format!("flags: {path}"), "flags".to_string(), table))
            .collect(),
    );
}

#[test]
fn the_readmes_chart_catalogue_is_the_catalogues() {
    check_sections(vec![(
        "catalogue".to_string(),
        "catalogue".to_string(),
        chart_catalogue::table(),
    )]);
}

#[test]
fn the_readmes_values_table_is_the_charts() {
    let text = std::fs::read_to_string(VALUES).expect("values.yaml");
    let values: serde_yaml::Value = serde_yaml::from_str(&text).expect("values.yaml parses");
    let documented = documented_values(&text);
    // Every top-level value is documented, itself or through what it holds.
    for key in values.as_mapping().expect("a mapping").keys() {
        let key = key.as_str().expect("string keys");
        assert!(
            documented
                .iter()
                .any(|(path, _)| path == key || path.starts_with(&format!("{key}."))),
            "values.yaml documents nothing of {key} (a `# --` comment above it)"
        );
    }
    let mut table = String::from("| value | default | meaning |\n|---|---|---|\n");
    for (path, doc) in &documented {
        let default = path
            .split('.')
            .try_fold(&values, |v, key| v.get(key))
            .unwrap_or_else(|| panic!("{path} in values.yaml"));
        table.push_str(&format!(
            "| `{path}` | `{}` | {} |\n",
            compact(default),
            doc.replace('|', "\\|")
        ));
    }
    check_sections(vec![(
        "values: charts/beemesh/values.yaml".into(),
        "values".into(),
        table,
    )]);
}

const VALUES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/beemesh/values.yaml");

/// Each value with a `# --` comment (helm-docs' convention), by dotted path, with the
/// comment as one line.
fn documented_values(text: &str) -> Vec<(String, String)> {
    let mut documented = Vec::new();
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut doc: Option<String> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if let Some(start) = trimmed.strip_prefix("# --") {
            doc = Some(start.trim().to_string());
        } else if let Some(more) = trimmed.strip_prefix('#') {
            if let Some(doc) = &mut doc {
                doc.push(' ');
                doc.push_str(more.trim());
            }
        } else if let Some((key, _)) = trimmed
            .split_once(':')
            .filter(|(key, _)| !key.is_empty() && !key.starts_with('-') && !key.contains(' '))
        {
            while path.last().is_some_and(|(i, _)| *i >= indent) {
                path.pop();
            }
            path.push((indent, key.to_string()));
            if let Some(doc) = doc.take() {
                let dotted: Vec<&str> = path.iter().map(|(_, k)| k.as_str()).collect();
                documented.push((dotted.join("."), doc));
            }
        } else if trimmed.is_empty() {
            doc = None;
        }
    }
    documented
}

/// A default as one line: scalars as YAML writes them, the rest as flow-style JSON.
fn compact(value: &serde_yaml::Value) -> String {
    match value {
        serde_yaml::Value::String(s) if s.is_empty() => "\"\"".into(),
        serde_yaml::Value::String(s) => s.clone(),
        serde_yaml::Value::Null => "null".into(),
        serde_yaml::Value::Bool(b) => b.to_string(),
        serde_yaml::Value::Number(n) => n.to_string(),
        other => serde_json::to_string(other).expect("JSON"),
    }
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
