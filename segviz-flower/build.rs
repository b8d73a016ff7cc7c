//! Generates the Flower protocol types from the descriptor set that
//! `proto/regenerate.py` extracted from the pinned flwr wheel. `compile_fds` needs no `protoc`.

use prost::Message;

const DESCRIPTORS: &str = "proto/flwr-1.42.0.binpb";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={DESCRIPTORS}");
    let bytes = std::fs::read(DESCRIPTORS)?;
    let set = prost_types::FileDescriptorSet::decode(bytes.as_slice())?;
    prost_build::Config::new().compile_fds(set)?;
    Ok(())
}
