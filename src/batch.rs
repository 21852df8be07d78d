//! Batches from prompt files: parsing, sharding, seeds, output names and resume planning.
//!
//! Everything here is pure (no model, no terminal) so the rules scripts depend on are unit
//! tested: item `index` is the item's position in the whole file (bad lines included), so
//! names and seeds never shift when a line is fixed or when the file is split into shards.

use crate::pipeline::RequestOverrides;
use crate::scheduler::SchedulerKind;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The output name used when `--output-template` is not given.
pub const DEFAULT_TEMPLATE: &str = "{index:05}-{seed}-{prompt_slug}.png";

/// One non-blank, non-comment line of a prompt file.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptItem {
    /// 0-based position among the file's items (the same in every shard).
    pub index: usize,
    /// 1-based line number, for messages.
    pub line: usize,
    /// What the line asks for, or why it cannot be used.
    pub spec: Result<ItemSpec, String>,
}

/// What one prompt-file line sets; unset fields fall back to the command line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemSpec {
    /// Always has `prompt`; may have any other field.
    pub overrides: RequestOverrides,
    /// Output file name (a template like `--output-template`), sanitised before use.
    pub output: Option<String>,
}

/// A JSON Lines object. Unknown keys are errors so that a typo (`"promt"`) is reported
/// instead of silently producing the wrong image.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    prompt: String,
    negative_prompt: Option<String>,
    seed: Option<u64>,
    steps: Option<usize>,
    guidance: Option<f64>,
    width: Option<usize>,
    height: Option<usize>,
    scheduler: Option<String>,
    output: Option<String>,
}

/// Parses a prompt file: one prompt per line, or one JSON object per line (a line starting
/// with `{`); the two may be mixed. Blank lines and lines starting with `#` are skipped. A
/// bad line becomes an item with an error, so the rest of the batch still runs.
pub fn parse_prompt_file(text: &str) -> Vec<PromptItem> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut items = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let spec = if line.starts_with('{') {
            parse_json_line(line)
        } else {
            Ok(ItemSpec {
                overrides: RequestOverrides {
                    prompt: Some(line.to_string()),
                    ..Default::default()
                },
                output: None,
            })
        };
        items.push(PromptItem {
            index: items.len(),
            line: n + 1,
            spec,
        });
    }
    items
}

fn parse_json_line(line: &str) -> Result<ItemSpec, String> {
    let j: JsonLine = serde_json::from_str(line).map_err(|e| format!("bad JSON: {e}"))?;
    let scheduler = j
        .scheduler
        .as_deref()
        .map(SchedulerKind::parse)
        .transpose()
        .map_err(|e| e.to_string())?;
    Ok(ItemSpec {
        overrides: RequestOverrides {
            prompt: Some(j.prompt),
            negative_prompt: j.negative_prompt,
            seed: j.seed,
            steps: j.steps,
            guidance: j.guidance,
            width: j.width,
            height: j.height,
            scheduler,
            eta: None,
        },
        output: j.output,
    })
}

/// `--shard K/N`: this machine takes items whose index is K modulo N. K is 0-based
/// (0 ≤ K < N), matching Kubernetes' JOB_COMPLETION_INDEX and Slurm's usual `--array=0-…`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn contains(&self, item_index: usize) -> bool {
        item_index % self.count == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (k, n) = s
            .split_once('/')
            .with_context(|| format!("--shard wants K/N (e.g. 0/4), got {s:?}"))?;
        let index: usize = k
            .trim()
            .parse()
            .with_context(|| format!("--shard: K in {s:?} is not a number"))?;
        let count: usize = n
            .trim()
            .parse()
            .with_context(|| format!("--shard: N in {s:?} is not a number"))?;
        if count == 0 {
            bail!("--shard: N must be at least 1, got {s:?}");
        }
        if index >= count {
            bail!("--shard: K is 0-based and must be below N (0..{count}), got {s:?}");
        }
        Ok(Self { index, count })
    }
}

