//! The `easel` command: argument parsing, progress display and file output around the
//! library's pipeline.

use anyhow::{Context, Result};
use clap::Parser;
use easel::device::{device_name, select_device, select_dtype, DTypeChoice, DeviceChoice};
use easel::output::{check_writable, write_png};
use easel::pipeline::{GenerationRequest, Pipeline, Progress};
use easel::scheduler::SchedulerKind;
use easel::weights::{ModelSpec, DEFAULT_MODEL};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

const EXAMPLES: &str = "\
Examples:
  easel \"a landscape with mountains and a river\"
  easel \"a red fox in snow\" --seed 42 --steps 30 -o fox.png
  easel \"portrait of a cat\" -n \"blurry, low quality\" --guidance 9 --num-images 4
  easel \"a castle\" --scheduler ddim --width 768 --height 512
  easel --model ./my-sd15-folder \"a lighthouse at dusk\"
  easel --model tests/fixtures/tiny-a --steps 2 \"a cat\"     # seconds, no download (CI smoke test)

Models come from the Hugging Face hub (cached in HF_HOME/hub; HF_HUB_OFFLINE=1 uses the
cache only, HF_TOKEN authenticates) or from a local folder in the diffusers layout.";

/// Stable Diffusion text-to-image from the terminal.
#[derive(Parser, Debug)]
#[command(name = "easel", version, about, after_help = EXAMPLES)]
struct Cli {
    /// What to draw.
    #[arg(required_unless_present = "list_schedulers")]
    prompt: Option<String>,

    /// What to steer away from.
    #[arg(short = 'n', long, default_value = "")]
    negative_prompt: String,

    /// Seed for the initial noise (random when absent; always printed and recorded).
    #[arg(short, long)]
    seed: Option<u64>,

    /// Denoising steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,

    /// Classifier-free guidance scale (1 turns guidance off).
    #[arg(short, long, default_value_t = 7.5)]
    guidance: f64,

    /// Image width in pixels, a multiple of 8 [default: the model's, 512 for SD 1.x].
    #[arg(short = 'W', long)]
    width: Option<usize>,

    /// Image height in pixels, a multiple of 8 [default: the model's, 512 for SD 1.x].
    #[arg(short = 'H', long)]
    height: Option<usize>,

    /// Output PNG; `{seed}` and `{index}` are replaced. With several images and neither
    /// placeholder, `-{seed}` is added before the extension.
    #[arg(short, long, default_value = "easel-{seed}.png")]
    output: String,

    /// Replace existing output files.
    #[arg(long)]
    overwrite: bool,

    /// Images to make, with seeds seed, seed+1, …
    #[arg(long, default_value_t = 1)]
    num_images: usize,

    /// Sampler [default: the one in the model's scheduler_config.json].
    #[arg(long)]
    scheduler: Option<String>,

    /// List the samplers and exit.
    #[arg(long)]
    list_schedulers: bool,

    /// DDIM eta (0 deterministic, 1 DDPM-like).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,

    /// Hub repo id or local folder in the diffusers layout.
    #[arg(short, long, env = "EASEL_MODEL", default_value = DEFAULT_MODEL)]
    model: String,

    /// Hub revision (branch, tag or commit).
    #[arg(long, default_value = "main")]
    revision: String,

    /// auto, cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,

    /// auto (f16 on GPU, f32 on CPU), f32, f16, bf16.
    #[arg(long, default_value = "auto")]
    dtype: DTypeChoice,

    /// No progress bar or status lines; errors are still printed.
    #[arg(short, long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The output path of one image.
fn output_path(template: &str, seed: u64, index: usize, count: usize) -> PathBuf {
    let mut s = template
        .replace("{seed}", &seed.to_string())
        .replace("{index}", &index.to_string());
    if count > 1 && !template.contains("{seed}") && !template.contains("{index}") {
        let p = Path::new(template);
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ext = p
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        let name = format!("{stem}-{seed}{ext}");
        s = p.with_file_name(name).to_string_lossy().into_owned();
    }
    PathBuf::from(s)
}

fn run(cli: Cli) -> Result<()> {
    if cli.list_schedulers {
        print!("{}", easel::scheduler::help_table());
        return Ok(());
    }
    let prompt = cli.prompt.clone().unwrap_or_default();
    let scheduler = cli
        .scheduler
        .as_deref()
        .map(SchedulerKind::parse)
        .transpose()?;
    let status = |msg: &str| {
        if !cli.quiet {
            eprintln!("{msg}");
        }
    };

    let device = select_device(cli.device)?;
    let dtype = select_dtype(cli.dtype, &device)?;
    let seed = cli.seed.unwrap_or_else(easel::rng::random_seed);
    // Fail on unwritable outputs before any download or compute.
    let paths: Vec<PathBuf> = (0..cli.num_images)
        .map(|i| output_path(&cli.output, seed.wrapping_add(i as u64), i, cli.num_images))
        .collect();
    for p in &paths {
        check_writable(p, cli.overwrite)?;
    }

    let t0 = Instant::now();
    status(&format!(
        "loading {} on {} ({dtype:?})",
        cli.model,
        device_name(&device)
    ));
    let spec = ModelSpec {
        model: cli.model.clone(),
        revision: cli.revision.clone(),
        prefer_fp16: dtype == candle_core::DType::F16,
    };
    let files = spec.resolve()?;
    let pipeline = Pipeline::load(&files, &device, dtype)?;
    status(&format!("loaded in {:.1}s", t0.elapsed().as_secs_f64()));

    let mut req = GenerationRequest::new(prompt, &pipeline);
    req.negative_prompt = cli.negative_prompt.clone();
    req.steps = cli.steps;
    req.guidance = cli.guidance;
    req.seed = seed;
    req.num_images = cli.num_images;
    req.scheduler = scheduler;
    req.eta = cli.eta;
    if let Some(w) = cli.width {
        req.width = w;
    }
    if let Some(h) = cli.height {
        req.height = h;
    }
    pipeline.validate(&req)?;

    let show_bar = !cli.quiet && std::io::stderr().is_terminal();
    let bar = ProgressBar::with_draw_target(
        None,
        if show_bar {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} steps {elapsed_precise} ({per_sec}) {msg}",
        )
        .context("progress template")?
        .progress_chars("=> "),
    );
    let quiet = cli.quiet;
    let mut progress = |p: Progress| match p {
        Progress::Warning(w) => bar.suspend(|| eprintln!("warning: {w}")),
        Progress::ImageStarted { index, count, seed } => {
            bar.reset();
            bar.set_prefix(format!("image {}/{count} seed {seed}", index + 1));
            bar.set_message("");
        }
        Progress::Step { step, total } => {
            bar.set_length(total as u64);
            bar.set_position(step as u64);
        }
        Progress::Decoding => bar.set_message("decoding"),
    };
    let mut written = 0;
    pipeline.generate_each(&req, &mut progress, &mut |image| {
        let path = &paths[written];
        write_png(path, &image, cli.overwrite)?;
        written += 1;
        if !quiet {
            bar.suspend(|| {
                eprintln!(
                    "wrote {} (seed {}, {:.1}s)",
                    path.display(),
                    image.metadata.seed,
                    image.seconds
                )
            });
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    Ok(())
}
