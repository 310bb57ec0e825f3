//! The CLI without a daemon: config checking, exit codes, help, generated docs.

use crate::support::{run_cli, stderr_of, stdout_of, TestDaemon};

const BAD: &str = "\
[daemon]
shutdown_timeout_secs = 0
flavour = \"vanilla\"

[control]
max_request_bytes = \"lots\"
socket = \"relative.sock\"

[log]
level = \"loud\"

[speakers]
count = 3
";

#[test]
fn a_bad_config_lists_every_problem_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, BAD).unwrap();
    let path = path.to_str().unwrap();

    for args in [vec!["config", "check", "--config", path], vec!["run", "--config", path]] {
        let out = run_cli(&args);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {}", stderr_of(&out));
        let err = stderr_of(&out);
        for (key, line) in [
            ("daemon.shutdown_timeout_secs", 2),
            ("daemon.flavour", 3),
            ("control.max_request_bytes", 6),
            ("control.socket", 7),
            ("log.level", 10),
            ("speakers", 12),
        ] {
            assert!(err.contains(&format!("line {line}: {key}")), "{args:?} misses {key} at line {line}:\n{err}");
        }
    }

    let out = run_cli(&["config", "check", "--json", "--config", path]);
    assert_eq!(out.status.code(), Some(78));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["valid"], false);
    assert_eq!(report["problems"].as_array().unwrap().len(), 6, "{report}");
}

