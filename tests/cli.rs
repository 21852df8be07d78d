//! The batch and scripting side of the CLI, on the tiny fixture model (~0.1 s an image):
//! prompt files, --json, --resume, --shard, --from-png, failures and Ctrl-C.

use assert_cmd::Command;
use predicates::prelude::*;
use std::path::{Path, PathBuf};

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-a")
}

/// `easel --model tiny-a` run inside `dir`.
fn easel(dir: &Path) -> Command {
    let mut c = Command::cargo_bin("easel").unwrap();
    c.current_dir(dir).arg("--model").arg(model());
    c
}

fn pngs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8(stdout.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stdout line is JSON"))
        .collect()
}

fn pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

fn params(path: &Path) -> String {
    easel::output::read_parameters(path).unwrap().unwrap()
}

#[test]
fn text_prompt_file_makes_one_image_per_prompt_with_one_model_load() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("p.txt"), "a cat\n\n# a comment\n  a dog  \n").unwrap();
    let out = easel(t.path())
        .args(["--steps", "2", "--prompt-file", "p.txt", "--out-dir", "out"])
        .args(["--seed", "10", "--json"])
        .assert()
        .success()
        .stderr(predicate::str::contains("loading").count(1))
        .stderr(predicate::str::contains("summary: 2 written"))
        .get_output()
        .clone();
    assert_eq!(
        pngs(&t.path().join("out")),
        ["00000-10-a-cat.png", "00001-11-a-dog.png"]
    );
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 2);
    let keys = [
        "path",
        "prompt",
        "negative_prompt",
        "seed",
        "steps",
        "sampler",
        "guidance",
        "width",
        "height",
        "model",
        "seconds",
        "index",
        "image",
    ];
    for k in keys {
        assert!(lines[0].get(k).is_some(), "missing {k}");
    }
    assert_eq!(lines[1]["prompt"], "a dog");
    assert_eq!(lines[1]["seed"], 11);
    assert_eq!(lines[1]["steps"], 2);
    assert!(Path::new(&t.path().join(lines[1]["path"].as_str().unwrap())).is_file());
    assert!(params(&t.path().join("out/00001-11-a-dog.png")).contains("Seed: 11"));
}

#[test]
fn prompt_file_from_stdin_and_jsonl_fields() {
    let t = tempfile::tempdir().unwrap();
    let out = easel(t.path())
        .args(["--steps", "2", "--prompt-file", "-", "--json", "--seed", "1"])
        .args(["--output-template", "{prompt_slug}-{seed}.png"])
        .write_stdin(concat!(
            "{\"prompt\": \"a fox\", \"negative_prompt\": \"blur\", \"seed\": 99, \"steps\": 3, ",
            "\"guidance\": 5, \"width\": 64, \"height\": 32, \"scheduler\": \"Euler a\", \"output\": \"fox.png\"}\n",
            "plain prompt\n"
        ))
        .assert()
        .success()
        .get_output()
        .clone();
    let lines = json_lines(&out.stdout);
    assert_eq!(lines[0]["path"], "./fox.png");
    assert_eq!(
        (
            &lines[0]["seed"],
            &lines[0]["steps"],
            &lines[0]["width"],
            &lines[0]["height"]
        ),
        (&99.into(), &3.into(), &64.into(), &32.into())
    );
    assert_eq!(lines[0]["sampler"], "euler-a");
    assert_eq!(lines[0]["negative_prompt"], "blur");
    assert_eq!(lines[1]["path"], "./plain-prompt-2.png");
    let p = params(&t.path().join("fox.png"));
    assert!(
        p.contains("Negative prompt: blur") && p.contains("Size: 64x32"),
        "{p}"
    );
}

#[test]
fn a_bad_line_in_the_middle_fails_alone_and_the_exit_status_says_so() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(
        t.path().join("p.jsonl"),
        concat!(
            "{\"prompt\": \"first\"}\n",
            "{\"prompt\": \"broken\", \n",
            "{\"prompt\": \"bad size\", \"width\": 30}\n",
            "{\"prompt\": \"last\"}\n"
        ),
    )
    .unwrap();
    easel(t.path())
        .args([
            "--steps",
            "2",
            "--prompt-file",
            "p.jsonl",
            "--seed",
            "0",
            "--out-dir",
            "o",
        ])
        .assert()
        .code(3)
        .stderr(predicate::str::contains("item 1 (line 2)"))
        .stderr(predicate::str::contains("item 2 (line 3): width must be"))
        .stderr(predicate::str::contains(
            "summary: 2 written, 0 skipped (already there), 2 failed",
        ));
    assert_eq!(
        pngs(&t.path().join("o")),
        ["00000-0-first.png", "00003-3-last.png"]
    );
}

