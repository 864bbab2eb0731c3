// The frozen 1.0 SDK must stamp its types exactly as the `recfuse-sdk` 0.1.0 crate did:
// abi_stable records `CARGO_PKG_NAME;CARGO_PKG_VERSION` in every type layout it checks.
fn main() {
    println!("cargo:rustc-env=CARGO_PKG_NAME=recfuse-sdk");
    println!("cargo:rustc-env=CARGO_PKG_VERSION=0.1.0");
}
