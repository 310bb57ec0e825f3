//! The layers of `daemon/src`, held by a test: every `crate::`/`super::` path in the
//! non-test code of each file is resolved to the file it names, and the edges are checked
//! against ARCHITECTURE.md's "Architecture Invariant" lines. A forbidden edge or an import
//! cycle fails with the files and the line that made it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The pure cores: no tokio, no sockets, no clock, nothing of the control plane and no
/// IO adapter of the daemon.
const CORES: &[&str] = &[
    "audio",
    "audio::audiosocket",
    "audio::g711",
    "audio::resample",
    "audio::wav",
    "calls",
    "calls::capacity",
    "config",
    "cpu",
    "inputs::lines",
    "hex",
    "pii",
    "speech",
    "speech::attention",
    "speech::decoding",
    "speech::manifest",
    "speech::mel",
    "speech::pipeline",
    "speech::prosody",
    "speech::scheduler",
    "speech::tokens",
    "speech::vad",
    "speech::hotwords",
    "speech::weights",
    "speech::whisper",
    "speech::zh",
    "store::audio",
    "store::audit",
    "store::crypto",
    "understanding",
    "understanding::call",
    "understanding::core",
    "understanding::emotion",
    "understanding::intent",
    "understanding::lexicon",
    "understanding::rules",
    "understanding::state",
    "uplink",
    "uplink::messages",
    "uplink::aggregates",
    "uplink::outbox",
    "uplink::session",
];

/// What a core may not name, and why.
const CORE_FORBIDDEN_TEXT: &[(&str, &str)] = &[
    ("tokio", "no async runtime in a core"),
    // Addresses (IpAddr, SocketAddr) are values a config may hold; sockets are IO.
    ("TcpStream", "no sockets in a core"),
    ("TcpListener", "no sockets in a core"),
    ("UdpSocket", "no sockets in a core"),
    ("UnixStream", "no sockets in a core"),
    ("UnixListener", "no sockets in a core"),
    ("UnixDatagram", "no sockets in a core"),
    ("SystemTime::now", "a core is given the time, it does not read the clock"),
    ("Instant::now", "a core is given the time, it does not read the clock"),
];

/// The one clock reading a core may make, with the reason it is not a decision input.
const CLOCK_EXCEPTIONS: &[(&str, &str)] = &[
    ("speech::whisper", "measures the encoder's and decoder's compute time, reported in the ASR facts"),
    (
        "speech::scheduler",
        "measures how long utterances wait for an ASR worker, reported in status; turns go by arrival order",
    ),
];

/// The modules of the daemon's IO edge and control plane, which cores may not import.
const SHELLS: &[&str] = &[
    "calls::registry",
    "cli",
    "cli_store",
    "control",
    "customers",
    "daemon",
    "demo",
    "doctor",
    "health",
    "inputs",
    "logging",
    "notify",
    "offline",
    "render",
    "speech::live",
    "storage",
    "store",
    "store::live",
    "store::master",
    "supervisor",
    "transcribe",
    "understanding::live",
    "uplink::hq",
    "uplink::link",
    "uplink::tls",
    "cli_hq",
];

/// The control plane: nothing below it (inputs, speech, understanding, stores, health,
/// config) may import it.
const CONTROL_PLANE: &[&str] = &["control", "cli", "cli_hq", "cli_store", "demo", "doctor", "private_daemon", "render"];

/// Modules that may import the control plane (they are it, or sit above it).
const ABOVE_CONTROL: &[&str] =
    &["control", "cli", "cli_hq", "cli_store", "daemon", "demo", "doctor", "offline", "private_daemon", "render"];

/// Shared plumbing below the shells that is neither a core nor a shell.
const PLUMBING: &[&str] = &["escape", "exit", "fsio", "paths", "testdata"];

struct Module {
    path: PathBuf,
    /// Non-test code, comments removed, one entry per line.
    lines: Vec<String>,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn module_name(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts.join("::")
}

/// The file's code without its `#[cfg(test)] mod …` blocks and without comments.
fn code_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip_depth: Option<i32> = None;
    let mut pending_cfg_test = false;
    let mut in_block_comment = false;
    for raw in text.lines() {
        let mut line = raw.to_owned();
        if in_block_comment {
            match line.find("*/") {
                Some(end) => {
                    line = line[end + 2..].to_owned();
                    in_block_comment = false;
                }
                None => {
                    out.push(String::new());
                    continue;
                }
            }
        }
        if let Some(start) = line.find("/*") {
            if !line[start..].contains("*/") {
                in_block_comment = true;
            }
            line.truncate(start);
        }
        if let Some(comment) = line.find("//") {
            line.truncate(comment);
        }
        let trimmed = line.trim();
        if let Some(depth) = skip_depth.as_mut() {
            *depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
            if *depth <= 0 {
                skip_depth = None;
            }
            out.push(String::new());
            continue;
        }
        if trimmed.starts_with("#[cfg(test)]") {
            pending_cfg_test = true;
            out.push(String::new());
            continue;
        }
        if pending_cfg_test && trimmed.starts_with("mod ") && trimmed.ends_with('{') {
            skip_depth = Some(1);
            pending_cfg_test = false;
            out.push(String::new());
            continue;
        }
        if pending_cfg_test && !trimmed.is_empty() && !trimmed.starts_with("#[") {
            // A test-only item of one line (`use …;`): not part of the build.
            pending_cfg_test = false;
            out.push(String::new());
            continue;
        }
        out.push(line);
    }
    out
}

