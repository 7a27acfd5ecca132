//! The collector's module graph, read from its source: no module cycle,
//! and every import points down the layers of `ARCHITECTURE.md` (binary
//! and wiring on top, domain types at the bottom).
//!
//! A module is a top-level one of `collector/src` (`usage/periods.rs`
//! counts as `usage`). Its imports are the `crate::<module>` paths in its
//! code (`use` items and paths alike; `main.rs` names the library
//! `capwatch_collector::`), not in comments, strings or `#[cfg(test)]`
//! items and files. Items of the crate root (`crate::VERSION`) are not a
//! module and are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, top (1) to bottom (5): a module may import its own layer
/// or one below (same-layer imports are fine as long as they make no
/// cycle).
const LEVELS: &[(&str, u8)] = &[
    ("main", 1),
    ("app", 1),
    // Surfaces, and the config only they and the wiring read.
    ("ingest", 2),
    ("http", 2),
    ("status", 2),
    ("metrics", 2),
    ("scrape", 2),
    ("serve", 2),
    ("usage", 2),
    ("config", 2),
    // Services: the committer and compactor drive the façade, which
    // composes the fleet and billing.
    ("persist", 3),
    // Facility meters: polling tasks, their live figures, the allocation.
    ("meters", 3),
    ("state", 3),
    ("fleet", 3),
    ("billing", 3),
    // Storage, tenants and tokens.
    ("ledger", 4),
    ("tenants", 4),
    ("auth", 4),
    // Checked domain types, pure arithmetic, events, readiness, helpers.
    ("edge", 5),
    ("accounting", 5),
    ("events", 5),
    ("health", 5),
    ("sync", 5),
];

/// The import graph of the top-level modules of the collector whose
/// source is under `src`.
fn graph_of(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    // Read everything first: a file is a test when another declares it
    // `#[cfg(test)] mod name;` (and so is everything under `name/`).
    let mut read = Vec::new();
    let mut tests: Vec<PathBuf> = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read a source file");
        let (code, test_mods) = without_tests(&strip(&text));
        let dir = child_dir(&file);
        for m in test_mods {
            tests.push(dir.join(format!("{m}.rs")));
            tests.push(dir.join(m));
        }
        read.push((file, code));
    }
    read.retain(|(file, _)| !tests.iter().any(|t| file.starts_with(t)));
    let modules: BTreeSet<String> = read
        .iter()
        .filter_map(|(f, _)| module_of(src, f))
        .filter(|m| m != "main")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, code) in &read {
        let Some(from) = module_of(src, file) else {
            continue;
        };
        let prefix = if from == "main" {
            "capwatch_collector"
        } else {
            "crate"
        };
        let edges = graph.entry(from.clone()).or_default();
        for to in references(code, prefix) {
            if to != from && modules.contains(&to) {
                edges.insert(to);
            }
        }
    }
    graph
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("list a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module `file` belongs to; none for the crate root.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first.strip_suffix(".rs") {
        Some("lib") => None,
        Some(name) => Some(name.to_string()),
        None => Some(first.to_string()),
    }
}

/// Where the files of `file`'s child modules live.
fn child_dir(file: &Path) -> PathBuf {
    let dir = file.parent().expect("a file has a directory");
    match file.file_stem().and_then(|s| s.to_str()) {
        Some("mod" | "lib" | "main") => dir.to_path_buf(),
        Some(stem) => dir.join(stem),
        None => dir.to_path_buf(),
    }
}

