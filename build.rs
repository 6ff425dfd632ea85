//! Embeds the ReDoc bundle in the binary when `scripts/setup.sh` has fetched it
//! (`assets/redoc.standalone.js`), so that `/redoc` works offline from any directory, as
//! Swagger UI's assets do. Without it the server looks for the file at run time, then uses the
//! CDN.
//!
//! Cargo reruns this script when the `assets/` folder changes. A folder that does not exist
//! would make it rerun (and the crate rebuild) on every build, so an empty one is made first:
//! the bundle that setup.sh puts there later is then noticed.

use std::path::Path;

fn main() {
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let assets = Path::new(&root).join("assets");
    let _ = std::fs::create_dir_all(&assets);
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", assets.display());
    let bundle = assets.join("redoc.standalone.js");
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("redoc.rs");
    let code = if bundle.is_file() {
        format!(
            "/// The ReDoc bundle, embedded at build time.\npub const REDOC_EMBEDDED: Option<&[u8]> = Some(include_bytes!({:?}));\n",
            bundle.display().to_string()
        )
    } else {
        "/// The ReDoc bundle was not there at build time (run ./scripts/setup.sh first).\npub const REDOC_EMBEDDED: Option<&[u8]> = None;\n".to_string()
    };
    std::fs::write(out, code).expect("writing OUT_DIR/redoc.rs");
}
