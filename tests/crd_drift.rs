//! `crds/` and the chart's `charts/agentid/crds/` must be exactly what `agentid crd` generates
//! from the Rust types. Regenerate with
//! `cargo run -- crd --out-dir crds && cargo run -- crd --out-dir charts/agentid/crds`.

use std::path::Path;

fn check(dir: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let crds = agentid::api::crds();
    let mut expected: Vec<String> = crds.iter().map(agentid::api::crd_file_name).collect();
    expected.sort();
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{} is readable: {e}", dir.display()))
        .map(|e| e.expect("readable entry").file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    assert_eq!(present, expected, "{} holds other files than the generated ones", dir.display());

    for crd in &crds {
        let path = dir.join(agentid::api::crd_file_name(crd));
        let on_disk = std::fs::read_to_string(&path).expect("readable CRD file");
        let generated = agentid::api::crd_yaml(crd).expect("CRD serializes");
        assert!(
            on_disk == generated,
            "{} is out of date: run `cargo run -- crd --out-dir {}` and commit the result",
            path.display(),
            dir.display()
        );
    }
}

#[test]
fn crds_directory_matches_the_generated_crds() {
    check("crds");
}

#[test]
fn the_charts_crds_match_the_generated_crds() {
    check("charts/agentid/crds");
}
