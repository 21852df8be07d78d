//! The library's cancel path and per-image seeds, on the tiny fixture model.

mod common;

use easel::output::write_png;
use easel::pipeline::{Cancelled, GenerationRequest, Progress};
use std::sync::atomic::{AtomicBool, Ordering};

#[test]
fn cancel_flag_drops_the_image_in_flight_and_keeps_finished_ones() {
    let p = common::load_pipeline("tiny-a");
    let dir = tempfile::tempdir().unwrap();
    let mut req = GenerationRequest::new("a cat", &p);
    req.steps = 3;
    req.num_images = 3;
    req.seed = 7;
    let cancel = AtomicBool::new(false);
    let mut current = 0;
    let mut steps_after_cancel = 0;
    let err = p
        .generate_each_cancellable(
            &req,
            &cancel,
            &mut |ev| match ev {
                Progress::ImageStarted { index, .. } => current = index,
                // Like a Ctrl-C in the middle of the second image.
                Progress::Step { step, .. } => {
                    if cancel.load(Ordering::SeqCst) {
                        steps_after_cancel += 1;
                    }
                    if current == 1 && step == 1 {
                        cancel.store(true, Ordering::SeqCst);
                    }
                }
                _ => {}
            },
            &mut |img| {
                let path = dir.path().join(format!("{}.png", img.metadata.seed));
                write_png(&path, &img, false)
            },
        )
        .unwrap_err();
    assert!(err.is::<Cancelled>(), "{err:#}");
    assert_eq!(steps_after_cancel, 0, "no step runs once the flag is set");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["7.png"],
        "only the finished image, no partial files"
    );
    assert!(easel::output::read_parameters(&dir.path().join("7.png"))
        .unwrap()
        .unwrap()
        .contains("Seed: 7"));
}

#[test]
fn cancel_before_start_makes_nothing() {
    let p = common::load_pipeline("tiny-a");
    let mut req = GenerationRequest::new("a cat", &p);
    req.steps = 2;
    let cancel = AtomicBool::new(true);
    let err = p
        .generate_each_cancellable(&req, &cancel, &mut |_| {}, &mut |_| {
            panic!("nothing may reach the sink")
        })
        .unwrap_err();
    assert!(err.is::<Cancelled>());
}

#[test]
fn num_images_use_consecutive_seeds() {
    let p = common::load_pipeline("tiny-a");
    let mut req = GenerationRequest::new("a lighthouse", &p);
    req.steps = 2;
    req.seed = 41;
    req.num_images = 2;
    let both = p.generate(&req, &mut |_| {}).unwrap();
    req.seed = 42;
    req.num_images = 1;
    let second = p.generate(&req, &mut |_| {}).unwrap();
    assert_eq!(both[0].metadata.seed, 41);
    assert_eq!(both[1].metadata.seed, 42);
    assert_eq!(both[1].rgb, second[0].rgb);
    assert_ne!(both[0].rgb, both[1].rgb);
}
