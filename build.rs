//! Links the `beemesh` executable with packed relative relocations (`DT_RELR`) where
//! this host's linker and C library support them.
//!
//! Why: the executable is position-independent, and its 43,700 relative relocations
//! take 1 MiB in the classic format (`.rela.dyn`). The loader reads them all at start,
//! and those pages stay resident in every BeeMesh process: 1 MiB of an idle agent's
//! 19 to 20 MiB. Packed, they take a few KiB.
//!
//! Only where a probe linked with the flag runs on this host: binutils before 2.38
//! ignore it, and an executable that needs `GLIBC_ABI_DT_RELR` does not start on a
//! glibc before 2.36. So only when building for this host, whose C library the probe
//! and the executable then share (`hack/install-agent.sh` builds on the agent's own
//! machine; the node's image builds and runs on the same Debian release).

use std::{env, path::Path, process::Command};

const PACK_RELATIVE_RELOCS: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    if packed_relocations_work() {
        println!("cargo:rustc-link-arg-bins={PACK_RELATIVE_RELOCS}");
    }
}

/// Whether a position-independent program linked with the flag, warnings fatal, runs.
fn packed_relocations_work() -> bool {
    let (Ok(target), Ok(host), Some(out)) =
        (env::var("TARGET"), env::var("HOST"), env::var_os("OUT_DIR"))
    else {
        return false;
    };
    if target != host || !target.ends_with("-linux-gnu") {
        return false;
    }
    let out = Path::new(&out);
    let (source, probe) = (out.join("relr_probe.c"), out.join("relr_probe"));
    if std::fs::write(&source, "int main(void) { return 0; }\n").is_err() {
        return false;
    }
    // The C compiler driver rustc links with, unless configured otherwise.
    let linker = env::var("RUSTC_LINKER").unwrap_or_else(|_| "cc".into());
    let linked = Command::new(linker)
        .args([
            "-fPIE",
            "-pie",
            PACK_RELATIVE_RELOCS,
            "-Wl,--fatal-warnings",
            "-o",
        ])
        .arg(&probe)
        .arg(&source)
        .status()
        .is_ok_and(|status| status.success());
    linked
        && Command::new(&probe)
            .status()
            .is_ok_and(|status| status.success())
}