fn read_modules() -> BTreeMap<String, Module> {
    let src = src_dir();
    let mut files = Vec::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
        .into_iter()
        .filter(|f| f.file_name().is_some_and(|n| n != "main.rs"))
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            (module_name(&src, &f), Module { lines: code_lines(&text), path: f })
        })
        .collect()
}

/// Paths named by one `use` tree (`a::{b, c::{d, self}}` → a::b, a::c::d, a::c).
fn expand_use(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap_or(&tree).to_owned()];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(|p| {
            if p == "self" {
                vec![prefix.trim_end_matches("::").to_owned()]
            } else {
                expand_use(&format!("{prefix}{p}"))
            }
        })
        .collect()
}

/// Absolute module path (`a::b::Item`) of a path written in `module`.
fn absolute(module: &str, path: &str) -> Option<Vec<String>> {
    let mut segments: Vec<&str> = path.split("::").collect();
    let mut base: Vec<String> = match segments.first() {
        Some(&"crate") => {
            segments.remove(0);
            vec![]
        }
        Some(&"super") => {
            let mut base: Vec<String> = module.split("::").filter(|s| !s.is_empty()).map(String::from).collect();
            while segments.first() == Some(&"super") {
                segments.remove(0);
                base.pop()?;
            }
            base
        }
        Some(&"self") => {
            segments.remove(0);
            module.split("::").filter(|s| !s.is_empty()).map(String::from).collect()
        }
        _ => return None,
    };
    base.extend(segments.into_iter().map(String::from));
    Some(base)
}

/// The longest prefix of `path` that is a module file.
fn resolve(modules: &BTreeMap<String, Module>, path: &[String]) -> Option<String> {
    (1..=path.len()).rev().map(|n| path[..n].join("::")).find(|m| modules.contains_key(m))
}

/// Every edge: (from, to) → the first line (1-based) that makes it.
fn edges(modules: &BTreeMap<String, Module>) -> BTreeMap<(String, String), usize> {
    let mut found = BTreeMap::new();
    for (name, module) in modules {
        let text = module.lines.join("\n");
        let mut paths: Vec<(usize, String)> = Vec::new();
        // `use` statements, possibly over several lines.
        let mut search = 0;
        while let Some(at) = text[search..].find("use ").map(|i| i + search) {
            search = at + 4;
            let before = text[..at].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let Some(end) = text[at..].find(';').map(|i| i + at) else { break };
            let line = text[..at].lines().count().max(1);
            let tree = &text[at + 4..end];
            if tree.trim_start().starts_with("crate::")
                || tree.trim_start().starts_with("super::")
                || tree.trim_start().starts_with("self::")
            {
                paths.extend(expand_use(tree).into_iter().map(|p| (line, p)));
            }
        }
        // Paths written inline (`crate::x::y(…)`).
        for (n, line) in module.lines.iter().enumerate() {
            for root in ["crate::", "super::"] {
                let mut from = 0;
                while let Some(at) = line[from..].find(root).map(|i| i + from) {
                    from = at + root.len();
                    let before = line[..at].chars().last();
                    if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                        continue;
                    }
                    let path: String =
                        line[at..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
                    paths.push((n + 1, path.trim_end_matches(':').to_owned()));
                }
            }
        }
        for (line, path) in paths {
            let Some(abs) = absolute(name, &path) else { continue };
            let Some(target) = resolve(modules, &abs) else { continue };
            if &target != name && !target.is_empty() {
                found.entry((name.clone(), target)).or_insert(line);
            }
        }
    }
    found
}

fn is_in(module: &str, set: &[&str]) -> bool {
    set.iter().any(|s| module == *s || module.starts_with(&format!("{s}::")))
}

fn describe(modules: &BTreeMap<String, Module>, from: &str, line: usize) -> String {
    let file = modules[from].path.strip_prefix(src_dir()).unwrap().display().to_string();
    format!("daemon/src/{file}:{line}")
}

