//! The code map (docs/ARCHITECTURE.md) held against the code.
//!
//! - Between crates the layering is Cargo's: a wrong import does not
//!   compile. This test pins each workspace crate's own dependencies to the
//!   code map, so a new `path` dependency cannot quietly turn an upward
//!   import into one that compiles.
//! - Inside a crate, modules may still import each other freely; the rules
//!   below say which top-level module may import which, and no crate may
//!   have an import cycle between its top-level modules.
//!
//! References are read from the source as text: `crate::m`, `crate::{m, ..}`,
//! `super::m` in a top-level module's own file, and `other_crate::` for the
//! crates the `vmm` library re-exports under module names. Comment lines
//! and `#[cfg(test)]` modules are skipped (tests may reach further).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each workspace crate, where it is, and the workspace crates it may
/// depend on (its `[dependencies]`).
const CRATES: &[(&str, &str, &[&str])] = &[
    ("memslots", "vmm/memslots", &[]),
    ("vmm-exit", "vmm/exit", &[]),
    ("vmm-counters", "vmm/counters", &[]),
    ("vmm-snapshot", "vmm/snapshot", &[]),
    ("vmm-memory", "vmm/memory", &["memslots", "vmm-counters"]),
    (
        "vmm-fault",
        "vmm/fault",
        &["memslots", "vmm-exit", "vmm-counters", "vmm-memory"],
    ),
    (
        "vmm-devices",
        "vmm/devices",
        &["vmm-exit", "vmm-counters", "vmm-memory"],
    ),
    (
        "vmm",
        "vmm",
        &[
            "vmm-exit",
            "vmm-counters",
            "vmm-memory",
            "vmm-fault",
            "vmm-devices",
            "vmm-snapshot",
        ],
    ),
    ("vmm-guests", "vmm/guests", &[]),
    ("vmm-bench", "vmm/bench", &["vmm", "vmm-guests"]),
    ("vmm-stress", "vmm/stress", &["vmm", "vmm-guests"]),
    ("vmm-top", "vmm/top", &["vmm"]),
    (
        "vmm-cli",
        "vmm/cli",
        &["vmm", "vmm-bench", "vmm-stress", "vmm-top", "vmm-guests"],
    ),
];

/// The `vmm` library's top-level modules and what each may import (the
/// lifted crates appear under the names `lib.rs` re-exports them as).
/// `vm` wires everything together and may import anything.
const VMM_MODULES: &[(&str, &[&str])] = &[
    ("host", &["fault"]),
    ("logger", &[]),
    ("http1", &[]),
    ("terminal", &[]),
    ("arch", &["memory", "host"]),
    ("boot", &["arch", "memory", "host"]),
    ("seccomp", &["exit", "fault"]),
    ("config", &["fault", "devices", "seccomp"]),
    ("vcpu", &["exit", "fault", "devices", "host", "config"]),
    (
        "api",
        &["exit", "counters", "memory", "devices", "fault", "http1"],
    ),
    (
        "metrics",
        &["exit", "counters", "memory", "devices", "fault", "http1"],
    ),
    ("summary", &["vm", "counters", "memory", "devices", "fault"]),
    (
        "snapshot",
        &[
            "exit", "memory", "devices", "fault", "host", "vcpu", "config", "seccomp",
        ],
    ),
    ("vm", &["*"]),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `[dependencies]` of a Cargo.toml that are workspace crates.
fn path_dependencies(toml: &str) -> BTreeSet<String> {
    let mut deps = BTreeSet::new();
    let mut section = String::new();
    for line in toml.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            section = l.to_string();
        } else if section == "[dependencies]" && l.contains("path =") {
            if let Some((name, _)) = l.split_once('=') {
                deps.insert(name.trim().to_string());
            }
        }
    }
    deps
}

#[test]
fn crates_depend_only_downward() {
    let workspace = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    for (name, dir, allowed) in CRATES {
        assert!(
            workspace.contains(&format!("\"{dir}\"")) || *dir == "vmm",
            "{name} ({dir}) is not a workspace member"
        );
        let toml = std::fs::read_to_string(root().join(dir).join("Cargo.toml")).unwrap();
        assert!(
            toml.contains(&format!("name = \"{name}\"")),
            "{dir}: not {name}"
        );
        let deps = path_dependencies(&toml);
        let allowed: BTreeSet<String> = allowed.iter().map(|s| s.to_string()).collect();
        let extra: Vec<_> = deps.difference(&allowed).collect();
        assert!(
            extra.is_empty(),
            "{name} depends on {extra:?}, which the code map does not allow (docs/ARCHITECTURE.md)"
        );
    }
}

/// One source file: its path under `src/` and its text.
type Tree = Vec<(PathBuf, String)>;

fn read_tree(src: &Path) -> Tree {
    fn walk(dir: &Path, base: &Path, out: &mut Tree) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.path());
        for e in entries {
            let p = e.path();
            if p.is_dir() {
                walk(&p, base, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                out.push((p.strip_prefix(base).unwrap().to_path_buf(), text));
            }
        }
    }
    let mut out = Vec::new();
    walk(src, src, &mut out);
    out
}

