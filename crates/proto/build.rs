//! Compiles `proto/**/*.proto` with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/fledge/v1/notifier.proto", "proto/fledge/v1/p2p.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    // Chunks stay `Bytes` end to end: no copy between the socket and the reassembler.
    tonic_prost_build::configure().bytes(".fledge.v1.Frame").compile_fds(descriptors)?;
    Ok(())
}
