//! The layering the code keeps (issue 13, "the payment core out of the HTTP layer"): no module
//! outside `api/` reaches into the HTTP layer — only `lib.rs`, `main.rs` and `startup.rs`,
//! which mount it —, the HTTP layer reaches the stores only through the payment core, and the
//! shared time formatting is a leaf. Checked on the sources, so an
//! upward import fails here before it spreads.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether a line of code names the `api` module (`crate::api`, `super::api`), not merely an
/// item whose name starts with `api`.
fn names_the_api(code: &str) -> bool {
    ["crate::api", "super::api"].iter().any(|path| {
        code.match_indices(path).any(|(at, _)| {
            !code[at + path.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    })
}

#[test]
fn the_api_is_told_apart_from_names_that_start_with_api() {
    assert!(names_the_api("use crate::api::AppState;"));
    assert!(names_the_api("use crate::api;"));
    assert!(names_the_api("let x = super::api::router(s);"));
    assert!(!names_the_api(".with_api_v3_key(super::api_v3_key())"));
}

#[test]
fn only_the_entry_points_import_the_http_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 20, "found the sources: {files:?}");
    let mount = ["lib.rs", "main.rs", "startup.rs"].map(|f| src.join(f));
    let mut offenders = Vec::new();
    for file in &files {
        if file.starts_with(src.join("api")) || mount.contains(file) {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            if names_the_api(code) {
                offenders.push(format!("{}:{}: {code}", file.display(), n + 1));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "modules outside api/ import the HTTP layer:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn time_formatting_is_a_leaf() {
    let time = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/time.rs");
    let text = std::fs::read_to_string(time).unwrap();
    assert!(
        !text.contains("crate::") && !text.contains("super::super"),
        "src/time.rs imports the gateway"
    );
}

/// The code lines of `file` (comments left out), numbered from 1.
fn code_lines(file: &Path) -> Vec<(usize, String)> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .enumerate()
        .map(|(n, line)| (n + 1, line.trim_start().to_owned()))
        .filter(|(_, code)| !code.starts_with("//"))
        .collect()
}

#[test]
fn the_http_layer_reaches_the_stores_only_through_the_core() {
    let api = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
    let mut files = Vec::new();
    sources(&api, &mut files);
    assert!(files.len() > 5, "found the HTTP layer: {files:?}");
    // The balance store and the settlement store (and its writer, recovery and stream).
    let stores = [
        ".balances",
        ".settler",
        "settlement::recovery",
        "settlement::settler",
        "settlement::stream",
        "BalanceStore",
        "SettlementStore",
    ];
    let mut offenders = Vec::new();
    for file in &files {
        for (n, code) in code_lines(file) {
            if let Some(store) = stores.iter().find(|s| code.contains(*s)) {
                offenders.push(format!("{}:{n}: {store}: {code}", file.display()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "the HTTP layer reaches a store around the payment core:\n{}",
        offenders.join("\n")
    );
}
