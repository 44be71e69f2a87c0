//! Rebuild the eBPF object when the `bpf-linker` binary changes (it is an
//! undeclared tool dependency of this crate).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not found in PATH: run `cargo xtask setup`"),
    }
}
