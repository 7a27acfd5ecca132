//! Generates the capwatch.v1 code with protox, a pure-Rust protobuf compiler,
//! so a fresh machine builds with plain `cargo build` and no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["capwatch/v1/ingest.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .codec_path("crate::CompactCodec")
        .compile_fds(fds)?;
    Ok(())
}
