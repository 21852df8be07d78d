//! Every sampler against HF diffusers, step for step. The fixtures come from
//! `scripts/make_scheduler_fixtures.py`: for each case, diffusers' timesteps, initial noise
//! scale, and per step the scaled UNet input, the (fake) UNet output and the latents after
//! `step`, plus every noise tensor the scheduler drew. Here easel runs the same loop on its
//! own latents, replaying the recorded UNet outputs and noise, and must stay within 1e-5
//! relative (max |easel - diffusers| / max |diffusers| per tensor) over the whole trajectory.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use easel::rng::NoiseSource;
use easel::scheduler::{help_table, SchedulerConfig, SchedulerKind};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schedulers");
const TOLERANCE: f64 = 1e-5;

/// Hands out diffusers' recorded noise tensors in the order they were drawn.
struct Replay {
    draws: VecDeque<Tensor>,
    error: Option<String>,
}

impl NoiseSource for Replay {
    fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        match self.draws.pop_front() {
            Some(t) if t.dims() == shape => t.flatten_all().and_then(|t| t.to_vec1()).unwrap(),
            Some(t) => {
                self.error = Some(format!(
                    "noise shape {shape:?}, diffusers drew {:?}",
                    t.dims()
                ));
                vec![0.0; n]
            }
            None => {
                self.error = Some("drew more noise than diffusers".into());
                vec![0.0; n]
            }
        }
    }
}

fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64> {
    let g: Vec<f32> = got.flatten_all()?.to_vec1()?;
    let w: Vec<f32> = want.flatten_all()?.to_vec1()?;
    if g.len() != w.len() {
        bail!("shape mismatch {:?} vs {:?}", got.dims(), want.dims());
    }
    let diff = g
        .iter()
        .zip(&w)
        .map(|(a, b)| f64::from(a - b).abs())
        .fold(0.0, f64::max);
    let scale = w
        .iter()
        .map(|b| f64::from(*b).abs())
        .fold(0.0, f64::max)
        .max(1e-30);
    if g.iter().any(|x| !x.is_finite()) {
        return Ok(f64::INFINITY);
    }
    Ok(diff / scale)
}

struct Case {
    id: String,
    kind: String,
    label: String,
    steps: usize,
    eta: f64,
    config: SchedulerConfig,
    init_noise_sigma: f64,
    scales_input: bool,
    noise_draws: usize,
}

fn load_cases() -> Result<(Vec<Case>, HashMap<String, Tensor>)> {
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{FIXTURES}/index.json"))?)?;
    let tensors =
        candle_core::safetensors::load(format!("{FIXTURES}/cases.safetensors"), &Device::Cpu)?;
    let base = index["base_config"]
        .as_object()
        .context("base_config")?
        .clone();
    let mut cases = Vec::new();
    for c in index["cases"].as_array().context("cases")? {
        let extra = c["config_extra"].as_object().context("config_extra")?;
        let mut config = base.clone();
        config.extend(extra.clone());
        let mut label = c["scheduler"].as_str().unwrap().to_string();
        for (k, v) in extra {
            label.push_str(&format!(" {k}={v}"));
        }
        let eta = c["eta"].as_f64().unwrap();
        if eta != 0.0 {
            label.push_str(&format!(" eta={eta}"));
        }
        cases.push(Case {
            id: c["id"].as_str().unwrap().to_string(),
            kind: c["scheduler"].as_str().unwrap().to_string(),
            label,
            steps: c["steps"].as_u64().unwrap() as usize,
            eta,
            config: SchedulerConfig::from_json(&Value::Object(config).to_string())?,
            init_noise_sigma: c["init_noise_sigma"].as_f64().unwrap(),
            scales_input: c["scales_input"].as_bool().unwrap(),
            noise_draws: c["noise_draws"].as_u64().unwrap() as usize,
        });
    }
    Ok((cases, tensors))
}

fn steps_of(t: &Tensor) -> Result<Vec<Tensor>> {
    Ok((0..t.dim(0)?)
        .map(|i| t.get(i))
        .collect::<candle_core::Result<_>>()?)
}

