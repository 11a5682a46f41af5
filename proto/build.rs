//! Generates the gRPC code with protox (a pure-Rust protobuf compiler): no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["evpc/cluster/v1/cluster.proto", "evpc/admin/v1/admin.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Operators' messages print as JSON (`evpcctl --json`, `evpc-chaos` reports).
        .type_attribute(".evpc.admin.v1", "#[derive(serde::Serialize)]")
        // It carries a cluster key: its `Debug` (in src/lib.rs) prints everything but the key.
        .skip_debug([".evpc.cluster.v1.InstallKeyRequest"])
        .compile_fds(descriptors)?;
    Ok(())
}