/// `src` with comments removed and string and character literals
/// emptied, so that only code is left to read paths from.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '/' if c.get(i + 1) == Some(&'/') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if c.get(i + 1) == Some(&'*') => {
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                out.push(' ');
            }
            // Raw strings: r"…", r#"…"#, br"…".
            'r' if starts_word(&c, i) || (i > 0 && c[i - 1] == 'b' && starts_word(&c, i - 1)) => {
                let mut j = i + 1;
                let mut hashes = 0;
                while c.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if c.get(j) != Some(&'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                j += 1;
                loop {
                    if j >= c.len() {
                        break;
                    }
                    if c[j] == '"' && (0..hashes).all(|h| c.get(j + 1 + h) == Some(&'#')) {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                out.push_str("\"\"");
                i = j;
            }
            '"' => {
                i += 1;
                while i < c.len() && c[i] != '"' {
                    if c[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push_str("\"\"");
            }
            '\'' => {
                // A character literal ('x', '\n', '\''), or a lifetime.
                if c.get(i + 1) == Some(&'\\') {
                    i += 2;
                    while i < c.len() && c[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                    out.push_str("' '");
                } else if c.get(i + 2) == Some(&'\'') {
                    i += 3;
                    out.push_str("' '");
                } else {
                    out.push('\'');
                    i += 1;
                }
            }
            ch => {
                out.push(ch);
                i += 1;
            }
        }
    }
    out
}

/// Whether position `at` of `c` starts a word (follows no identifier
/// character), so that an `r` there may open a raw string.
fn starts_word(c: &[char], at: usize) -> bool {
    at == 0 || !(c[at - 1].is_alphanumeric() || c[at - 1] == '_')
}

/// `code` without its `#[cfg(test)]` items, and the names of the
/// modules declared `#[cfg(test)] mod name;` (whose files are tests).
fn without_tests(code: &str) -> (String, Vec<String>) {
    const MARK: &str = "#[cfg(test)]";
    let mut out = String::with_capacity(code.len());
    let mut test_mods = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(MARK) {
        out.push_str(&rest[..at]);
        let item = &rest[at + MARK.len()..];
        // The item runs to its first `;` or to the `}` closing its first `{`.
        let b = item.as_bytes();
        let mut depth = 0usize;
        let mut end = item.len();
        for (i, &ch) in b.iter().enumerate() {
            match ch {
                b'{' => depth += 1,
                // The end of the block the item is the last of.
                b'}' if depth == 0 => {
                    end = i;
                    break;
                }
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                // A field or an argument.
                b',' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                b';' if depth == 0 => {
                    end = i + 1;
                    let words: Vec<&str> = item[..i].split_whitespace().collect();
                    if let [.., "mod", name] = words[..] {
                        test_mods.push(name.to_string());
                    }
                    break;
                }
                _ => {}
            }
        }
        rest = &item[end..];
    }
    out.push_str(rest);
    (out, test_mods)
}

/// The first segments of the paths that start with `prefix::` in `code`
/// (`crate::a::b` gives `a`; `crate::{a, b::c}` gives `a` and `b`).
fn references(code: &str, prefix: &str) -> BTreeSet<String> {
    let tokens = tokens(code);
    let mut out = BTreeSet::new();
    for i in 0..tokens.len() {
        if tokens[i] != prefix
            || tokens.get(i + 1).map(String::as_str) != Some("::")
            || (i > 0 && (tokens[i - 1] == "$" || tokens[i - 1] == "::"))
        {
            continue;
        }
        match tokens.get(i + 2).map(String::as_str) {
            Some("{") => {
                // A group: the first segment of each element at depth 1.
                let mut depth = 0;
                let mut first = true;
                for t in &tokens[i + 2..] {
                    match t.as_str() {
                        "{" => {
                            depth += 1;
                            if depth == 1 {
                                first = true;
                            }
                        }
                        "}" => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        "," if depth == 1 => first = true,
                        t if depth == 1 && first => {
                            if is_ident(t) && t != "self" {
                                out.insert(t.to_string());
                            }
                            first = false;
                        }
                        _ => {}
                    }
                }
            }
            Some(t) if is_ident(t) => {
                out.insert(t.to_string());
            }
            _ => {}
        }
    }
    out
}

fn is_ident(t: &str) -> bool {
    t.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Identifiers, `::` and single punctuation characters.
fn tokens(code: &str) -> Vec<String> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(c[start..i].iter().collect());
        } else if ch == ':' && c.get(i + 1) == Some(&':') {
            out.push("::".to_string());
            i += 2;
        } else {
            if !ch.is_whitespace() {
                out.push(ch.to_string());
            }
            i += 1;
        }
    }
    out
}

/// A cycle of `graph` (its modules in order, the first repeated at the
/// end), if it has one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        marks.insert(node, Mark::Open);
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next.as_str()).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = path.iter().position(|n| *n == next).expect("on the path");
                    let mut cycle: Vec<String> =
                        path[from..].iter().map(|n| n.to_string()).collect();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(next, graph, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(node, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if marks.get(node.as_str()).copied().unwrap_or(Mark::New) == Mark::New
            && let Some(c) = visit(node, graph, &mut marks, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn the_collector_has_no_module_cycle() {
    let graph = graph_of(&src());
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "module cycle in collector/src: {}\n(the whole graph: {graph:#?})",
            cycle.join(" → ")
        );
    }
}

#[test]
fn every_import_points_down_the_layers() {
    let level = |m: &str| {
        LEVELS
            .iter()
            .find(|(name, _)| *name == m)
            .map(|(_, l)| *l)
            .unwrap_or_else(|| panic!("module `{m}` has no layer: add it to LEVELS"))
    };
    let mut up = Vec::new();
    for (from, edges) in graph_of(&src()) {
        for to in edges {
            if level(&to) < level(&from) {
                up.push(format!(
                    "{from} (layer {}) → {to} (layer {})",
                    level(&from),
                    level(&to)
                ));
            }
        }
    }
    assert!(up.is_empty(), "imports pointing up: {up:#?}");
}

#[test]
fn the_checker_finds_a_made_up_cycle() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    let cyclic = graph(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]);
    assert_eq!(
        find_cycle(&cyclic),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let two = graph(&[("http", "status"), ("status", "http")]);
    assert_eq!(
        find_cycle(&two),
        Some(vec!["http".into(), "status".into(), "http".into()])
    );
    let layered = graph(&[("a", "b"), ("a", "c"), ("b", "c"), ("c", "d")]);
    assert_eq!(find_cycle(&layered), None);
}

