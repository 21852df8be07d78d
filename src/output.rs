//! Writing images: PNG with the generation parameters in a `parameters` text chunk
//! (AUTOMATIC1111's format, which image viewers, A1111 and ComfyUI read), written to a
//! temporary file and renamed into place so that a failure never leaves half a PNG.

use crate::pipeline::{GeneratedImage, ImageMetadata, RequestOverrides};
use crate::scheduler::SchedulerKind;
use anyhow::{bail, Context, Result};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The `parameters` text: prompt line, `Negative prompt:` line (when there is one), then
/// `Steps: …, Sampler: …, CFG scale: …, Seed: …, Size: WxH, Model: …`.
pub fn parameters_text(m: &ImageMetadata) -> String {
    let mut s = m.prompt.clone();
    if !m.negative_prompt.is_empty() {
        s.push_str("\nNegative prompt: ");
        s.push_str(&m.negative_prompt);
    }
    s.push_str(&format!(
        "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        m.steps,
        m.sampler.a1111_name(),
        m.guidance,
        m.seed,
        m.width,
        m.height,
        m.model
    ));
    if m.eta != 0.0 {
        s.push_str(&format!(", Eta: {}", m.eta));
    }
    s.push_str(&format!(
        ", Dtype: {}, Version: easel {}",
        m.dtype,
        env!("CARGO_PKG_VERSION")
    ));
    s
}

