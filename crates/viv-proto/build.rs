//! Compiles the envd `.proto` files into a descriptor set embedded in the crate (pure Rust, no
//! `protoc`), used to convert binary protobuf messages to and from the JSON mapping.

fn main() {
    let files = ["process/process.proto", "filesystem/filesystem.proto"];
    for file in files {
        println!("cargo:rerun-if-changed=proto/{file}");
    }
    let descriptors = protox::compile(files, ["proto"]).expect("the envd .proto files compile");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(
        out.join("envd.descriptors"),
        prost::Message::encode_to_vec(&descriptors),
    )
    .expect("writing the descriptor set");
}