/// Seed of image 0 of item `index` when the line sets none: `base + index × num_images`, so
/// every image of a batch gets its own seed, counting up from the base in file order, and a
/// rerun (or another shard) with the same base makes the same images.
pub fn item_seed(base: u64, index: usize, num_images: usize) -> u64 {
    base.wrapping_add((index as u64).wrapping_mul(num_images as u64))
}

/// A parsed output-name template: literal text and `{placeholder}`s. Placeholders:
/// `{index}` (item index in the file), `{image}` (0-based image of the item), `{seed}`,
/// `{prompt_slug}`; numbers take a zero-pad width (`{index:05}`), the slug a maximum
/// length (`{prompt_slug:30}`, default 48). `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Index(usize),
    Image(usize),
    Seed(usize),
    Slug(usize),
}

/// What an output name can be made from.
#[derive(Debug, Clone, Copy)]
pub struct NameFields<'a> {
    pub index: usize,
    pub image: usize,
    pub seed: u64,
    pub prompt: &'a str,
}

impl OutputTemplate {
    pub fn parse(template: &str) -> Result<Self> {
        if template.contains('/') || template.contains('\\') {
            bail!("the output template {template:?} must be a file name; use --out-dir for the folder");
        }
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = template.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut field = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => field.push(c),
                            None => bail!("unclosed {{ in the output template {template:?}"),
                        }
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(parse_placeholder(&field, template)?);
                }
                '}' => bail!("unmatched }} in the output template {template:?} (write }}}} for a literal brace)"),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self { parts })
    }

    /// Whether the name changes from image to image of one item.
    pub fn varies_per_image(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Image(_) | Part::Seed(_)))
    }

    /// The sanitised file name for these fields.
    pub fn render(&self, f: &NameFields) -> String {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => s.push_str(t),
                Part::Index(w) => s.push_str(&format!("{:0w$}", f.index, w = *w)),
                Part::Image(w) => s.push_str(&format!("{:0w$}", f.image, w = *w)),
                Part::Seed(w) => s.push_str(&format!("{:0w$}", f.seed, w = *w)),
                Part::Slug(max) => s.push_str(&slug(f.prompt, *max)),
            }
        }
        sanitize_file_name(&s)
    }
}

fn parse_placeholder(field: &str, template: &str) -> Result<Part> {
    let (name, spec) = match field.split_once(':') {
        Some((n, s)) => (n.trim(), Some(s.trim())),
        None => (field.trim(), None),
    };
    let number = |spec: Option<&str>, default: usize| -> Result<usize> {
        match spec {
            None => Ok(default),
            Some(s) => s.parse().with_context(|| {
                format!(
                    "bad format {s:?} for {{{name}}} in {template:?} (expected a width such as 05)"
                )
            }),
        }
    };
    Ok(match name {
        "index" => Part::Index(number(spec, 0)?),
        "image" => Part::Image(number(spec, 0)?),
        "seed" => Part::Seed(number(spec, 0)?),
        "prompt_slug" => Part::Slug(number(spec, 48)?.max(1)),
        other => bail!(
            "unknown placeholder {{{other}}} in the output template {template:?} (known: index, image, seed, prompt_slug)"
        ),
    })
}

/// A file-name-safe, lower-case form of a prompt: letters and digits kept, every other run
/// of characters one `-`, at most `max` characters; `untitled` when nothing is left.
pub fn slug(prompt: &str, max: usize) -> String {
    let mut s = String::new();
    for c in prompt.chars() {
        if c.is_alphanumeric() {
            s.extend(c.to_lowercase());
        } else if !s.is_empty() && !s.ends_with('-') {
            s.push('-');
        }
    }
    let s: String = s.chars().take(max).collect();
    let s = s.trim_matches('-');
    if s.is_empty() {
        "untitled".into()
    } else {
        s.to_string()
    }
}

