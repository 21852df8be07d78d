//! The `easel` command: argument parsing, progress display and file output around the
//! library's pipeline.

use anyhow::{bail, Context, Result};
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use easel::batch::{
    image_record, parse_prompt_file, plan_batch, plan_single, BatchOptions, ItemPlan,
    OutputTemplate, PlannedItem, Shard, DEFAULT_TEMPLATE,
};
use easel::device::{device_name, select_device, select_dtype, DTypeChoice, DeviceChoice};
use easel::output::{check_writable, read_parameters, write_png, PngParameters};
use easel::pipeline::{Cancelled, GenerationRequest, Pipeline, Progress, RequestOverrides};
use easel::scheduler::SchedulerKind;
use easel::weights::{ModelSpec, DEFAULT_MODEL};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// mimalloc rather than glibc's malloc: it reuses freed large buffers instead of unmapping them
/// (see Cargo.toml), so a decode no longer zeroes fresh pages for every layer.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    #[arg(
        required_unless_present_any = ["list_schedulers", "prompt_file", "from_png"],
        conflicts_with = "prompt_file"
    )]
    prompt: Option<String>,

    /// What to steer away from [default: none].
    #[arg(short = 'n', long)]
    negative_prompt: Option<String>,

    /// Seed for the initial noise (random when absent; always printed and recorded). In a
    /// batch, the base seed: item i without its own seed gets seed + i × num-images.
    #[arg(short, long)]
    seed: Option<u64>,

    /// Denoising steps [default: 50].
    #[arg(long)]
    steps: Option<usize>,

    /// Classifier-free guidance scale (1 turns guidance off) [default: 7.5].
    #[arg(short, long)]
    guidance: Option<f64>,

    /// Image width in pixels, a multiple of 8 [default: the model's, 512 for SD 1.x].
    #[arg(short = 'W', long)]
    width: Option<usize>,

    /// Image height in pixels, a multiple of 8 [default: the model's, 512 for SD 1.x].
    #[arg(short = 'H', long)]
    height: Option<usize>,

    /// Output PNG (single prompt and --from-png); `{seed}` and `{index}` are replaced. With
    /// several images and neither placeholder, `-{seed}` is added before the extension.
    #[arg(short, long, default_value = "easel-{seed}.png")]
    output: String,

    /// Replace existing output files.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,

    /// Skip images whose output file already exists (finish an interrupted batch; needs
    /// the same --seed as the first run when lines carry no seeds).
    #[arg(long)]
    resume: bool,

    /// Images to make per prompt, with seeds seed, seed+1, …
    #[arg(long, default_value_t = 1)]
    num_images: usize,

    /// Sampler [default: the one in the model's scheduler_config.json].
    #[arg(long)]
    scheduler: Option<String>,

    /// List the samplers and exit.
    #[arg(long)]
    list_schedulers: bool,

    /// DDIM eta (0 deterministic, 1 DDPM-like) [default: 0].
    #[arg(long)]
    eta: Option<f64>,

    /// Prompts, one per line, or JSON Lines ({"prompt": …, "seed": …, …}); `-` reads stdin.
    /// The model loads once for all of them.
    #[arg(long, value_name = "FILE", conflicts_with = "from_png")]
    prompt_file: Option<String>,

    /// Folder for a prompt file's images (created if missing).
    #[arg(long, value_name = "DIR", default_value = ".")]
    out_dir: PathBuf,

    /// File names for a prompt file's images: {index} (position in the file), {image},
    /// {seed}, {prompt_slug}; e.g. {index:05} zero-pads.
    #[arg(long, default_value = DEFAULT_TEMPLATE)]
    output_template: String,

    /// Run only items K, K+N, K+2N, … of the prompt file (K is 0-based: 0 ≤ K < N), so N
    /// machines can split one file with no coordination.
    #[arg(long, value_name = "K/N")]
    shard: Option<Shard>,

    /// Re-make the image a PNG's `parameters` describe (easel's or AUTOMATIC1111's);
    /// other flags override single fields.
    #[arg(long, value_name = "PNG")]
    from_png: Option<PathBuf>,

    /// Print one JSON object per finished image on stdout (human text stays on stderr).
    #[arg(long)]
    json: bool,

    /// Hub repo id or local folder in the diffusers layout (--from-png: unless given, the
    /// model an easel PNG names).
    #[arg(short, long, env = "EASEL_MODEL", default_value = DEFAULT_MODEL)]
    model: String,

    /// Whether --model (or EASEL_MODEL) was given rather than defaulted.
    #[arg(skip)]
    model_given: bool,

    /// Hub revision (branch, tag or commit).
    #[arg(long, default_value = "main")]
    revision: String,

    /// auto, cpu, cuda, cuda:N, metal.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,

    /// auto (f16 on GPU, f32 on CPU), f32, f16, bf16. bf16 on the CPU keeps the weights in bf16
    /// (half the memory) and the activations in f32. [default: auto, or with --from-png the
    /// PNG's recorded Dtype]
    #[arg(long)]
    dtype: Option<DTypeChoice>,

    /// No progress bar or status lines; errors are still printed.
    #[arg(short, long)]
    quiet: bool,
}

