//! Writing images: PNG with the generation parameters in a `parameters` text chunk
//! (AUTOMATIC1111's format, which image viewers, A1111 and ComfyUI read), written to a
//! temporary file and renamed into place so that a failure never leaves half a PNG.

use crate::pipeline::{GeneratedImage, ImageMetadata};
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
    s.push_str(&format!(", Version: easel {}", env!("CARGO_PKG_VERSION")));
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