#[test]
fn resume_does_no_repeated_work_and_plain_reruns_refuse_to_overwrite() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("p.txt"), "one\ntwo\nthree\n").unwrap();
    let run = |extra: &[&str]| {
        let mut c = easel(t.path());
        c.args([
            "--steps",
            "2",
            "--prompt-file",
            "p.txt",
            "--out-dir",
            "o",
            "--json",
        ])
        .args(extra);
        c
    };
    run(&["--seed", "5"]).assert().success();
    let out = t.path().join("o");
    let names = pngs(&out);
    assert_eq!(names.len(), 3);
    let mtime = |n: &str| std::fs::metadata(out.join(n)).unwrap().modified().unwrap();
    let before: Vec<_> = names.iter().map(|n| mtime(n)).collect();
    // As if the first run had been interrupted before the second image.
    std::fs::remove_file(out.join(&names[1])).unwrap();

    run(&["--seed", "5"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("already exists (and 1 more)"))
        .stderr(predicate::str::contains("--resume"));
    run(&["--resume"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("--resume needs --seed"));

    let o = run(&["--seed", "5", "--resume"])
        .assert()
        .success()
        .stderr(predicate::str::contains("1 written, 2 skipped"))
        .get_output()
        .clone();
    let lines = json_lines(&o.stdout);
    assert_eq!(lines.len(), 1, "only the missing image is made");
    assert_eq!(lines[0]["seed"], 6);
    assert_eq!(pngs(&out), names);
    assert_eq!(mtime(&names[0]), before[0]);
    assert_eq!(mtime(&names[2]), before[2]);

    // Everything there: resuming does not even load the model.
    run(&["--seed", "5", "--resume"])
        .assert()
        .success()
        .stdout("")
        .stderr(predicate::str::contains("loading").not())
        .stderr(predicate::str::contains("0 written, 3 skipped"));
}

#[test]
fn shards_split_a_file_with_global_indices_and_no_collisions() {
    let t = tempfile::tempdir().unwrap();
    let prompts: String = (0..5).map(|i| format!("prompt number {i}\n")).collect();
    std::fs::write(t.path().join("p.txt"), prompts).unwrap();
    for k in 0..2 {
        easel(t.path())
            .args(["--steps", "2", "--prompt-file", "p.txt", "--seed", "100"])
            .args(["--out-dir", "sharded", "--shard", &format!("{k}/2")])
            .assert()
            .success();
    }
    easel(t.path())
        .args([
            "--steps",
            "2",
            "--prompt-file",
            "p.txt",
            "--seed",
            "100",
            "--out-dir",
            "whole",
        ])
        .assert()
        .success();
    let whole = pngs(&t.path().join("whole"));
    assert_eq!(whole.len(), 5);
    assert_eq!(pngs(&t.path().join("sharded")), whole);
    assert_eq!(whole[3], "00003-103-prompt-number-3.png");
    for n in &whole {
        assert_eq!(
            pixels(&t.path().join("sharded").join(n)),
            pixels(&t.path().join("whole").join(n))
        );
    }
    easel(t.path())
        .args(["--prompt-file", "p.txt", "--shard", "2/2"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("0-based"));
    easel(t.path())
        .args(["a cat", "--shard", "0/2"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--shard applies to batches"));
}

#[test]
fn num_images_in_a_batch_match_single_runs_seed_for_seed() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("p.txt"), "a castle\na boat\n").unwrap();
    let out = easel(t.path())
        .args([
            "--steps",
            "2",
            "--prompt-file",
            "p.txt",
            "--seed",
            "20",
            "--num-images",
            "2",
        ])
        .args(["--json", "--output-template", "{index}-{image}.png"])
        .assert()
        .success()
        .get_output()
        .clone();
    let seeds: Vec<u64> = json_lines(&out.stdout)
        .iter()
        .map(|l| l["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds, [20, 21, 22, 23]);
    easel(t.path())
        .args(["--steps", "2", "a boat", "--seed", "23", "-o", "single.png"])
        .assert()
        .success();
    assert_eq!(
        pixels(&t.path().join("1-1.png")),
        pixels(&t.path().join("single.png"))
    );
}

#[test]
fn names_from_prompts_and_json_cannot_leave_the_out_dir() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("jail")).unwrap();
    easel(&t.path().join("jail"))
        .args([
            "--steps",
            "2",
            "--prompt-file",
            "-",
            "--seed",
            "0",
            "--out-dir",
            "o",
        ])
        .args(["--output-template", "{prompt_slug}.png"])
        .write_stdin("{\"prompt\": \"x\", \"output\": \"../../evil.png\"}\n../../../etc/passwd\n")
        .assert()
        .success();
    assert_eq!(pngs(t.path()), ["jail"]);
    assert_eq!(pngs(&t.path().join("jail")), ["o"]);
    assert_eq!(
        pngs(&t.path().join("jail/o")),
        ["_.._evil.png", "etc-passwd.png"]
    );
}

#[test]
fn from_png_reruns_easels_own_parameters_with_flag_overrides() {
    let t = tempfile::tempdir().unwrap();
    easel(t.path())
        .args([
            "a red fox",
            "-n",
            "blurry, dark",
            "--steps",
            "3",
            "--seed",
            "77",
        ])
        .args(["--scheduler", "euler-a", "--guidance", "6", "-o", "a.png"])
        .assert()
        .success();
    // The model is read from the PNG too.
    Command::cargo_bin("easel")
        .unwrap()
        .current_dir(t.path())
        .env_remove("EASEL_MODEL")
        .args(["--from-png", "a.png", "-o", "b.png", "--json"])
        .assert()
        .success()
        .stdout(predicate::str::contains("\"seed\":77"));
    assert_eq!(
        pixels(&t.path().join("a.png")),
        pixels(&t.path().join("b.png"))
    );
    let strip_version = |s: String| s.rsplit_once(", Version").unwrap().0.to_string();
    assert_eq!(
        strip_version(params(&t.path().join("a.png"))),
        strip_version(params(&t.path().join("b.png")))
    );
    easel(t.path())
        .args(["--from-png", "a.png", "-o", "c.png", "--steps", "2"])
        .assert()
        .success();
    let c = params(&t.path().join("c.png"));
    assert!(c.starts_with("a red fox\nNegative prompt: blurry, dark\nSteps: 2, Sampler: Euler a, CFG scale: 6, Seed: 77"), "{c}");
    easel(t.path())
        .args(["--from-png", "p.txt"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot open"));
}

/// A seed reproduces an image only in the dtype it was made in, so `--from-png` applies the
/// recorded `Dtype` unless `--dtype` says otherwise.
#[test]
fn from_png_reruns_in_the_recorded_dtype() {
    let t = tempfile::tempdir().unwrap();
    easel(t.path())
        .args([
            "a red fox",
            "--steps",
            "2",
            "--seed",
            "5",
            "--dtype",
            "bf16",
        ])
        .args(["-o", "a.png"])
        .assert()
        .success();
    assert!(params(&t.path().join("a.png")).contains("Dtype: bf16"));
    easel(t.path())
        .args(["--from-png", "a.png", "-o", "b.png"])
        .assert()
        .success();
    assert!(params(&t.path().join("b.png")).contains("Dtype: bf16"));
    assert_eq!(
        pixels(&t.path().join("a.png")),
        pixels(&t.path().join("b.png"))
    );
    easel(t.path())
        .args(["--from-png", "a.png", "-o", "c.png", "--dtype", "f32"])
        .assert()
        .success();
    assert!(params(&t.path().join("c.png")).contains("Dtype: f32"));
}

#[test]
fn from_png_reads_automatic1111_parameters() {
    let t = tempfile::tempdir().unwrap();
    let text = "a castle, on a hill\nat dusk\nNegative prompt: ugly, bad\nworst\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 32x32, Model hash: abc, Model: v1-5-pruned, Lora hashes: \"a: 1, b: 2\", Version: v1.9.4";
    {
        let f = std::fs::File::create(t.path().join("a1111.png")).unwrap();
        let mut enc = png::Encoder::new(f, 8, 8);
        enc.set_color(png::ColorType::Rgb);
        enc.add_text_chunk("parameters".into(), text.into())
            .unwrap();
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[0; 8 * 8 * 3]).unwrap();
    }
    easel(t.path())
        .args(["--from-png", "a1111.png", "-o", "out.png"])
        .assert()
        .success();
    let p = params(&t.path().join("out.png"));
    assert!(
        p.starts_with("a castle, on a hill\nat dusk\nNegative prompt: ugly, bad\nworst\nSteps: 2, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, Size: 32x32"),
        "{p}"
    );
}

#[cfg(unix)]
#[test]
fn sigint_keeps_finished_images_and_leaves_no_partial_files() {
    let t = tempfile::tempdir().unwrap();
    let prompts: String = (0..400).map(|i| format!("prompt {i}\n")).collect();
    std::fs::write(t.path().join("p.txt"), prompts).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("easel");
    let child = std::process::Command::new(bin)
        .current_dir(t.path())
        .arg("--model")
        .arg(model())
        .args([
            "--steps",
            "20",
            "--prompt-file",
            "p.txt",
            "--seed",
            "0",
            "--out-dir",
            "o",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = t.path().join("o");
    let start = std::time::Instant::now();
    while !(out.is_dir()
        && pngs(&out)
            .iter()
            .any(|n| n.ends_with(".png") && !n.starts_with('.')))
    {
        assert!(start.elapsed().as_secs() < 120, "no image appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ok = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains(
            "not made (interrupted); to finish, rerun the same command with --seed 0 --resume"
        ),
        "{stderr}"
    );
    let names = pngs(&out);
    assert!(!names.is_empty() && names.len() < 400, "{}", names.len());
    for n in &names {
        assert!(!n.starts_with('.') && n.ends_with(".png"), "leftover {n}");
        assert_eq!(pixels(&out.join(n)).len(), 32 * 32 * 3);
    }
}