#[test]
fn the_checker_finds_a_cycle_in_source_files() {
    let dir = tempfile::tempdir().unwrap();
    let write = |path: &str, text: &str| {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n");
    write("a.rs", "use crate::b::Thing;\n");
    write("b/mod.rs", "mod inner;\n#[cfg(test)]\nmod tests;\n");
    write("b/inner.rs", "fn f() { crate::c::g() }\n");
    // Test files and test modules do not count.
    write("b/tests.rs", "use crate::a::X;\n");
    write("c.rs", "#[cfg(test)]\nmod tests { use crate::a::Y; }\n");
    let graph = graph_of(dir.path());
    assert_eq!(find_cycle(&graph), None, "{graph:?}");
    write("c.rs", "pub fn g() { let _ = crate::a::Y; }\n");
    assert_eq!(
        find_cycle(&graph_of(dir.path())),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}

#[test]
fn references_are_read_from_code_only() {
    let code = r####"
        //! [`crate::doc`] in a doc comment
        use crate::{alpha, beta::{One, Two}, self as me};
        use crate::gamma::Thing;
        /* crate::block /* nested crate::deeper */ */
        fn f<'a>(x: &'a str) -> char {
            let _ = "crate::in_a_string";
            let _ = r#"crate::in_a_raw_string"#;
            let _ = crate::delta::call(x);
            let _ = '"';
            crate::VERSION;
            'x'
        }
        macro_rules! m { () => { $crate::macro_path } }
        pub(crate) fn g() {}
        #[cfg(test)]
        mod tests {
            use crate::tested;
        }
        #[cfg(test)]
        use crate::test_only_import;
        #[cfg(test)]
        mod more_tests;
    "####;
    let (code, test_mods) = without_tests(&strip(code));
    let found: Vec<String> = references(&code, "crate").into_iter().collect();
    assert_eq!(found, ["VERSION", "alpha", "beta", "delta", "gamma"]);
    assert_eq!(test_mods, ["more_tests"]);
}
