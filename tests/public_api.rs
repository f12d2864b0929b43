//! The public API of each published crate, checked in as text under
//! `tests/public-api/`: a change to it fails this test until the snapshot is
//! regenerated, so it shows up in review as a diff of that file.
//!
//! ```sh
//! UPDATE_SNAPSHOTS=1 cargo test --test public_api   # after an intended change
//! ```
//!
//! The API is read from rustdoc's JSON output (every feature on) with the
//! `public-api` crate, as `cargo public-api` does. That output is unstable,
//! so it is asked of the stable toolchain with `RUSTC_BOOTSTRAP=1` rather
//! than of a nightly that a CI machine may not have; `public-api` is pinned
//! to the release that reads the format version that toolchain writes (see
//! the root `Cargo.toml`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn check(package: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = match package {
        "comet" => root.join("Cargo.toml"),
        member => root.join(member).join("Cargo.toml"),
    };
    // A target directory of its own: the JSON build of a crate does not
    // evict the HTML docs or the checks of the outer build, and parallel
    // tests don't wait on each other's lock more than they must.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("public-api");
    let json = rustdoc_json::Builder::default()
        .manifest_path(&manifest)
        .target_dir(&target_dir)
        .all_features(true)
        .quiet(true)
        .env("RUSTC_BOOTSTRAP", "1")
        .build()
        .unwrap_or_else(|e| panic!("rustdoc JSON of {package}: {e}"));
    // Blanket impls (`impl<T> Any for T`, tracing's `Instrument`, ...)
    // follow from the rest and would only add noise; auto traits (`Send`,
    // `Sync`, ...) stay: losing one breaks users.
    let api = public_api::Builder::from_rustdoc_json(&json)
        .omit_blanket_impls(true)
        .build()
        .unwrap_or_else(|e| panic!("public API of {package} from {}: {e}", json.display()))
        .to_string();

    let snapshot = root.join("tests/public-api").join(format!("{package}.txt"));
    if std::env::var("UPDATE_SNAPSHOTS").is_ok_and(|v| v == "1" || v == "yes" || v == "true") {
        std::fs::write(&snapshot, &api).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&snapshot).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; create it with `UPDATE_SNAPSHOTS=1 cargo test --test public_api`",
            snapshot.display()
        )
    });
    if api == expected {
        return;
    }
    let now: BTreeSet<&str> = api.lines().collect();
    let before: BTreeSet<&str> = expected.lines().collect();
    let mut report = String::new();
    for line in before.difference(&now) {
        report.push_str(&format!("- {line}\n"));
    }
    for line in now.difference(&before) {
        report.push_str(&format!("+ {line}\n"));
    }
    panic!(
        "the public API of {package} differs from {}:\n{report}\nIf the change is intended, \
         run `UPDATE_SNAPSHOTS=1 cargo test --test public_api` and commit the snapshot.",
        snapshot.display()
    );
}

#[test]
fn comet_core_public_api_matches_its_snapshot() {
    check("comet-core");
}

#[test]
fn comet_transports_public_api_matches_its_snapshot() {
    check("comet-transports");
}

#[test]
fn comet_plugins_public_api_matches_its_snapshot() {
    check("comet-plugins");
}

#[test]
fn comet_public_api_matches_its_snapshot() {
    check("comet");
}
