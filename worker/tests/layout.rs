//! The worker's source layout, as `worker/src/lib.rs` describes it: every module is named in
//! its `//!` layout, and no two subsystems (top-level modules: a file or a folder of
//! `worker/src`) depend on each other, directly or around a loop. Files inside one folder may
//! share through `super::`; that is what a folder is for.
//!
//! Dependencies are read from the source: every `crate::<module>` outside a comment.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The subsystem a file belongs to: `store/read.rs` -> `store`, `ring.rs` -> `ring`.
fn subsystem(file: &Path) -> String {
    let relative = file.strip_prefix(src()).expect("under src");
    let first = relative
        .components()
        .next()
        .expect("a path")
        .as_os_str()
        .to_string_lossy()
        .to_string();
    first.trim_end_matches(".rs").to_string()
}

/// The code of `text` without comments (line comments and doc comments; the worker has no
/// block comments) and without string literals' contents, so that neither prose nor a log
/// line counts as a dependency.
fn code(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut in_string = false;
        let mut previous = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            if !in_string && c == '/' && chars.peek() == Some(&'/') {
                break;
            }
            if c == '"' && previous != '\\' {
                in_string = !in_string;
            } else if !in_string {
                out.push(c);
            }
            previous = c;
        }
        out.push('\n');
    }
    out
}

/// Subsystems named as `crate::<name>` in `code`.
fn uses(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let name: String = code[at + "crate::".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let subsystems: BTreeSet<String> = files.iter().map(|file| subsystem(file)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = subsystem(file);
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let edges = graph.entry(from.clone()).or_default();
        for to in uses(&code(&text)) {
            if to != from && subsystems.contains(&to) {
                edges.insert(to);
            }
        }
    }
    graph
}

/// A loop in `graph`, as the path around it, if there is one.
fn find_loop(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut around = path[at..].to_vec();
            around.push(node.to_string());
            return Some(around);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_two_subsystems_depend_on_each_other() {
    let graph = dependencies();
    assert!(graph.len() > 10, "read too few modules: {graph:?}");
    if let Some(around) = find_loop(&graph) {
        panic!(
            "the worker's modules depend on each other in a loop: {}",
            around.join(" -> ")
        );
    }
}

#[test]
fn the_loop_finder_finds_a_loop() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_loop(&graph), None);
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_loop(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        uses(&code(
            "use crate::store::Shard; // crate::ring\nlet s = \"crate::mover\";"
        )),
        BTreeSet::from(["store".to_string()])
    );
}

#[test]
fn the_layout_in_lib_rs_names_every_module() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("lib.rs");
    let layout: String = lib
        .lines()
        .filter_map(|line| line.strip_prefix("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let modules: Vec<&str> = lib
        .lines()
        .filter_map(|line| {
            line.trim()
                .strip_prefix("pub mod ")
                .or_else(|| line.trim().strip_prefix("mod "))
        })
        .map(|rest| rest.trim_end_matches(';'))
        .collect();
    assert!(modules.len() > 10, "read too few modules: {modules:?}");
    let missing: Vec<&&str> = modules
        .iter()
        .filter(|name| !layout.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "lib.rs's layout does not name {missing:?}"
    );
}