/// Makes `name` safe as one file name inside the output folder, whatever a prompt or a
/// JSON `output` field holds: no path separators or `..` (no escaping the folder), no
/// hidden or reserved names, no control characters, at most 200 bytes, ending in `.png`.
pub fn sanitize_file_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| match c {
            '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    s = s
        .trim()
        .trim_start_matches('.')
        .trim_end_matches(['.', ' '])
        .to_string();
    if !s.to_ascii_lowercase().ends_with(".png") {
        s.push_str(".png");
    }
    let (stem, _) = s.split_at(s.len() - 4);
    let mut stem = stem.trim_end_matches(['.', ' ']).to_string();
    if stem.is_empty() {
        stem = "image".into();
    }
    let reserved = [
        "con", "prn", "aux", "nul", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8",
        "com9", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
    ];
    if reserved.contains(&stem.to_ascii_lowercase().as_str()) {
        stem.insert(0, '_');
    }
    const MAX_STEM: usize = 196;
    if stem.len() > MAX_STEM {
        let mut cut = MAX_STEM;
        while !stem.is_char_boundary(cut) {
            cut -= 1;
        }
        stem.truncate(cut);
    }
    format!("{stem}.png")
}

/// Inserts `-{seed}` before the extension: how a fixed name becomes one name per image.
pub fn with_seed_suffix(name: &str, seed: u64) -> String {
    let p = Path::new(name);
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = p
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let file = format!("{stem}-{seed}{ext}");
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(file).to_string_lossy().into_owned(),
        _ => file,
    }
}

/// How a batch is laid out: the command line's part of every item.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Defaults for every item (a line's own fields win). Its `seed` is not used: see
    /// `base_seed`.
    pub defaults: RequestOverrides,
    /// Seeds of items without their own: see [`item_seed`].
    pub base_seed: u64,
    pub num_images: usize,
    pub template: OutputTemplate,
    pub out_dir: PathBuf,
    pub shard: Option<Shard>,
    /// Skip images whose file exists.
    pub resume: bool,
    /// Replace images whose file exists.
    pub overwrite: bool,
}

/// One image to make (or skip).
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedImage {
    /// 0-based image of its item.
    pub image: usize,
    pub seed: u64,
    pub path: PathBuf,
    /// Its file exists and `--resume` was given.
    pub skip: bool,
}

/// A ready item: the request fields (seed = image 0's) and its images.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedItem {
    pub index: usize,
    pub line: usize,
    pub overrides: RequestOverrides,
    pub images: Vec<PlannedImage>,
}

/// An item this machine runs: ready, or failed before any model work.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemPlan {
    Ready(PlannedItem),
    Failed {
        index: usize,
        line: usize,
        error: String,
    },
}

/// The whole batch for this shard.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPlan {
    pub items: Vec<ItemPlan>,
    /// Outputs that exist while neither `--resume` nor `--overwrite` was given: the batch
    /// must not start, so no work is lost and nothing is silently replaced.
    pub conflicts: Vec<PathBuf>,
    /// Items (in this shard) with no seed of their own, which take theirs from the base.
    pub seeded_from_base: usize,
}

impl BatchPlan {
    pub fn images_to_make(&self) -> usize {
        self.ready()
            .flat_map(|i| &i.images)
            .filter(|i| !i.skip)
            .count()
    }
    pub fn images_skipped(&self) -> usize {
        self.ready()
            .flat_map(|i| &i.images)
            .filter(|i| i.skip)
            .count()
    }
    pub fn ready(&self) -> impl Iterator<Item = &PlannedItem> {
        self.items.iter().filter_map(|i| match i {
            ItemPlan::Ready(p) => Some(p),
            ItemPlan::Failed { .. } => None,
        })
    }
}