/// Runs one case; returns the largest relative error seen.
fn run_case(case: &Case, tensors: &HashMap<String, Tensor>) -> Result<f64> {
    let get = |name: &str| tensors.get(&format!("{}.{name}", case.id)).cloned();
    let kind = SchedulerKind::parse(&case.kind)?;
    let mut sched = kind.build(&case.config, case.eta)?;
    sched.set_timesteps(case.steps)?;
    let want_timesteps: Vec<f64> = get("timesteps").context("timesteps")?.to_vec1()?;
    if sched.timesteps() != want_timesteps.as_slice() {
        bail!(
            "timesteps differ:\n easel     {:?}\n diffusers {want_timesteps:?}",
            sched.timesteps()
        );
    }
    let sigma = sched.init_noise_sigma();
    if (sigma as f32) != (case.init_noise_sigma as f32) {
        bail!(
            "init_noise_sigma {sigma} vs diffusers {}",
            case.init_noise_sigma
        );
    }
    let outputs = steps_of(&get("model_output").context("model_output")?)?;
    let latents_want = steps_of(&get("latents").context("latents")?)?;
    let inputs_want = match get("model_input") {
        Some(t) => Some(steps_of(&t)?),
        None => None,
    };
    let mut replay = Replay {
        draws: match get("noise") {
            Some(t) => steps_of(&t)?.into(),
            None => VecDeque::new(),
        },
        error: None,
    };
    let mut latents = get("init").context("init")?;
    let mut worst = 0.0f64;
    let timesteps = sched.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let input = sched.scale_model_input(&latents, t)?;
        match (&inputs_want, case.scales_input) {
            (Some(want), true) => {
                let e = rel_err(&input, &want[i])?;
                worst = worst.max(e);
                if e > TOLERANCE {
                    bail!("step {i} (t={t}): scale_model_input off by {e:e}");
                }
            }
            _ => {
                if rel_err(&input, &latents)? != 0.0 {
                    bail!("step {i}: scale_model_input should be the identity here");
                }
            }
        }
        latents = sched.step(&outputs[i], t, &latents, &mut replay)?;
        if let Some(e) = replay.error.take() {
            bail!("step {i}: {e}");
        }
        let e = rel_err(&latents, &latents_want[i])?;
        if std::env::var("EASEL_DEBUG_CASE").ok().as_deref() == Some(case.id.as_str()) {
            eprintln!("{} step {i} t={t} err {e:e}", case.id);
        }
        worst = worst.max(e);
        if e > TOLERANCE {
            bail!("step {i} (t={t}): latents off by {e:e}");
        }
    }
    if !replay.draws.is_empty() {
        bail!(
            "drew {} noise tensors, diffusers drew {}",
            case.noise_draws - replay.draws.len(),
            case.noise_draws
        );
    }
    Ok(worst)
}

