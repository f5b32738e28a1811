//! Every manifest in `examples/` parses as the API types and passes the operator's validation,
//! and every connection type has an example.
use std::collections::BTreeSet;

use vaultconn::api::{ConnectionType, VaultConnection};
use vaultconn::validation::{validate, ValidationOptions};

#[test]
fn examples_are_valid_and_cover_every_type() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut types = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for value in docs {
            if value.get("kind").and_then(|k| k.as_str()) != Some("VaultConnection") {
                continue;
            }
            let mut vc: VaultConnection =
                serde_json::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            vc.metadata.namespace = Some("default".into());
            let problems = validate(&vc, ValidationOptions::default());
            assert!(problems.is_empty(), "{}: {problems:?}", path.display());
            types.insert(vc.spec.type_.as_str());
        }
    }
    let all: BTreeSet<_> = ConnectionType::ALL.iter().map(|t| t.as_str()).collect();
    assert_eq!(types, all, "every connection type needs an example");
}