#[test]
fn cores_use_no_runtime_socket_clock_or_shell() {
    let modules = read_modules();
    let mut problems = Vec::new();
    for core in CORES {
        let Some(module) = modules.get(*core) else {
            problems.push(format!("core {core} is listed but has no file: update CORES"));
            continue;
        };
        for (n, line) in module.lines.iter().enumerate() {
            for (needle, why) in CORE_FORBIDDEN_TEXT {
                let excepted = needle.ends_with("::now") && CLOCK_EXCEPTIONS.iter().any(|(m, _)| m == core);
                if line.contains(needle) && !excepted {
                    problems.push(format!("{}: {needle}: {why}", describe(&modules, core, n + 1)));
                }
            }
        }
    }
    for ((from, to), line) in edges(&modules) {
        if CORES.contains(&from.as_str()) && is_in(&to, SHELLS) && !CORES.contains(&to.as_str()) {
            problems.push(format!("{}: core {from} imports {to}, a shell", describe(&modules, &from, line)));
        }
    }
    assert!(problems.is_empty(), "layer violations:\n{}", problems.join("\n"));
}

#[test]
fn nothing_below_the_control_plane_imports_it_and_the_protocol_imports_nothing() {
    let modules = read_modules();
    let mut problems = Vec::new();
    for ((from, to), line) in edges(&modules) {
        if is_in(&to, CONTROL_PLANE) && !is_in(&from, ABOVE_CONTROL) {
            problems.push(format!("{}: {from} imports the control plane ({to})", describe(&modules, &from, line)));
        }
        if from == "control::protocol" {
            problems.push(format!(
                "{}: the protocol imports {to}; it must own every wire type",
                describe(&modules, &from, line)
            ));
        }
        // Conversions to wire types are written once, in control::convert; the CLI's offline
        // commands reuse them to print what `watch` prints.
        if to == "control::convert" && !is_in(&from, &["control", "offline"]) {
            problems
                .push(format!("{}: {from} converts to wire types outside control", describe(&modules, &from, line)));
        }
    }
    assert!(problems.is_empty(), "layer violations:\n{}", problems.join("\n"));
}

#[test]
fn there_are_no_import_cycles() {
    let modules = read_modules();
    let edges = edges(&modules);
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        graph.entry(from).or_default().insert(to);
    }
    // Tarjan's strongly connected components; any with two or more files is a cycle.
    struct State<'a> {
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        cycles: Vec<Vec<&'a str>>,
    }
    fn visit<'a>(v: &'a str, graph: &BTreeMap<&'a str, BTreeSet<&'a str>>, s: &mut State<'a>) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in graph.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(w, graph, s);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w);
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.cycles.push(component);
            }
        }
    }
    let mut state = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        cycles: Vec::new(),
    };
    for &v in graph.keys() {
        if !state.index.contains_key(v) {
            visit(v, &graph, &mut state);
        }
    }
    let report: Vec<String> = state
        .cycles
        .iter()
        .map(|c| {
            let members: BTreeSet<&str> = c.iter().copied().collect();
            let ties: Vec<String> = edges
                .iter()
                .filter(|((f, t), _)| members.contains(f.as_str()) && members.contains(t.as_str()))
                .map(|((f, t), line)| format!("  {} → {t}", describe(&modules, f, *line)))
                .collect();
            format!("cycle through {}:\n{}", c.join(", "), ties.join("\n"))
        })
        .collect();
    assert!(report.is_empty(), "{}", report.join("\n"));
}

#[test]
fn every_module_has_a_layer() {
    // A new file must be placed, or the rules above would silently skip it.
    let modules = read_modules();
    let unplaced: Vec<&String> = modules
        .keys()
        .filter(|m| !m.is_empty())
        .filter(|m| {
            !CORES.contains(&m.as_str())
                && !is_in(m, SHELLS)
                && !is_in(m, CONTROL_PLANE)
                && !is_in(m, ABOVE_CONTROL)
                && !PLUMBING.contains(&m.as_str())
        })
        .collect();
    assert!(unplaced.is_empty(), "modules in no layer (add them to CORES, SHELLS, … in tests/layers.rs): {unplaced:?}");
}

#[test]
fn the_checker_sees_the_edges_it_must() {
    // The checker itself could rot into passing everything: it must find edges that exist.
    let modules = read_modules();
    let edges = edges(&modules);
    for (from, to) in
        [("daemon", "supervisor"), ("control::server", "control::protocol"), ("understanding::call", "pii")]
    {
        assert!(edges.contains_key(&(from.to_owned(), to.to_owned())), "{from} → {to} not seen");
    }
    assert_eq!(expand_use("crate::a::{b, c::{d, self}}"), ["crate::a::b", "crate::a::c::d", "crate::a::c"]);
    assert_eq!(
        absolute("understanding::live", "super::rules::X"),
        Some(vec!["understanding".into(), "rules".into(), "X".into()])
    );
}