/// Checks up front that `path` can be written (its folder exists, and it does not exist
/// unless `overwrite`), so bad output paths fail before minutes of compute.
pub fn check_writable(path: &Path, overwrite: bool) -> Result<()> {
    if path.as_os_str().is_empty() {
        bail!("the output path is empty");
    }
    if path.is_dir() {
        bail!("cannot write {}: it is a directory", path.display());
    }
    let dir = parent_dir(path);
    if !dir.is_dir() {
        bail!(
            "cannot write {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if !overwrite && path.exists() {
        bail!(
            "{} already exists; pass --overwrite to replace it",
            path.display()
        );
    }
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `image` as a PNG with its metadata, atomically (temp file + rename).
pub fn write_png(path: &Path, image: &GeneratedImage, overwrite: bool) -> Result<()> {
    check_writable(path, overwrite)?;
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = write_png_file(&tmp, image).and_then(|_| {
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move the image into place at {}", path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_png_file(path: &Path, image: &GeneratedImage) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    let mut w = BufWriter::new(file);
    {
        let mut enc = png::Encoder::new(&mut w, image.width as u32, image.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let text = parameters_text(&image.metadata);
        // tEXt is Latin-1 only; like PIL (and so A1111), use UTF-8 iTXt otherwise.
        if text.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk("parameters".into(), text)?;
        } else {
            enc.add_itxt_chunk("parameters".into(), text)?;
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(&image.rgb)?;
        writer.finish()?;
    }
    w.flush()?;
    w.get_ref().sync_all()?;
    Ok(())
}

/// The `parameters` text of a PNG, if it has one (tEXt, zTXt or iTXt).
pub fn read_parameters(path: &Path) -> Result<Option<String>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .with_context(|| format!("{} is not a PNG", path.display()))?;
    let info = reader.info();
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return Ok(Some(t.text.clone()));
    }
    if let Some(t) = info
        .compressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return Ok(Some(t.get_text()?));
    }
    if let Some(t) = info.utf8_text.iter().find(|t| t.keyword == "parameters") {
        return Ok(Some(t.get_text()?));
    }
    Ok(None)
}

/// A PNG's `parameters` text taken apart, as AUTOMATIC1111's
/// `parse_generation_parameters` does: prompt lines, then everything after a line starting
/// `Negative prompt:` is the negative prompt, then a last line of `Key: value` pairs (values
/// with commas are JSON-quoted). A last line with fewer than three pairs is prompt text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PngParameters {
    pub prompt: String,
    pub negative_prompt: String,
    /// The `Key: value` pairs in order, quotes removed.
    pub fields: Vec<(String, String)>,
}

impl PngParameters {
    pub fn parse(text: &str) -> Self {
        let mut lines: Vec<&str> = text.trim().split('\n').collect();
        let mut fields = Vec::new();
        if let Some(last) = lines.last() {
            let pairs = parse_pairs(last);
            if pairs.len() >= 3 {
                fields = pairs;
                lines.pop();
            }
        }
        let (mut prompt, mut negative) = (String::new(), String::new());
        let mut in_negative = false;
        for line in lines {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let line = match line.strip_prefix("Negative prompt:") {
                Some(rest) => {
                    in_negative = true;
                    rest.trim()
                }
                None => line,
            };
            let target = if in_negative {
                &mut negative
            } else {
                &mut prompt
            };
            if !target.is_empty() {
                target.push('\n');
            }
            target.push_str(line);
        }
        Self {
            prompt,
            negative_prompt: negative,
            fields,
        }
    }

    /// The value of `key` (exact, as A1111 writes it).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether easel wrote it (its `Model` is then an easel model name or folder).
    pub fn from_easel(&self) -> bool {
        self.get("Version").is_some_and(|v| v.starts_with("easel"))
    }

    /// The sampler the `Sampler` and `Schedule type` fields name, if any. A1111 1.9+ writes
    /// "DPM++ 2M" with "Schedule type: Karras" where older versions wrote "DPM++ 2M Karras".
    pub fn scheduler(&self) -> Result<Option<SchedulerKind>> {
        let Some(sampler) = self.get("Sampler") else {
            return Ok(None);
        };
        let kind = SchedulerKind::parse(sampler).map_err(|_| {
            anyhow::anyhow!("the PNG's sampler {sampler:?} is not available in easel; choose one with --scheduler")
        })?;
        match self.get("Schedule type").map(str::trim) {
            None | Some("Automatic") => Ok(Some(kind)),
            Some(t) if t.eq_ignore_ascii_case("karras") && kind == SchedulerKind::DpmPp2m => {
                Ok(Some(SchedulerKind::DpmPp2mKarras))
            }
            Some(t) if t.eq_ignore_ascii_case("karras") && kind == SchedulerKind::DpmPp2mKarras => {
                Ok(Some(kind))
            }
            Some(t) => bail!(
                "the PNG's sampler {sampler:?} with schedule type {t:?} is not available in easel; choose one with --scheduler"
            ),
        }
    }

    /// The request fields recorded here. The sampler is read only when `with_scheduler`
    /// (a `--scheduler` on the command line makes an unknown one irrelevant).
    pub fn to_overrides(&self, with_scheduler: bool) -> Result<RequestOverrides> {
        fn num<T: std::str::FromStr>(p: &PngParameters, key: &str) -> Result<Option<T>> {
            p.get(key)
                .map(|v| {
                    v.trim().parse::<T>().map_err(|_| {
                        anyhow::anyhow!("the PNG's parameters have a bad {key}: {v:?}")
                    })
                })
                .transpose()
        }
        let size = match self.get("Size") {
            None => None,
            Some(v) => {
                let (w, h) = v
                    .trim()
                    .split_once('x')
                    .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
                    .ok_or_else(|| {
                        anyhow::anyhow!("the PNG's parameters have a bad Size: {v:?}")
                    })?;
                Some((w, h))
            }
        };
        let scheduler = if with_scheduler {
            self.scheduler()?
        } else {
            None
        };
        let eta = if scheduler == Some(SchedulerKind::Ddim) {
            match num::<f64>(self, "Eta DDIM")? {
                Some(e) => Some(e),
                None => num(self, "Eta")?,
            }
        } else {
            None
        };
        Ok(RequestOverrides {
            prompt: Some(self.prompt.clone()),
            negative_prompt: Some(self.negative_prompt.clone()),
            seed: num(self, "Seed")?,
            steps: num(self, "Steps")?,
            guidance: num(self, "CFG scale")?,
            width: size.map(|s: (usize, usize)| s.0),
            height: size.map(|s| s.1),
            scheduler,
            eta,
        })
    }
}

/// `Key: value, Key: "quoted, value", …` → pairs. Keys follow A1111's `\w[\w \-/]+`; text
/// that is not a pair is skipped, as A1111's regex skips it.
fn parse_pairs(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let Some(colon) = rest.find(':') else {
            break;
        };
        let key = rest[..colon].trim_end();
        let valid_key = key.chars().count() >= 2
            && key
                .chars()
                .next()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
            && key
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == ' ' || c == '-' || c == '/');
        let after = rest[colon + 1..].trim_start();
        // A quoted value is a JSON string; an unquoted one runs to the next comma.
        let (value, next) = if after.starts_with('"') {
            match quoted_end(after) {
                Some(end) => {
                    let raw = &after[..end];
                    let v = serde_json::from_str::<String>(raw)
                        .unwrap_or_else(|_| raw[1..raw.len() - 1].to_string());
                    let tail = after[end..].trim_start();
                    (v, tail.strip_prefix(',').unwrap_or(tail))
                }
                None => (after.to_string(), ""),
            }
        } else {
            match after.find(',') {
                Some(i) => (after[..i].trim().to_string(), &after[i + 1..]),
                None => (after.trim().to_string(), ""),
            }
        };
        if valid_key {
            out.push((key.to_string(), value));
        } else if let Some(i) = rest.find(',') {
            // Not a pair: skip to the next comma, as a regex search would.
            rest = &rest[i + 1..];
            continue;
        }
        rest = next;
    }
    out
}

