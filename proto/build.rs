//! Compiles the `legate.v1` protobuf definitions into `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTOS: [&str; 5] = [
        "proto/legate/v1/model.proto",
        "proto/legate/v1/config.proto",
        "proto/legate/v1/registrar.proto",
        "proto/legate/v1/confgen.proto",
        "proto/legate/v1/supervisor.proto",
    ];
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure().compile_protos(&PROTOS, &["proto"])?;
    Ok(())
}