/// Plans this shard's items: seeds, output paths (unique within the batch), and which
/// images exist already. `exists` is the file-system check (a parameter for tests).
pub fn plan_batch(
    items: &[PromptItem],
    opts: &BatchOptions,
    exists: &dyn Fn(&Path) -> bool,
) -> BatchPlan {
    let mut plan = BatchPlan {
        items: Vec::new(),
        conflicts: Vec::new(),
        seeded_from_base: 0,
    };
    let mut taken: HashMap<PathBuf, usize> = HashMap::new();
    for item in items {
        // Names are worked out for every item, so a clash with another shard's item is
        // found here too; only this shard's items are planned.
        let mine = opts.shard.is_none_or(|s| s.contains(item.index));
        let mut push = |p: ItemPlan| {
            if mine {
                plan.items.push(p);
            }
        };
        let failed = |error: String| ItemPlan::Failed {
            index: item.index,
            line: item.line,
            error,
        };
        let spec = match &item.spec {
            Ok(s) => s,
            Err(e) => {
                push(failed(e.clone()));
                continue;
            }
        };
        let mut overrides = spec.overrides.or(&opts.defaults);
        if mine && spec.overrides.seed.is_none() {
            plan.seeded_from_base += 1;
        }
        let seed0 = spec
            .overrides
            .seed
            .unwrap_or_else(|| item_seed(opts.base_seed, item.index, opts.num_images));
        overrides.seed = Some(seed0);
        // A JSON `output` is a name, not a path: separators are sanitised, not refused.
        let own_template = match spec
            .output
            .as_deref()
            .map(|o| OutputTemplate::parse(&o.replace(['/', '\\'], "_")))
        {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                push(failed(format!("output: {e}")));
                continue;
            }
        };
        let template = own_template.as_ref().unwrap_or(&opts.template);
        let prompt = overrides.prompt.clone().unwrap_or_default();
        let mut images = Vec::new();
        let mut clash = None;
        for image in 0..opts.num_images {
            let seed = seed0.wrapping_add(image as u64);
            let mut name = template.render(&NameFields {
                index: item.index,
                image,
                seed,
                prompt: &prompt,
            });
            if opts.num_images > 1 && !template.varies_per_image() {
                name = sanitize_file_name(&with_seed_suffix(&name, seed));
            }
            let path = opts.out_dir.join(name);
            if let Some(&other) = taken.get(&path) {
                clash = Some(format!(
                    "output {} is also the output of item {other}; make the names differ (e.g. {{index}} in the template)",
                    path.display()
                ));
                break;
            }
            taken.insert(path.clone(), item.index);
            let present = mine && exists(&path);
            if present && !opts.resume && !opts.overwrite {
                plan.conflicts.push(path.clone());
            }
            images.push(PlannedImage {
                image,
                seed,
                skip: present && opts.resume,
                path,
            });
        }
        if let Some(e) = clash {
            push(failed(e));
            continue;
        }
        push(ItemPlan::Ready(PlannedItem {
            index: item.index,
            line: item.line,
            overrides,
            images,
        }));
    }
    plan
}

/// Path of image `image` (seed `seed`) of a single-prompt run named by `-o`: `{seed}` and
/// `{index}` are replaced; with several images and neither, `-{seed}` is added.
pub fn single_output_path(output: &str, seed: u64, image: usize, count: usize) -> PathBuf {
    if count > 1 && !output.contains("{seed}") && !output.contains("{index}") {
        return PathBuf::from(with_seed_suffix(output, seed));
    }
    PathBuf::from(
        output
            .replace("{seed}", &seed.to_string())
            .replace("{index}", &image.to_string()),
    )
}

/// A one-item plan for a single prompt (or `--from-png`), named by `-o`. `overrides.seed`
/// is image 0's seed. The `-o` path is the user's own, so it is not sanitised.
pub fn plan_single(
    output: &str,
    overrides: RequestOverrides,
    num_images: usize,
    resume: bool,
    overwrite: bool,
    exists: &dyn Fn(&Path) -> bool,
) -> BatchPlan {
    let seed0 = overrides.seed.unwrap_or(0);
    let mut conflicts = Vec::new();
    let images = (0..num_images)
        .map(|image| {
            let seed = seed0.wrapping_add(image as u64);
            let path = single_output_path(output, seed, image, num_images);
            let present = exists(&path);
            if present && !resume && !overwrite {
                conflicts.push(path.clone());
            }
            PlannedImage {
                image,
                seed,
                skip: present && resume,
                path,
            }
        })
        .collect();
    BatchPlan {
        items: vec![ItemPlan::Ready(PlannedItem {
            index: 0,
            line: 0,
            overrides,
            images,
        })],
        conflicts,
        seeded_from_base: 0,
    }
}

