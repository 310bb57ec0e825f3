//! The speech path end to end through `callbox transcribe`, on the real models built by
//! models/build.sh (models/cache) and the real recordings in ../shared/data/speech.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use support::{run_cli, stderr_of, stdout_of};

const MODELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/cache");
const SPEECH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/speech");

fn models() -> &'static str {
    assert!(
        Path::new(MODELS).join("manifest.json").exists(),
        "models missing: run `bash models/build.sh` first (it fills models/cache)"
    );
    MODELS
}

fn clip(name: &str) -> String {
    format!("{SPEECH}/{name}")
}

/// One encoder bucket keeps model loading short (each bucket is a separately optimised plan).
fn config(dir: &Path) -> PathBuf {
    let path = dir.join("callbox.toml");
    std::fs::write(&path, "[speech]\nencoder_buckets_secs = [8]\n").unwrap();
    path
}

fn transcribe(dir: &Path, extra: &[&str], files: &[&str]) -> Output {
    let config = config(dir);
    let mut args = vec!["--config", config.to_str().unwrap(), "transcribe", "--json", "--models", models()];
    args.extend_from_slice(extra);
    args.extend_from_slice(files);
    run_cli(&args)
}

fn utterances(out: &Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "transcribe failed: {}", stderr_of(out));
    let line = stdout_of(out);
    let v: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    v["utterances"].as_array().unwrap().clone()
}

fn text(us: &[serde_json::Value]) -> String {
    us.iter().map(|u| u["text"].as_str().unwrap()).collect::<Vec<_>>().join(" ")
}

fn sox(args: &[&str]) {
    let status = std::process::Command::new("sox")
        .arg("-D")
        .args(args)
        .status()
        .expect("sox is needed for this test (apt-get install sox)");
    assert!(status.success(), "sox {args:?}");
}

#[test]
fn a_mandarin_clip_transcribes_to_its_key_words_with_times_and_prosody() {
    let dir = tempfile::tempdir().unwrap();
    // Reference: 甚至出现交易几乎停滞的情况
    let us = utterances(&transcribe(dir.path(), &[], &[&clip("zh/BAC009S0764W0121.wav")]));
    assert_eq!(us.len(), 1, "{us:?}");
    let u = &us[0];
    let t = u["text"].as_str().unwrap();
    for word in ["甚至", "出现", "交易", "情况"] {
        assert!(t.contains(word), "{word} not in {t}");
    }
    assert_eq!(u["leg"], "customer");
    let (start, end) = (u["start_secs"].as_f64().unwrap(), u["end_secs"].as_f64().unwrap());
    assert!((0.0..1.0).contains(&start) && (3.3..=4.21).contains(&end), "{start}..{end}");
    assert_eq!(u["asr"]["language"], "zh");
    assert_eq!(u["asr"]["stop"], "end_of_text");
    let f0 = u["prosody"]["f0_median_hz"].as_f64().unwrap();
    assert!((80.0..400.0).contains(&f0), "F0 {f0}");
}

#[test]
fn telephone_audio_still_gives_the_key_words() {
    let dir = tempfile::tempdir().unwrap();
    let phone = dir.path().join("phone.wav");
    // What a PBX recording is: 8 kHz µ-law, telephone band.
    sox(&[
        &clip("zh/BAC009S0764W0121.wav"),
        "-r",
        "8000",
        "-e",
        "u-law",
        "-b",
        "8",
        phone.to_str().unwrap(),
        "sinc",
        "300-3400",
    ]);
    let t = text(&utterances(&transcribe(dir.path(), &[], &[phone.to_str().unwrap()])));
    for word in ["出现", "交易", "情况"] {
        assert!(t.contains(word), "{word} not in {t}");
    }
}

#[test]
fn traditional_characters_come_out_simplified() {
    let dir = tempfile::tempdir().unwrap();
    // Whisper base writes this clip as 換一首歌; the transcript must be simplified.
    let t = text(&utterances(&transcribe(dir.path(), &[], &[&clip("zh/IT0011W0001.wav")])));
    assert!(t.contains("换一首歌"), "{t}");
    assert!(!t.contains('換'), "{t}");
}

