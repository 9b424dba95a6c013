//! Embeds every file under `static/` in the binary: writes `$OUT_DIR/assets.rs`, a table of
//! (file name, bytes) that `src/http.rs` serves, so the server is one self-contained executable.

use std::env;
use std::fs;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=static");
    let out = Path::new(&env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("assets.rs");
    let root = Path::new(&env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("static");
    let mut names: Vec<String> = fs::read_dir(&root)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|name| !name.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut table = String::from(
        "/// Every file of `static/`, by name.\npub static ASSETS: &[(&str, &[u8])] = &[\n",
    );
    for name in &names {
        println!("cargo:rerun-if-changed=static/{name}");
        let path = root.join(name);
        table.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    table.push_str("];\n");
    fs::write(out, table).expect("write assets.rs");
}