#[test]
fn every_scheduler_matches_diffusers_step_for_step() -> Result<()> {
    let (cases, tensors) = load_cases()?;
    let mut worst: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut failures = Vec::new();
    for case in &cases {
        match run_case(case, &tensors) {
            Ok(e) => {
                let entry = worst.entry(case.label.clone()).or_insert((0.0, 0));
                entry.0 = entry.0.max(e);
                entry.1 += 1;
            }
            Err(e) => failures.push(format!(
                "{} ({}, {} steps): {e:#}",
                case.id, case.label, case.steps
            )),
        }
    }
    println!("max relative error vs diffusers, per scheduler/config (cases):");
    for (label, (e, n)) in &worst {
        println!("  {label:<55} {e:.2e}  ({n})");
    }
    // Every kind must have been exercised.
    for kind in SchedulerKind::ALL {
        assert!(
            worst.contains_key(kind.name()),
            "no passing fixture for {}",
            kind.name()
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}

fn sd14() -> SchedulerConfig {
    SchedulerConfig::from_json(
        r#"{"_class_name":"PNDMScheduler","beta_start":0.00085,"beta_end":0.012,"beta_schedule":"scaled_linear",
            "num_train_timesteps":1000,"set_alpha_to_one":false,"skip_prk_steps":true,"steps_offset":1,
            "trained_betas":null,"clip_sample":false}"#,
    )
    .unwrap()
}

#[test]
fn names_and_aliases_parse() {
    let cases = [
        ("pndm", SchedulerKind::Pndm),
        ("PLMS", SchedulerKind::Pndm),
        ("PNDMScheduler", SchedulerKind::Pndm),
        ("ddim", SchedulerKind::Ddim),
        ("Euler", SchedulerKind::Euler),
        ("euler a", SchedulerKind::EulerAncestral),
        ("Euler a", SchedulerKind::EulerAncestral),
        (
            "EulerAncestralDiscreteScheduler",
            SchedulerKind::EulerAncestral,
        ),
        ("heun", SchedulerKind::Heun),
        ("DPM++ 2M", SchedulerKind::DpmPp2m),
        ("dpmsolvermultistepscheduler", SchedulerKind::DpmPp2m),
        ("DPM++ 2M Karras", SchedulerKind::DpmPp2mKarras),
        ("dpm++2m-sde", SchedulerKind::DpmPp2mSde),
        ("DPM++ 2M SDE", SchedulerKind::DpmPp2mSde),
        ("LMSDiscreteScheduler", SchedulerKind::Lms),
        (" UniPC ", SchedulerKind::UniPc),
        ("LCMScheduler", SchedulerKind::Lcm),
    ];
    for (name, kind) in cases {
        assert_eq!(SchedulerKind::parse(name).unwrap(), kind, "{name}");
    }
    for &kind in SchedulerKind::ALL {
        assert_eq!(SchedulerKind::parse(kind.name()).unwrap(), kind);
        assert_eq!(SchedulerKind::parse(kind.a1111_name()).unwrap(), kind);
        assert!(help_table().contains(kind.name()) && help_table().contains(kind.a1111_name()));
    }
}

#[test]
fn unknown_name_lists_the_valid_ones() {
    let err = SchedulerKind::parse("k_dpm_fast").unwrap_err().to_string();
    for &kind in SchedulerKind::ALL {
        assert!(err.contains(kind.name()), "{err}");
    }
}

#[test]
fn from_config_picks_the_models_class() {
    assert_eq!(
        SchedulerKind::from_config(&sd14()).unwrap(),
        SchedulerKind::Pndm
    );
    let mut c = sd14();
    c.class_name = Some("EulerDiscreteScheduler".into());
    assert_eq!(
        SchedulerKind::from_config(&c).unwrap(),
        SchedulerKind::Euler
    );
    c.class_name = Some("DPMSolverMultistepScheduler".into());
    c.use_karras_sigmas = Some(true);
    assert_eq!(
        SchedulerKind::from_config(&c).unwrap(),
        SchedulerKind::DpmPp2mKarras
    );
    c.class_name = Some("KDPM2DiscreteScheduler".into());
    let err = SchedulerKind::from_config(&c).unwrap_err().to_string();
    assert!(
        err.contains("KDPM2DiscreteScheduler") && err.contains("--scheduler"),
        "{err}"
    );
}

#[test]
fn impossible_step_counts_are_errors() {
    let config = sd14();
    for &kind in SchedulerKind::ALL {
        let mut s = kind.build(&config, 0.0).unwrap();
        let err = s.set_timesteps(0).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{kind:?}: {err}");
        let err = s.set_timesteps(1001).unwrap_err().to_string();
        assert!(err.contains("1000"), "{kind:?}: {err}");
        // One step works everywhere (diffusers does it too; the fixtures check the values).
        s.set_timesteps(1).unwrap();
        assert!(!s.timesteps().is_empty());
    }
    // Where diffusers crashes (PNDM/DDIM: timestep 1000 with steps_offset 1) or returns NaN
    // (multistep solvers: repeated timesteps), easel says why instead.
    for (kind, steps) in [
        (SchedulerKind::Pndm, 1000),
        (SchedulerKind::Ddim, 1000),
        (SchedulerKind::DpmPp2m, 1000),
        (SchedulerKind::DpmPp2mSde, 1000),
        (SchedulerKind::UniPc, 1000),
        (SchedulerKind::Lcm, 51),
    ] {
        let mut s = kind.build(&config, 0.0).unwrap();
        let err = s.set_timesteps(steps).unwrap_err().to_string();
        assert!(!err.is_empty(), "{kind:?}");
    }
    // numpy's arange gives trailing spacing a timestep -1 at 61 steps.
    let mut trailing = sd14();
    trailing.timestep_spacing = Some("trailing".into());
    let mut s = SchedulerKind::DpmPp2m.build(&trailing, 0.0).unwrap();
    let err = s.set_timesteps(61).unwrap_err().to_string();
    assert!(err.contains("-1"), "{err}");
    // The largest counts diffusers handles still work.
    for (kind, steps) in [
        (SchedulerKind::DpmPp2m, 999),
        (SchedulerKind::Pndm, 999),
        (SchedulerKind::Euler, 1000),
        (SchedulerKind::Heun, 1000),
        (SchedulerKind::Lcm, 50),
    ] {
        kind.build(&config, 0.0)
            .unwrap()
            .set_timesteps(steps)
            .unwrap();
    }
}

#[test]
fn eta_is_for_ddim_only() {
    assert!(SchedulerKind::Ddim.build(&sd14(), 0.5).is_ok());
    let err = SchedulerKind::Euler
        .build(&sd14(), 0.5)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("eta"), "{err}");
}
