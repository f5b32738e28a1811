//! Imports point one way. Every module of the product library has a layer; a module may use
//! modules of its own layer or below, never above, and no two modules may use each other
//! (directly or round a loop). Reads the sources, so it needs no extra tool: `cargo test -p
//! vaultconn --test architecture`. A new module must be given a layer here.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top. Pure decisions sit on the API types; I/O sits on the pure decisions; the
/// controller sits on the I/O; the CLI's cluster commands on top of that; `main.rs` (not a
/// library module) on top.
const LAYERS: &[(&str, &[&str])] = &[
    ("types", &["api", "names", "reason", "sync"]),
    (
        "pure decisions",
        &[
            "catalog",
            "config",
            "validation",
            "secret",
            "status",
            "repair",
            "oauth::schedule",
            "oauth::state",
            "oauth::decide",
            "oauth::token::error",
            "oauth::token::url_policy",
            "oauth::token::request",
            "oauth::token::response",
            "cli::error",
            "cli::schema",
            "cli::manifest",
            "cli::new",
            "cli::types",
            "cli::view",
        ],
    ),
    (
        "I/O",
        &[
            "error",
            "metrics",
            "events",
            "secret_index",
            "writer",
            "crd",
            "http",
            "leader",
            "oauth",
            "oauth::token",
            "oauth::token",
            "oauth::token::transport",
            "oauth::token::test_support",
            "oauth::refresh",
            "cli::validate",
            "cli::cluster",
        ],
    ),
    ("controller", &["controller", "operator"]),
    // The command line: commands that talk to the cluster (and the dispatcher) sit on the
    // I/O helpers; they use nothing of the controller.
    ("cli", &["cli", "cli::status", "cli::refresh"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` → `a::b`; `src/a/mod.rs` → `a`.
fn module_path(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The source without comments and without the unit-test module (tests may reach anywhere).
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path written after `crate::` or `super::` (grouped imports `crate::{a, b::c}`
/// expanded), as a path from the crate root. `module` is the module `code` belongs to.
fn crate_paths_of(module: &str, code: &str) -> Vec<String> {
    let parent = match module.rfind("::") {
        Some(i) => format!("{}::", &module[..i]),
        None => String::new(),
    };
    let relative = code.replace("super::", &format!("crate::{parent}"));
    crate_paths(&relative)
}

/// Every path written after `crate::` (grouped imports `crate::{a, b::c}` expanded).
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if rest.starts_with('{') {
            let end = rest.find('}').expect("closed brace group");
            for item in rest[1..end].split(',') {
                out.push(item.trim().to_string());
            }
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        out.push(rest[..end].to_string());
    }
    out
}

/// The longest known module that `path` starts with.
fn target_module(path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    (1..=segments.len())
        .rev()
        .map(|n| segments[..n].join("::"))
        .find(|candidate| modules.contains(candidate))
}

fn dependency_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|f| !f.ends_with("main.rs") && !f.ends_with("lib.rs"));
    let modules: BTreeSet<String> = files.iter().map(|f| module_path(&src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let module = module_path(&src, file);
        let code = code_of(&std::fs::read_to_string(file).expect("readable source"));
        let deps: BTreeSet<String> = crate_paths_of(&module, &code)
            .iter()
            .filter_map(|p| target_module(p, &modules))
            .filter(|m| *m != module)
            .collect();
        graph.insert(module, deps);
    }
    graph
}

#[test]
fn every_module_has_a_layer() {
    let unplaced: Vec<String> = dependency_graph()
        .into_keys()
        .filter(|m| layer_of(m).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "give these modules a layer in tests/architecture.rs: {unplaced:?}"
    );
}

#[test]
fn imports_point_down() {
    let mut upward = Vec::new();
    for (module, deps) in dependency_graph() {
        let Some(own) = layer_of(&module) else {
            continue;
        };
        for dep in deps {
            if let Some(theirs) = layer_of(&dep) {
                if theirs > own {
                    upward.push(format!(
                        "{module} ({}) uses {dep} ({})",
                        LAYERS[own].0, LAYERS[theirs].0
                    ));
                }
            }
        }
    }
    assert!(upward.is_empty(), "imports pointing up: {upward:#?}");
}

#[test]
fn no_import_cycles() {
    let graph = dependency_graph();
    // Depth-first search; a back edge to a module on the current path is a cycle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for dep in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(dep, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut Vec::new(), &mut done) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_checker_sees_imports() {
    // Guards the parser itself: a known edge must be found, or the tests above prove nothing.
    let graph = dependency_graph();
    assert!(graph["controller"].contains("writer"), "{graph:#?}");
    assert!(graph["oauth::refresh"].contains("writer"));
    assert!(crate_paths("use crate::{api::Phase, names};") == ["api::Phase", "names"]);
    assert!(graph["oauth::token::transport"].contains("oauth::token::url_policy"));
    assert_eq!(
        crate_paths_of("oauth::decide", "use super::state::X;"),
        ["oauth::state::X"]
    );
}