/// How a run ended, for the exit status.
#[derive(Debug, PartialEq)]
enum Outcome {
    Done,
    SomeFailed,
    Interrupted,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let given = |id: &str| {
        matches
            .value_source(id)
            .is_some_and(|s| s != ValueSource::DefaultValue)
    };
    cli.model_given = given("model");
    // Checked here: clap waives `requires` when a conflicting argument is present.
    for (id, flag) in [
        ("out_dir", "--out-dir"),
        ("output_template", "--output-template"),
        ("shard", "--shard"),
    ] {
        if given(id) && cli.prompt_file.is_none() {
            Cli::command()
                .error(
                    ErrorKind::MissingRequiredArgument,
                    format!("{flag} applies to batches: it needs --prompt-file"),
                )
                .exit();
        }
    }
    match run(cli) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::SomeFailed) => ExitCode::from(3),
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line's request fields (None where the user said nothing).
fn cli_overrides(cli: &Cli) -> Result<RequestOverrides> {
    Ok(RequestOverrides {
        prompt: cli.prompt.clone(),
        negative_prompt: cli.negative_prompt.clone(),
        seed: cli.seed,
        steps: cli.steps,
        guidance: cli.guidance,
        width: cli.width,
        height: cli.height,
        scheduler: cli
            .scheduler
            .as_deref()
            .map(SchedulerKind::parse)
            .transpose()?,
        eta: cli.eta,
    })
}

fn read_prompt_file(name: &str) -> Result<String> {
    if name == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read prompts from stdin")?;
        return Ok(s);
    }
    std::fs::read_to_string(name).with_context(|| format!("cannot read the prompt file {name}"))
}

