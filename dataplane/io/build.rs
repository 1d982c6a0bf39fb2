//! Builds the XDP program (ebpf/espd-ebpf) for `bpfel-unknown-none` with the
//! nightly toolchain and bpf-linker, and leaves it at `$OUT_DIR/espd-xdp` for
//! `include_bytes_aligned!`. This is what aya-build does; it is done directly
//! because aya-build expects the eBPF crate in the calling workspace, where a
//! BPF-only `no_std` binary would break `cargo clippy --workspace`.
//! Needs: `rustup toolchain install nightly`, `rustup component add rust-src
//! --toolchain nightly`, and bpf-linker (scripts/deps.sh installs them).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let here = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let ebpf = here.join("../../ebpf/espd-ebpf");
    for p in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "../espd-common/src",
        "../espd-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf.join(p).display());
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it"));
    let target_dir = out.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(ebpf.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // BTF for the verifier and for map introspection, as aya-build does.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf",
        );
    for k in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(k);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run rustup to build the XDP program: {e}"));
    assert!(
        status.success(),
        "building ebpf/espd-ebpf failed: it needs the nightly toolchain with rust-src and bpf-linker (scripts/deps.sh installs them)"
    );
    let bin = target_dir.join("bpfel-unknown-none/release/espd-xdp");
    std::fs::copy(&bin, out.join("espd-xdp"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", bin.display()));
}