#[test]
fn config_check_refuses_a_broken_rule_file_it_points_at() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nid = \"a\"\nseverity = \"info\"\nwhen = { regex = \"(\" }\n\n\
         [[rule]]\nid = \"b\"\nseverity = \"info\"\nwhen = { keywords_any = [\"@nowhere\"] }\n",
    )
    .unwrap();
    let config = dir.path().join("callbox.toml");
    std::fs::write(&config, format!("[log]\nlevel = \"info\"\n\n[understanding]\nrules_file = {rules:?}\n")).unwrap();
    let out = run_cli(&["config", "check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", stderr_of(&out));
    let err = stderr_of(&out);
    assert!(err.contains("line 5: understanding.rules_file") && err.contains("rule a"), "{err}");
    assert!(err.contains("rule b") && err.contains("nowhere"), "both problems at once: {err}");

    std::fs::write(&rules, "[[rule]]\nid = \"a\"\nseverity = \"info\"\nwhen = { regex = \"保本\" }\n").unwrap();
    let out = run_cli(&["config", "check", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
}

#[test]
fn a_missing_or_empty_config_means_built_in_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.toml");
    let out = run_cli(&["config", "check", "--config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout_of(&out).contains("built-in defaults"), "{}", stdout_of(&out));

    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let out = run_cli(&["config", "show", "--config", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let shown: toml::Table = toml::from_str(&stdout_of(&out)).expect("config show prints TOML");
    assert_eq!(shown["daemon"]["shutdown_timeout_secs"].as_integer(), Some(10));
}

#[test]
fn the_installed_default_config_passes_check() {
    let out =
        run_cli(&["config", "check", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/callbox.toml")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
}

#[test]
fn status_without_a_daemon_is_one_clear_line_and_exit_69() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody-home.sock");
    let out = run_cli(&["--socket", socket.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(69));
    let err = stderr_of(&out);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("not running") && err.contains("nobody-home.sock"), "{err}");
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    assert_eq!(run_cli(&["frobnicate"]).status.code(), Some(64));
    assert_eq!(run_cli(&["status", "--bogus"]).status.code(), Some(64));
    let help = run_cli(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    for sub in ["run", "status", "reload", "config", "doctor", "completions"] {
        assert!(stdout_of(&help).contains(sub), "--help lacks {sub}");
    }
    let version = run_cli(&["--version"]);
    assert_eq!(stdout_of(&version).trim(), format!("callbox {}", env!("CARGO_PKG_VERSION")));
    for sub in [&["run", "--help"][..], &["config", "check", "--help"], &["doctor", "--help"]] {
        assert_eq!(run_cli(sub).status.code(), Some(0), "{sub:?}");
    }
}

#[test]
fn completions_and_man_pages_are_generated_from_the_cli_definition() {
    for (shell, marker) in [("bash", "_callbox()"), ("zsh", "#compdef callbox"), ("fish", "complete -c callbox")] {
        let out = run_cli(&["completions", shell]);
        assert!(out.status.success());
        let text = stdout_of(&out);
        assert!(text.contains(marker) && text.contains("doctor"), "{shell} completion lacks {marker}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = run_cli(&["manpages", "--out-dir", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let main = std::fs::read_to_string(dir.path().join("callbox.1")).unwrap();
    assert!(main.contains(".TH callbox 1") && main.contains("doctor"), "{main}");
    assert!(dir.path().join("callbox-status.1").exists());
    assert!(dir.path().join("callbox-config-check.1").exists());
}

#[test]
fn doctor_passes_against_a_healthy_daemon_and_fails_without_one() {
    let daemon = TestDaemon::start("storage.min_free_mb = 1\nstorage.refuse_calls_below_mb = 1", &[]);
    let out = daemon.cli(&["doctor", "--json"]);
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let verdict = |name: &str| {
        checks.as_array().unwrap().iter().find(|c| c["name"] == name).map(|c| c["verdict"].as_str().unwrap().to_owned())
    };
    assert_eq!(verdict("config").as_deref(), Some("pass"), "{checks}");
    assert_eq!(verdict("data-dir").as_deref(), Some("pass"), "{checks}");
    assert_eq!(verdict("daemon").as_deref(), Some("pass"), "{checks}");
    assert_eq!(verdict("access").as_deref(), Some("pass"), "root is an admin: {checks}");
    assert!(verdict("clock").is_some());
    let store = |key: &str| checks.as_array().unwrap().iter().find(|c| c["name"] == "call store").unwrap()[key].clone();
    assert_eq!(store("verdict"), "pass", "{checks}");
    assert!(store("detail").as_str().unwrap().contains("integrity ok"), "{checks}");
    // Exit status follows the worst verdict (the clock may only warn here).
    assert_eq!(out.status.code(), Some(0), "{checks}");

    let gone = daemon.dir.path().join("elsewhere.sock");
    let out = run_cli(&["--config", daemon.config.to_str().unwrap(), "--socket", gone.to_str().unwrap(), "doctor"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout_of(&out).contains("FAIL  daemon"), "{}", stdout_of(&out));
    // A damaged master key is named, with what to do.
    std::fs::write(daemon.dir.path().join("data/keys/master.key"), b"short").unwrap();
    let out = daemon.cli(&["doctor"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout_of(&out).contains("has 5 bytes, not 32: restore it"), "{}", stdout_of(&out));
}

#[test]
fn rules_check_accepts_the_shipped_rules_and_lists_every_problem_of_a_bad_file() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/rules.toml");
    let out = run_cli(&["rules", "check", shipped]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stdout_of(&out).contains("rules, valid"));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("rules.toml");
    std::fs::write(
        &bad,
        "[[rule]]\nid = \"a\"\nseverity = \"info\"\nwhen = { regex = \"(\" }\n\
         [[rule]]\nid = \"b\"\nseverity = \"info\"\nwhen = { keywords_any = [\"@nowhere\"] }\n",
    )
    .unwrap();
    let out = run_cli(&["rules", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr_of(&out);
    assert!(
        err.contains("2 problem(s)") && err.contains("rule a: regex") && err.contains("rule b: no synonym list"),
        "{err}"
    );
}

#[test]
fn an_unreadable_config_is_named_not_hidden_behind_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("callbox.toml");
    std::fs::write(&config, b"\xff\xfe[control]\n").unwrap();
    let out = run_cli(&["--config", config.to_str().unwrap(), "status"]);
    let err = stderr_of(&out);
    assert!(err.contains("is not UTF-8 text"), "{err}");
    // Devices and FIFOs are refused, never read (the old reader took /dev/zero to OOM).
    let out = run_cli(&["config", "check", "--config", "/dev/zero"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr_of(&out).contains("not a regular file (character device)"), "{}", stderr_of(&out));
}

#[test]
fn analyze_on_a_folder_with_nothing_to_analyze_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_cli(&["analyze", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(65), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("nothing to analyze"), "{}", stderr_of(&out));
}