fn run(cli: Cli) -> Result<Outcome> {
    if cli.list_schedulers {
        print!("{}", easel::scheduler::help_table());
        return Ok(Outcome::Done);
    }
    if cli.num_images == 0 {
        bail!("num-images must be at least 1");
    }
    let quiet = cli.quiet;
    let status = |msg: &str| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    let mut defaults = cli_overrides(&cli)?;
    let mut model = cli.model_given.then(|| cli.model.clone());
    // The dtype a --from-png PNG records, applied unless --dtype is given.
    let mut recorded_dtype: Option<DTypeChoice> = None;
    let batch = cli.prompt_file.is_some();
    let mut base_seed = None;

    let plan = if let Some(file) = &cli.prompt_file {
        let items = parse_prompt_file(&read_prompt_file(file)?);
        let template = OutputTemplate::parse(&cli.output_template)?;
        let seed = cli.seed.unwrap_or_else(easel::rng::random_seed);
        base_seed = Some(seed);
        let opts = BatchOptions {
            defaults: defaults.clone(),
            base_seed: seed,
            num_images: cli.num_images,
            template,
            out_dir: cli.out_dir.clone(),
            shard: cli.shard,
            resume: cli.resume,
            overwrite: cli.overwrite,
        };
        let plan = plan_batch(&items, &opts, &|p| p.exists());
        if cli.resume && cli.seed.is_none() && plan.seeded_from_base > 0 {
            bail!("--resume needs --seed: lines without a seed take theirs from the base seed, and a new random one would remake everything (the first run printed its base seed)");
        }
        let shard = cli
            .shard
            .map(|s| format!(", shard {}/{}", s.index, s.count))
            .unwrap_or_default();
        status(&format!(
            "batch: {} items in the file{shard}, {} here; base seed {seed}",
            items.len(),
            plan.items.len()
        ));
        plan
    } else if let Some(png) = &cli.from_png {
        let text = read_parameters(png)?.with_context(|| {
            format!("{} has no `parameters` text chunk to re-run", png.display())
        })?;
        let params = PngParameters::parse(&text);
        let recorded = params.to_overrides(defaults.scheduler.is_none())?;
        if model.is_none() {
            match params.get("Model") {
                Some(m) if params.from_easel() => model = Some(m.to_string()),
                Some(m) => status(&format!(
                    "note: the PNG names model {m:?} (not an easel model name); using {DEFAULT_MODEL} unless --model says otherwise"
                )),
                None => {}
            }
        }
        defaults = defaults.or(&recorded);
        defaults.seed = Some(defaults.seed.unwrap_or_else(easel::rng::random_seed));
        // A seed reproduces an image only in the dtype it was made in.
        if cli.dtype.is_none() && params.from_easel() {
            recorded_dtype = params.get("Dtype").and_then(|d| d.parse().ok());
        }
        plan_single(
            &cli.output,
            defaults,
            cli.num_images,
            cli.resume,
            cli.overwrite,
            &|p| p.exists(),
        )
    } else {
        if cli.resume && cli.seed.is_none() {
            bail!("--resume needs --seed (a random seed would name a different file)");
        }
        defaults.seed = Some(cli.seed.unwrap_or_else(easel::rng::random_seed));
        plan_single(
            &cli.output,
            defaults,
            cli.num_images,
            cli.resume,
            cli.overwrite,
            &|p| p.exists(),
        )
    };

    // Refuse before any download or compute: existing outputs and missing folders.
    if let Some(first) = plan.conflicts.first() {
        let more = match plan.conflicts.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        bail!(
            "{} already exists{more}; pass --overwrite to replace it{}",
            first.display(),
            if batch { " or --resume to skip it" } else { "" }
        );
    }
    if batch {
        std::fs::create_dir_all(&cli.out_dir)
            .with_context(|| format!("cannot create {}", cli.out_dir.display()))?;
    }
    for image in plan.ready().flat_map(|i| &i.images).filter(|i| !i.skip) {
        check_writable(&image.path, cli.overwrite)?;
    }

    let mut tally = Tally {
        base_seed,
        ..Tally::default()
    };
    for item in &plan.items {
        if let ItemPlan::Failed { index, line, error } = item {
            eprintln!("error: item {index} (line {line}): {error}");
            tally.failed += 1;
        }
    }
    for image in plan.ready().flat_map(|i| &i.images).filter(|i| i.skip) {
        status(&format!("skipped {} (exists)", image.path.display()));
        tally.skipped += 1;
    }
    if plan.images_to_make() == 0 {
        return Ok(tally.finish(batch, &status, false));
    }

    let device = select_device(cli.device)?;
    let choice = match (cli.dtype, recorded_dtype) {
        (Some(c), _) => c,
        // f16 was a GPU's choice; on the CPU, auto (f32) is the practical one.
        (None, Some(DTypeChoice::F16)) if device.is_cpu() => {
            status("note: the PNG was made in f16 (on a GPU); running f32 on the CPU, so the image will differ slightly (--dtype f16 forces it)");
            DTypeChoice::Auto
        }
        (None, Some(r)) => r,
        (None, None) => DTypeChoice::Auto,
    };
    let dtype = select_dtype(choice, &device)?;
    let model = model.unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let t0 = Instant::now();
    let precision = if device.is_cpu() && dtype == candle_core::DType::BF16 {
        "bf16 weights, f32 activations"
    } else {
        easel::device::dtype_name(dtype)
    };
    status(&format!(
        "loading {model} on {} ({precision})",
        device_name(&device)
    ));
    let spec = ModelSpec {
        model: model.clone(),
        revision: cli.revision.clone(),
        prefer_fp16: dtype == candle_core::DType::F16,
    };
    let files = spec.resolve()?;
    let to_make = plan
        .ready()
        .flat_map(|i| &i.images)
        .filter(|i| !i.skip)
        .count();
    // One image: each model is in memory only while it works (the UNet and VAE load when
    // first needed, each is freed once done); batches keep them for every item.
    let pipeline = if to_make == 1 {
        Pipeline::load_for_one_image(&files, &device, dtype)?
    } else {
        Pipeline::load(&files, &device, dtype)?
    };
    status(&format!("loaded in {:.1}s", t0.elapsed().as_secs_f64()));

    // First Ctrl-C: drop the image in flight, keep finished ones, stop. Second: quit now.
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let cancel = cancel.clone();
        ctrlc::set_handler(move || {
            if cancel.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: stopping after cleaning up (Ctrl-C again to quit now)");
        })
        .context("cannot install the Ctrl-C handler")?;
    }

    let bar = progress_bar(!quiet && std::io::stderr().is_terminal())?;
    let total_items = plan.ready().count();
    for (n, item) in plan.ready().enumerate() {
        if cancel.load(Ordering::SeqCst) {
            break;
        }
        let result = run_item(
            &cli,
            &pipeline,
            item,
            &cancel,
            &bar,
            &mut tally,
            n,
            total_items,
        );
        match result {
            Ok(()) => {}
            Err(e) if e.is::<Cancelled>() => break,
            Err(e) if !batch => {
                bar.finish_and_clear();
                return Err(e);
            }
            Err(e) => {
                bar.suspend(|| eprintln!("error: item {} (line {}): {e:#}", item.index, item.line));
                tally.failed += 1;
            }
        }
    }
    bar.finish_and_clear();
    let interrupted = cancel.load(Ordering::SeqCst);
    if interrupted {
        tally.not_done = plan.images_to_make() - tally.written;
    }
    Ok(tally.finish(batch, &status, interrupted))
}