/// The top-level module a file belongs to (`None` for the crate root).
fn top_module(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

/// The file without comment lines and `#[cfg(test)]` modules.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        if t.starts_with("#[cfg(test)]") {
            // Skip the item that follows, to its closing brace.
            let mut depth = 0i32;
            let mut opened = false;
            for l in lines.by_ref() {
                for c in l.chars() {
                    match c {
                        '{' => {
                            depth += 1;
                            opened = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                }
                if (opened && depth <= 0) || (!opened && l.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Identifiers named right after `prefix` (`prefix x`, or each first
/// segment of `prefix {x, y::z}`).
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices(prefix) {
        // Not the tail of a longer path (`vmm::crate::` cannot happen, but
        // `a_crate::` can).
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = 0;
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(group[start..k].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(group[start..k].trim()));
                        start = k + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

/// `pub use other_crate as module;` lines of a crate root.
fn aliases(root_text: &str) -> BTreeMap<String, String> {
    root_text
        .lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("pub use ")?.strip_suffix(';')?;
            let (krate, module) = l.split_once(" as ")?;
            Some((krate.trim().to_string(), module.trim().to_string()))
        })
        .collect()
}

/// Module -> the other top-level modules of the same crate it references.
fn module_graph(tree: &Tree) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = tree.iter().filter_map(|(p, _)| top_module(p)).collect();
    let root_text = tree
        .iter()
        .find(|(p, _)| top_module(p).is_none())
        .map(|(_, t)| t.as_str())
        .unwrap_or("");
    let aliases = aliases(root_text);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in tree {
        let Some(from) = top_module(rel) else {
            continue;
        };
        let code = code_of(text);
        let mut names = names_after(&code, "crate::");
        // `super::` in a top-level module's own file is the crate root.
        let own_file = rel.components().count() == 1
            || rel.ends_with("mod.rs") && rel.components().count() == 2;
        if own_file {
            names.extend(names_after(&code, "super::"));
        }
        for (krate, module) in &aliases {
            if !names_after(&code, &format!("{krate}::")).is_empty() {
                names.insert(module.clone());
            }
        }
        let entry = graph.entry(from.clone()).or_default();
        for n in names {
            if n != from && (modules.contains(&n) || aliases.values().any(|m| *m == n)) {
                entry.insert(n);
            }
        }
    }
    graph
}

/// Every cycle's members (strongly connected components of two or more
/// modules, or one that names itself).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Tarjan's algorithm.
    struct S<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut S<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on.insert(v);
        if let Some(next) = s.g.get(v) {
            for w in next {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if s.on.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            let looped = s.g.get(v).is_some_and(|n| n.contains(v));
            if comp.len() > 1 || looped {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = S {
        g: graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    let nodes: Vec<&String> = graph.keys().collect();
    for v in nodes {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v.as_str());
        }
    }
    s.out
}

/// Imports the rules do not allow: (module, what it imports).
fn violations(
    graph: &BTreeMap<String, BTreeSet<String>>,
    rules: &[(&str, &[&str])],
) -> Vec<String> {
    let mut out = Vec::new();
    for (module, targets) in graph {
        let Some((_, allowed)) = rules.iter().find(|(m, _)| m == module) else {
            out.push(format!("{module}: a module the code map does not name"));
            continue;
        };
        if allowed.contains(&"*") {
            continue;
        }
        for t in targets {
            if !allowed.contains(&t.as_str()) {
                out.push(format!("{module} imports {t}"));
            }
        }
    }
    out
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    for (name, dir, _) in CRATES {
        let tree = read_tree(&root().join(dir).join("src"));
        let found = cycles(&module_graph(&tree));
        assert!(found.is_empty(), "{name}: import cycles {found:?}");
    }
}

#[test]
fn vmm_modules_import_only_what_the_code_map_allows() {
    let tree = read_tree(&root().join("vmm/src"));
    let graph = module_graph(&tree);
    let bad = violations(&graph, VMM_MODULES);
    assert!(
        bad.is_empty(),
        "code map broken (docs/ARCHITECTURE.md):\n{}",
        bad.join("\n")
    );
    // Every rule is about a module that exists.
    for (m, _) in VMM_MODULES {
        assert!(
            graph.contains_key(*m)
                || tree
                    .iter()
                    .any(|(p, _)| top_module(p).as_deref() == Some(m)),
            "the rules name {m}, which is not a module of vmm"
        );
    }
}

/// The checks above have teeth: an upward import, a cycle and a new module
/// planted into a small tree are each found.
#[test]
fn planted_defects_are_found() {
    let tree: Tree = vec![
        (
            PathBuf::from("lib.rs"),
            "pub use vmm_memory as memory;\npub mod arch;\npub mod vm;\n".into(),
        ),
        (
            PathBuf::from("arch/mod.rs"),
            "// crate::vm in a comment is not an import\nuse crate::{memory::RamRange, vm::Vm};\n"
                .into(),
        ),
        (
            PathBuf::from("arch/acpi.rs"),
            "use vmm_memory::GuestMemory;\n".into(),
        ),
        (
            PathBuf::from("vm.rs"),
            "use super::arch;\n#[cfg(test)]\nmod tests {\n    use crate::nowhere;\n}\n".into(),
        ),
        (PathBuf::from("extra.rs"), "fn f() {}\n".into()),
    ];
    let graph = module_graph(&tree);
    assert_eq!(
        graph["arch"],
        ["memory", "vm"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(
        cycles(&graph),
        vec![vec!["arch".to_string(), "vm".to_string()]]
    );
    let rules: &[(&str, &[&str])] = &[("arch", &["memory"]), ("vm", &["*"])];
    assert_eq!(
        violations(&graph, rules),
        vec![
            "arch imports vm".to_string(),
            "extra: a module the code map does not name".to_string()
        ]
    );
}