/// The `--json` line for a finished image: what made it and where it is, so scripts need
/// not parse the human messages.
pub fn image_record(
    path: &Path,
    index: usize,
    image: usize,
    img: &crate::pipeline::GeneratedImage,
) -> serde_json::Value {
    let m = &img.metadata;
    serde_json::json!({
        "path": path,
        "index": index,
        "image": image,
        "prompt": m.prompt,
        "negative_prompt": m.negative_prompt,
        "seed": m.seed,
        "steps": m.steps,
        "sampler": m.sampler.name(),
        "guidance": m.guidance,
        "width": m.width,
        "height": m.height,
        "model": m.model,
        "dtype": m.dtype,
        "seconds": img.seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BatchOptions {
        BatchOptions {
            defaults: RequestOverrides {
                steps: Some(3),
                ..Default::default()
            },
            base_seed: 100,
            num_images: 1,
            template: OutputTemplate::parse(DEFAULT_TEMPLATE).unwrap(),
            out_dir: PathBuf::from("out"),
            shard: None,
            resume: false,
            overwrite: false,
        }
    }

    fn ready(plan: &BatchPlan) -> Vec<&PlannedItem> {
        plan.ready().collect()
    }

    #[test]
    fn plain_text_skips_blank_lines_and_comments() {
        let items = parse_prompt_file("\u{feff}a cat\n\n  # comment\n  a dog  \r\n#x\nlast");
        let prompts: Vec<_> = items
            .iter()
            .map(|i| i.spec.as_ref().unwrap().overrides.prompt.clone().unwrap())
            .collect();
        assert_eq!(prompts, ["a cat", "a dog", "last"]);
        assert_eq!(
            items.iter().map(|i| (i.index, i.line)).collect::<Vec<_>>(),
            [(0, 1), (1, 4), (2, 6)]
        );
    }

    #[test]
    fn json_lines_set_every_field() {
        let items = parse_prompt_file(
            r#"{"prompt": "a fox", "negative_prompt": "blur", "seed": 7, "steps": 4, "guidance": 3.5, "width": 64, "height": 32, "scheduler": "Euler a", "output": "fox.png"}"#,
        );
        let s = items[0].spec.as_ref().unwrap();
        let o = &s.overrides;
        assert_eq!(o.prompt.as_deref(), Some("a fox"));
        assert_eq!(o.negative_prompt.as_deref(), Some("blur"));
        assert_eq!(
            (o.seed, o.steps, o.guidance, o.width, o.height),
            (Some(7), Some(4), Some(3.5), Some(64), Some(32))
        );
        assert_eq!(o.scheduler, Some(SchedulerKind::EulerAncestral));
        assert_eq!(s.output.as_deref(), Some("fox.png"));
    }

    #[test]
    fn bad_lines_are_item_errors_and_keep_their_index() {
        let items = parse_prompt_file(
            "one\n{\"prompt\": \"two\", \"steps\": \"x\"}\n{not json\n{\"promt\": \"typo\"}\n{\"prompt\": \"s\", \"scheduler\": \"nope\"}\nsix",
        );
        assert_eq!(items.len(), 6);
        assert!(items[0].spec.is_ok() && items[5].spec.is_ok());
        for item in &items[1..5] {
            assert!(item.spec.is_err(), "line {} should fail", item.line);
        }
        assert!(items[3].spec.as_ref().unwrap_err().contains("promt"));
        assert!(items[4]
            .spec
            .as_ref()
            .unwrap_err()
            .contains("unknown scheduler"));
        assert_eq!(items[5].index, 5);
        let plan = plan_batch(&items, &opts(), &|_| false);
        assert_eq!(plan.items.len(), 6);
        assert!(matches!(
            plan.items[2],
            ItemPlan::Failed {
                index: 2,
                line: 3,
                ..
            }
        ));
    }

    #[test]
    fn shard_parsing_is_zero_based() {
        assert_eq!(
            "0/4".parse::<Shard>().unwrap(),
            Shard { index: 0, count: 4 }
        );
        assert_eq!(
            "3/4".parse::<Shard>().unwrap(),
            Shard { index: 3, count: 4 }
        );
        for bad in ["4/4", "1/0", "a/2", "1", "-1/2", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn shards_partition_the_items_with_global_indices() {
        let text: String = (0..10).map(|i| format!("prompt {i}\n")).collect();
        let items = parse_prompt_file(&text);
        let mut seen = Vec::new();
        let mut names = std::collections::HashSet::new();
        for k in 0..3 {
            let mut o = opts();
            o.shard = Some(Shard { index: k, count: 3 });
            let plan = plan_batch(&items, &o, &|_| false);
            for item in ready(&plan) {
                assert_eq!(item.index % 3, k);
                assert_eq!(item.overrides.seed, Some(100 + item.index as u64));
                seen.push(item.index);
                assert!(names.insert(item.images[0].path.clone()));
            }
        }
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn seeds_come_from_the_line_or_base_plus_index() {
        let items = parse_prompt_file("a\n{\"prompt\": \"b\", \"seed\": 5}\nc");
        let mut o = opts();
        o.num_images = 2;
        let plan = plan_batch(&items, &o, &|_| false);
        let seeds: Vec<Vec<u64>> = ready(&plan)
            .iter()
            .map(|i| i.images.iter().map(|m| m.seed).collect())
            .collect();
        assert_eq!(seeds, [vec![100, 101], vec![5, 6], vec![104, 105]]);
        assert_eq!(plan.seeded_from_base, 2);
        assert_eq!(item_seed(u64::MAX, 1, 1), 0);
        // Command-line fields fill what the line leaves unset.
        assert_eq!(ready(&plan)[0].overrides.steps, Some(3));
    }

    #[test]
    fn templates_render_padded_fields_and_slugs() {
        let t = OutputTemplate::parse("{index:05}-{image}-{seed}-{prompt_slug:12}.png").unwrap();
        let name = t.render(&NameFields {
            index: 7,
            image: 1,
            seed: 42,
            prompt: "A Red Fox, in the snow!",
        });
        assert_eq!(name, "00007-1-42-a-red-fox-in.png");
        assert_eq!(
            OutputTemplate::parse("{{x}}-{index}")
                .unwrap()
                .render(&NameFields {
                    index: 3,
                    image: 0,
                    seed: 0,
                    prompt: ""
                }),
            "{x}-3.png"
        );
        assert!(OutputTemplate::parse("{nope}.png").is_err());
        assert!(OutputTemplate::parse("{index:x}.png").is_err());
        assert!(OutputTemplate::parse("{index").is_err());
        assert!(OutputTemplate::parse("sub/{index}.png").is_err());
        assert!(!OutputTemplate::parse("{index}.png")
            .unwrap()
            .varies_per_image());
        assert_eq!(slug("¡¿ !!", 10), "untitled");
        assert_eq!(slug("Ünïcode  Straße", 48), "ünïcode-straße");
    }

    #[test]
    fn file_names_cannot_escape_the_folder() {
        for evil in [
            "../../etc/passwd",
            "/abs/x.png",
            "..\\..\\win.png",
            "..",
            ".hidden",
            "a\0b\n.png",
            "CON.png",
            "nul",
        ] {
            let s = sanitize_file_name(evil);
            assert!(!s.contains('/') && !s.contains('\\'), "{evil:?} -> {s:?}");
            assert!(!s.starts_with('.'), "{evil:?} -> {s:?}");
            assert!(s.ends_with(".png"), "{evil:?} -> {s:?}");
            assert!(!s.chars().any(|c| c.is_control()), "{evil:?} -> {s:?}");
            assert_eq!(Path::new(&s).components().count(), 1, "{evil:?} -> {s:?}");
        }
        assert_eq!(sanitize_file_name("CON.png"), "_CON.png");
        assert_eq!(sanitize_file_name("fox"), "fox.png");
        assert!(sanitize_file_name(&"é".repeat(300)).len() <= 200);
        // A JSON `output` with a path stays inside the out dir.
        let items = parse_prompt_file(r#"{"prompt": "x", "output": "../../escape.png"}"#);
        let plan = plan_batch(&items, &opts(), &|_| false);
        let p = &ready(&plan)[0].images[0].path;
        assert_eq!(p.parent(), Some(Path::new("out")));
        assert!(p
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_))));
    }

    #[test]
    fn resume_skips_existing_and_otherwise_they_conflict() {
        let items = parse_prompt_file("a\nb\nc");
        let exists = |p: &Path| p.to_string_lossy().contains("-b.png");
        let plan = plan_batch(&items, &opts(), &exists);
        assert_eq!(plan.conflicts, [PathBuf::from("out/00001-101-b.png")]);
        let mut o = opts();
        o.resume = true;
        let plan = plan_batch(&items, &o, &exists);
        assert!(plan.conflicts.is_empty());
        assert_eq!((plan.images_to_make(), plan.images_skipped()), (2, 1));
        let mut o = opts();
        o.overwrite = true;
        let plan = plan_batch(&items, &o, &exists);
        assert_eq!((plan.images_to_make(), plan.images_skipped()), (3, 0));
    }

    #[test]
    fn single_runs_name_images_by_seed() {
        let o = RequestOverrides {
            seed: Some(9),
            ..Default::default()
        };
        let plan = plan_single("x/easel.png", o.clone(), 2, false, false, &|p| {
            p.ends_with("easel-10.png")
        });
        let paths: Vec<_> = plan
            .ready()
            .flat_map(|i| &i.images)
            .map(|i| i.path.clone())
            .collect();
        assert_eq!(
            paths,
            [
                PathBuf::from("x/easel-9.png"),
                PathBuf::from("x/easel-10.png")
            ]
        );
        assert_eq!(plan.conflicts, [PathBuf::from("x/easel-10.png")]);
        assert_eq!(
            single_output_path("a-{seed}-{index}.png", 9, 1, 2),
            PathBuf::from("a-9-1.png")
        );
        let plan = plan_single("one.png", o, 1, true, false, &|_| true);
        assert_eq!((plan.images_to_make(), plan.images_skipped()), (0, 1));
    }

    #[test]
    fn duplicate_outputs_fail_the_later_item() {
        let items = parse_prompt_file(
            "{\"prompt\": \"a\", \"output\": \"same.png\"}\n{\"prompt\": \"b\", \"output\": \"same.png\"}",
        );
        let plan = plan_batch(&items, &opts(), &|_| false);
        assert!(matches!(plan.items[0], ItemPlan::Ready(_)));
        assert!(
            matches!(&plan.items[1], ItemPlan::Failed { error, .. } if error.contains("also the output of item 0"))
        );
        // Also when the other item is in another shard.
        let mut o = opts();
        o.shard = Some(Shard { index: 1, count: 2 });
        let plan = plan_batch(&items, &o, &|_| false);
        assert!(matches!(
            &plan.items[..],
            [ItemPlan::Failed { index: 1, .. }]
        ));
        // A fixed name with several images gets the seed added.
        let mut o = opts();
        o.num_images = 2;
        let plan = plan_batch(&items[..1], &o, &|_| false);
        let names: Vec<_> = ready(&plan)[0]
            .images
            .iter()
            .map(|i| i.path.clone())
            .collect();
        assert_eq!(
            names,
            [
                PathBuf::from("out/same-100.png"),
                PathBuf::from("out/same-101.png")
            ]
        );
    }
}