/// Counts for the closing summary.
#[derive(Default)]
struct Tally {
    written: usize,
    skipped: usize,
    failed: usize,
    not_done: usize,
    /// A batch's base seed, for the resume hint.
    base_seed: Option<u64>,
}

impl Tally {
    fn finish(&self, batch: bool, status: &dyn Fn(&str), interrupted: bool) -> Outcome {
        if batch || interrupted {
            let mut s = format!(
                "summary: {} written, {} skipped (already there), {} failed",
                self.written, self.skipped, self.failed
            );
            if interrupted {
                s.push_str(&format!(", {} not made (interrupted)", self.not_done));
                if let Some(seed) = self.base_seed {
                    s.push_str(&format!(
                        "; to finish, rerun the same command with --seed {seed} --resume"
                    ));
                }
            }
            // The summary goes out even with --quiet when something went wrong.
            if self.failed > 0 || interrupted {
                eprintln!("{s}");
            } else {
                status(&s);
            }
        }
        if interrupted {
            Outcome::Interrupted
        } else if self.failed > 0 {
            Outcome::SomeFailed
        } else {
            Outcome::Done
        }
    }
}

fn progress_bar(show: bool) -> Result<ProgressBar> {
    let bar = ProgressBar::with_draw_target(
        None,
        if show {
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
    Ok(bar)
}

/// Makes and writes the images of one item that are not already there.
#[allow(clippy::too_many_arguments)]
fn run_item(
    cli: &Cli,
    pipeline: &Pipeline,
    item: &PlannedItem,
    cancel: &AtomicBool,
    bar: &ProgressBar,
    tally: &mut Tally,
    n: usize,
    total_items: usize,
) -> Result<()> {
    let mut req = GenerationRequest::new(String::new(), pipeline);
    item.overrides.apply(&mut req);
    pipeline.validate(&req)?;
    let count = item.images.len();
    for image in item.images.iter().filter(|i| !i.skip) {
        req.seed = image.seed;
        req.num_images = 1;
        let prefix = if total_items > 1 {
            format!("[{}/{total_items}] ", n + 1)
        } else {
            String::new()
        };
        let mut progress = |p: Progress| match p {
            Progress::Warning(w) => bar.suspend(|| eprintln!("warning: {w}")),
            Progress::ImageStarted { seed, .. } => {
                bar.reset();
                bar.set_prefix(format!(
                    "{prefix}image {}/{count} seed {seed}",
                    image.image + 1
                ));
                bar.set_message("");
            }
            Progress::Step { step, total } => {
                if step == 1 {
                    bar.set_message("");
                }
                bar.set_length(total as u64);
                bar.set_position(step as u64);
            }
            Progress::Decoding => bar.set_message("decoding"),
            Progress::Loading(what) => bar.set_message(format!("loading the {what}")),
        };
        pipeline.generate_each_cancellable(&req, cancel, &mut progress, &mut |img| {
            write_png(&image.path, &img, cli.overwrite)?;
            tally.written += 1;
            if cli.json {
                let line = image_record(&image.path, item.index, image.image, &img);
                println!("{line}");
            }
            if !cli.quiet {
                bar.suspend(|| {
                    eprintln!(
                        "wrote {} (seed {}, {:.1}s)",
                        image.path.display(),
                        img.metadata.seed,
                        img.seconds
                    )
                });
            }
            Ok(())
        })?;
    }
    Ok(())
}