/// End (exclusive) of the JSON string starting at `s[0] == '"'`.
fn quoted_end(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i + 1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ImageMetadata {
        ImageMetadata {
            prompt: "a red fox, in snow\nsecond line".into(),
            negative_prompt: "blurry, low\nquality".into(),
            steps: 23,
            sampler: SchedulerKind::DpmPp2mKarras,
            guidance: 6.5,
            seed: 4_000_000_000,
            width: 512,
            height: 768,
            model: "runwayml/stable-diffusion-v1-5".into(),
            eta: 0.0,
            dtype: "bf16".into(),
        }
    }

    #[test]
    fn easel_parameters_round_trip() {
        let m = meta();
        let p = PngParameters::parse(&parameters_text(&m));
        assert!(p.from_easel());
        assert_eq!(p.prompt, m.prompt);
        assert_eq!(p.negative_prompt, m.negative_prompt);
        assert_eq!(p.get("Model"), Some(m.model.as_str()));
        let o = p.to_overrides(true).unwrap();
        assert_eq!(o.prompt.as_deref(), Some(m.prompt.as_str()));
        assert_eq!(
            (
                o.steps,
                o.guidance,
                o.seed,
                o.width,
                o.height,
                o.scheduler,
                o.eta
            ),
            (
                Some(23),
                Some(6.5),
                Some(4_000_000_000),
                Some(512),
                Some(768),
                Some(m.sampler),
                None
            )
        );
        let mut ddim = meta();
        ddim.sampler = SchedulerKind::Ddim;
        ddim.eta = 0.5;
        ddim.negative_prompt.clear();
        let p = PngParameters::parse(&parameters_text(&ddim));
        assert_eq!(p.negative_prompt, "");
        assert_eq!(p.to_overrides(true).unwrap().eta, Some(0.5));
    }

    #[test]
    fn a1111_quirks() {
        let text = "masterpiece, a castle\non a hill, (detailed:1.2)\nNegative prompt: ugly, bad hands\nworst quality\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x768, Model hash: abc123, Model: v1-5-pruned-emaonly, Lora hashes: \"foo: 1a2b, bar: 3c4d\", TI hashes: \"x: \\\"y\\\"\", Denoising strength: 0.7, Version: v1.9.4";
        let p = PngParameters::parse(text);
        assert_eq!(p.prompt, "masterpiece, a castle\non a hill, (detailed:1.2)");
        assert_eq!(p.negative_prompt, "ugly, bad hands\nworst quality");
        assert_eq!(p.get("Lora hashes"), Some("foo: 1a2b, bar: 3c4d"));
        assert_eq!(p.get("TI hashes"), Some("x: \"y\""));
        assert_eq!(p.get("Version"), Some("v1.9.4"));
        assert!(!p.from_easel());
        let o = p.to_overrides(true).unwrap();
        assert_eq!(o.scheduler, Some(SchedulerKind::DpmPp2mKarras));
        assert_eq!(
            (o.steps, o.guidance, o.seed),
            (Some(30), Some(7.0), Some(123))
        );
        assert_eq!((o.width, o.height), (Some(512), Some(768)));

        let sampler = |s: &str| {
            PngParameters::parse(&format!("x\nSteps: 2, Sampler: {s}, Seed: 1"))
                .scheduler()
                .map_err(|e| e.to_string())
        };
        assert_eq!(sampler("Euler a"), Ok(Some(SchedulerKind::EulerAncestral)));
        assert_eq!(
            sampler("DPM++ 2M Karras"),
            Ok(Some(SchedulerKind::DpmPp2mKarras))
        );
        assert_eq!(sampler("PLMS"), Ok(Some(SchedulerKind::Pndm)));
        assert!(sampler("DPM++ 3M SDE").unwrap_err().contains("--scheduler"));
        assert!(sampler("Euler, Schedule type: Exponential").is_err());
        // Without --scheduler's help an unknown sampler is an error; with it, ignored.
        let p = PngParameters::parse("x\nSteps: 2, Sampler: Restart, Seed: 1");
        assert!(p.to_overrides(true).is_err());
        assert_eq!(p.to_overrides(false).unwrap().scheduler, None);
    }

    #[test]
    fn prompt_only_and_bad_values() {
        // Fewer than three pairs: the last line is prompt text.
        let p = PngParameters::parse("a photo\nstyle: noir, mood: dark");
        assert_eq!(p.prompt, "a photo\nstyle: noir, mood: dark");
        assert!(p.fields.is_empty());
        let p = PngParameters::parse("x\nSteps: many, Sampler: Euler, Seed: 1");
        assert!(p
            .to_overrides(true)
            .unwrap_err()
            .to_string()
            .contains("Steps"));
        let p = PngParameters::parse("x\nSteps: 2, Size: 5 12, Seed: -1");
        assert!(p.to_overrides(true).is_err());
    }
}