#[test]
fn english_is_transcribed_when_asked_for_and_detected_when_auto() {
    let dir = tempfile::tempdir().unwrap();
    let file = clip("en/POD1000000004_S0000051.wav"); // BUT WHAT KIND OF BUSINESS
    for lang in ["en", "auto"] {
        let us = utterances(&transcribe(dir.path(), &["--lang", lang], &[&file]));
        let t = text(&us).to_lowercase();
        assert!(t.contains("kind of business"), "--lang {lang}: {t}");
        assert_eq!(us[0]["asr"]["language"], "en");
    }
}

#[test]
fn vad_places_speech_inside_silence_and_finds_none_in_noise() {
    let dir = tempfile::tempdir().unwrap();
    let padded = dir.path().join("padded.wav");
    // 2 s of silence, the clip (speech from ~0.4 s to ~3.9 s of it), 2 s of silence.
    sox(&[&clip("zh/IT0011W0001.wav"), padded.to_str().unwrap(), "pad", "2", "2"]);
    let us = utterances(&transcribe(dir.path(), &[], &[padded.to_str().unwrap()]));
    assert_eq!(us.len(), 1, "{us:?}");
    let (start, end) = (us[0]["start_secs"].as_f64().unwrap(), us[0]["end_secs"].as_f64().unwrap());
    assert!((2.0..2.5).contains(&start) && (3.5..4.2).contains(&end), "{start}..{end}");

    let noise = dir.path().join("noise.wav");
    sox(&[
        "-n",
        "-r",
        "16000",
        "-b",
        "16",
        "-c",
        "1",
        noise.to_str().unwrap(),
        "synth",
        "4",
        "pinknoise",
        "vol",
        "0.02",
    ]);
    let us = utterances(&transcribe(dir.path(), &[], &[noise.to_str().unwrap()]));
    assert!(us.is_empty(), "{us:?}");
}

#[test]
fn a_model_file_that_does_not_match_its_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = std::fs::read_to_string(Path::new(models()).join("manifest.json")).unwrap();
    let config = config(dir.path());
    // (what is tampered with, what the error must name)
    let tamperings: [(&str, serde_json::Value, &str); 2] = [
        ("/models/0/files/model/sha256", serde_json::json!("00".repeat(32)), "sha256"),
        ("/models/0/chunk_samples", serde_json::json!(256), "chunk_samples"),
    ];
    for (i, (pointer, value, named)) in tamperings.into_iter().enumerate() {
        let fake = dir.path().join(format!("models{i}"));
        std::fs::create_dir(&fake).unwrap();
        for sub in ["silero-vad", "whisper-base", "text"] {
            std::os::unix::fs::symlink(Path::new(models()).join(sub), fake.join(sub)).unwrap();
        }
        let mut v: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        *v.pointer_mut(pointer).unwrap() = value;
        std::fs::write(fake.join("manifest.json"), v.to_string()).unwrap();
        let out = run_cli(&[
            "--config",
            config.to_str().unwrap(),
            "transcribe",
            "--models",
            fake.to_str().unwrap(),
            &clip("zh/IT0011W0001.wav"),
        ]);
        assert_eq!(out.status.code(), Some(69), "{pointer}: {}", stderr_of(&out));
        let err = stderr_of(&out);
        assert!(err.contains("silero") && err.contains(named), "{pointer}: {err}");
    }
}

#[test]
fn missing_models_and_bad_recordings_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let out = run_cli(&["--config", config.to_str().unwrap(), "transcribe", "--models", "/nonexistent", "x.wav"]);
    assert_eq!(out.status.code(), Some(69));
    assert!(stderr_of(&out).contains("models/build.sh"), "{}", stderr_of(&out));

    let corrupt = dir.path().join("corrupt.wav");
    std::fs::write(&corrupt, b"RIFF\x10\x00\x00\x00WAVEfmt garbage").unwrap();
    let good = clip("zh/IT0011W0001.wav");
    let out = transcribe(dir.path(), &[], &[corrupt.to_str().unwrap(), &good]);
    // The bad file is reported and skipped; the good one is still transcribed.
    assert_eq!(out.status.code(), Some(65));
    let err = stderr_of(&out);
    assert!(err.contains("corrupt.wav"), "{err}");
    assert!(stdout_of(&out).contains("换一首歌"), "{}", stdout_of(&out));
}
