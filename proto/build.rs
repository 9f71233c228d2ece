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
    // confgen hands the model's messages to handlebars templates as they are.
    let mut builder = tonic_prost_build::configure();
    for message in ["Server", "App", "Service", "Host"] {
        builder = builder.type_attribute(
            format!(".legate.v1.{message}"),
            "#[derive(serde::Serialize)]",
        );
    }
    builder.compile_protos(&PROTOS, &["proto"])?;
    Ok(())
}
