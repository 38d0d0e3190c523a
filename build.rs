//! Compiles our minimal immudb gRPC contract (`proto/immudb.proto`) into the client stubs.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/immudb.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/immudb.proto"], &["proto"])?;
    Ok(())
}
