//! Finding and opening model files: a local diffusers-layout folder, or a Hugging Face hub
//! repo (downloaded into, or read from, the standard HF cache). Only safetensors are read.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The default model: Stable Diffusion v1.4.
pub const DEFAULT_MODEL: &str = "CompVis/stable-diffusion-v1-4";

/// One pipeline component's folder in the diffusers layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
}

impl Component {
    pub fn dir(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::Vae => "vae",
            Self::TextEncoder => "text_encoder",
        }
    }
    fn weight_stem(self) -> &'static str {
        match self {
            Self::Unet | Self::Vae => "diffusion_pytorch_model",
            Self::TextEncoder => "model",
        }
    }
}

/// Where the files of a model are: every path is a readable local file.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user asked for (hub id or folder), recorded in PNG metadata.
    pub name: String,
    pub unet_config: PathBuf,
    pub unet_weights: PathBuf,
    pub vae_config: PathBuf,
    pub vae_weights: PathBuf,
    pub text_encoder_config: PathBuf,
    pub text_encoder_weights: PathBuf,
    pub tokenizer_dir: PathBuf,
    pub scheduler_config: PathBuf,
}

/// How to find a model.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// A hub repo id or a local folder.
    pub model: String,
    pub revision: String,
    /// Prefer the `*.fp16.safetensors` variant files (GPU f16 runs).
    pub prefer_fp16: bool,
}

impl ModelSpec {
    pub fn resolve(&self) -> Result<ModelFiles> {
        let path = Path::new(&self.model);
        if path.is_dir() {
            return resolve_local(path, &self.model, self.prefer_fp16);
        }
        if path.exists() {
            bail!(
                "--model {} is a file; expected a diffusers-layout folder or a hub repo id",
                self.model
            );
        }
        if looks_like_path(&self.model) {
            bail!("model folder {} does not exist", self.model);
        }
        resolve_hub(self)
    }
}

fn looks_like_path(s: &str) -> bool {
    s.starts_with('.')
        || s.starts_with('/')
        || s.starts_with('~')
        || s.matches('/').count() > 1
        || s.contains('\\')
}

fn weight_names(c: Component, fp16: bool) -> Vec<String> {
    let stem = c.weight_stem();
    let mut v = Vec::new();
    if fp16 {
        v.push(format!("{}/{stem}.fp16.safetensors", c.dir()));
    }
    v.push(format!("{}/{stem}.safetensors", c.dir()));
    v
}

fn resolve_local(root: &Path, name: &str, fp16: bool) -> Result<ModelFiles> {
    let file = |rel: &str| -> Result<PathBuf> {
        let p = root.join(rel);
        if p.is_file() {
            Ok(p)
        } else {
            bail!("{} is missing (expected the diffusers folder layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/)", p.display())
        }
    };
    let weights = |c: Component| -> Result<PathBuf> {
        let names = weight_names(c, fp16);
        for n in &names {
            let p = root.join(n);
            if p.is_file() {
                return Ok(p);
            }
        }
        let bin = root.join(c.dir()).join(format!("{}.bin", c.weight_stem()));
        if bin.is_file() {
            bail!("{} holds only pickle weights ({}); easel reads safetensors only (convert them with diffusers' save_pretrained(safe_serialization=True))", root.join(c.dir()).display(), bin.display());
        }
        bail!(
            "{} is missing",
            root.join(names.last().unwrap_or(&String::new())).display()
        )
    };
    let tokenizer_dir = root.join("tokenizer");
    if !tokenizer_dir.join("tokenizer.json").is_file() {
        file("tokenizer/vocab.json")?;
        file("tokenizer/merges.txt")?;
    }
    Ok(ModelFiles {
        name: name.to_string(),
        unet_config: file("unet/config.json")?,
        unet_weights: weights(Component::Unet)?,
        vae_config: file("vae/config.json")?,
        vae_weights: weights(Component::Vae)?,
        text_encoder_config: file("text_encoder/config.json")?,
        text_encoder_weights: weights(Component::TextEncoder)?,
        tokenizer_dir,
        scheduler_config: file("scheduler/scheduler_config.json")?,
    })
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn hub_cache() -> hf_hub::Cache {
    match std::env::var("HF_HUB_CACHE") {
        Ok(dir) if !dir.is_empty() => hf_hub::Cache::new(PathBuf::from(dir)),
        _ => hf_hub::Cache::from_env(),
    }
}

fn resolve_hub(spec: &ModelSpec) -> Result<ModelFiles> {
    use hf_hub::{Repo, RepoType};
    let repo = Repo::with_revision(spec.model.clone(), RepoType::Model, spec.revision.clone());
    let cache = hub_cache();
    let offline = env_flag("HF_HUB_OFFLINE");
    let cached = cache.repo(repo.clone());
    let api = if offline {
        None
    } else {
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| cache.token());
        // from_env honours HF_ENDPOINT (mirrors); the cache may come from HF_HUB_CACHE.
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_cache_dir(cache.path().clone())
            .with_token(token)
            .with_progress(false)
            .build()
            .map_err(|e| anyhow!("cannot set up the Hugging Face hub client: {e}"))?;
        Some(api.repo(repo))
    };
    let cache_dir = cache.path().display().to_string();
    let fail = |file: &str, why: String| {
        anyhow!(
            "cannot get {file} of {model} (revision {rev}): {why}. easel downloads the model once \
             (about 5 GB) into the Hugging Face cache ({cache_dir}; set HF_HOME or HF_HUB_CACHE to move it, \
             HF_TOKEN for gated repos) and reads it from there afterwards. Without network access, pass \
             --model <folder> with a model in the diffusers layout (unet/, vae/, text_encoder/, tokenizer/, \
             scheduler/), or, in easel's source tree, the tiny test model: easel --model tests/fixtures/tiny-a --steps 2 \"a cat\"",
            model = spec.model,
            rev = spec.revision,
        )
    };
    let get = |file: &str| -> Result<PathBuf> {
        if let Some(p) = cached.get(file) {
            return Ok(p);
        }
        match &api {
            None => Err(fail(
                file,
                "HF_HUB_OFFLINE is set and it is not in the cache".into(),
            )),
            Some(api) => api.get(file).map_err(|e| fail(file, e.to_string())),
        }
    };
    let weights = |c: Component| -> Result<PathBuf> {
        let names = weight_names(c, spec.prefer_fp16);
        let (last, preferred) = names.split_last().expect("at least one name");
        for n in preferred {
            // A variant file is optional: fall back to the full-precision file.
            if let Some(p) = cached.get(n) {
                return Ok(p);
            }
            if let Some(api) = &api {
                if let Ok(p) = api.get(n) {
                    return Ok(p);
                }
            }
        }
        get(last)
    };
    let unet_config = get("unet/config.json")?;
    let tokenizer_dir = get("tokenizer/vocab.json")?
        .parent()
        .context("cache path without parent")?
        .to_path_buf();
    get("tokenizer/merges.txt")?;
    for optional in [
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
    ] {
        let _ = get(optional);
    }
    Ok(ModelFiles {
        name: spec.model.clone(),
        unet_config,
        unet_weights: weights(Component::Unet)?,
        vae_config: get("vae/config.json")?,
        vae_weights: weights(Component::Vae)?,
        text_encoder_config: get("text_encoder/config.json")?,
        text_encoder_weights: weights(Component::TextEncoder)?,
        tokenizer_dir,
        scheduler_config: get("scheduler/scheduler_config.json")?,
    })
}

/// Opens a safetensors file for a model builder, converting to `dtype` on load.
///
/// Tensors are read one at a time with positioned reads (no mmap): the model owns its copy of
/// every weight anyway, and a mapping would keep the file's pages resident next to those
/// copies while loading (peak ≈ 2× the weights). Peak here is the weights plus one tensor.
pub fn open_safetensors(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let st = SafetensorsFile::open(path).with_context(|| {
        format!(
            "cannot read weights {} (not a valid safetensors file?)",
            path.display()
        )
    })?;
    Ok(VarBuilder::from_backend(
        Box::new(st),
        dtype,
        device.clone(),
    ))
}

#[derive(Debug, Clone)]
struct TensorEntry {
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

/// A safetensors file read tensor by tensor (see [`open_safetensors`]).
pub struct SafetensorsFile {
    file: std::fs::File,
    path: PathBuf,
    tensors: HashMap<String, TensorEntry>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)?;
        let file_len = file.metadata()?.len();
        let mut n = [0u8; 8];
        read_at(&file, &mut n, 0)?;
        let n = u64::from_le_bytes(n);
        if n > 100_000_000 || 8 + n > file_len {
            bail!("bad safetensors header length {n}");
        }
        // The header is parsed by the safetensors crate; the data is read lazily, tensor by
        // tensor, so its offsets are checked here (`read_metadata` wants the whole file).
        let mut header = vec![0u8; n as usize];
        read_at(&file, &mut header, 8)?;
        let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)?;
        let base = 8 + n;
        let mut tensors = HashMap::new();
        for (name, info) in metadata.tensors() {
            use safetensors::Dtype as S;
            let dtype = match info.dtype {
                S::F32 => DType::F32,
                S::F16 => DType::F16,
                S::BF16 => DType::BF16,
                S::F64 => DType::F64,
                S::I64 => DType::I64,
                S::U32 => DType::U32,
                S::U8 => DType::U8,
                // Other dtypes (e.g. int32 position ids in some files) are never loaded.
                _ => continue,
            };
            let (start, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
            let want = info.shape.iter().product::<usize>() * dtype.size_in_bytes();
            if end < start || (end - start) as usize != want {
                bail!("tensor {name}: data offsets do not match its dtype and shape");
            }
            if base + end > file_len {
                bail!("tensor {name} lies past the end of the file (truncated download?)");
            }
            tensors.insert(
                name,
                TensorEntry {
                    dtype,
                    shape: info.shape.clone(),
                    start: base + start,
                    end: base + end,
                },
            );
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            tensors,
        })
    }

    fn read(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let e = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "cannot find tensor {name} in {}",
                self.path.display()
            ))
        })?;
        let len = (e.end - e.start) as usize;
        let read =
            |buf: &mut [u8]| read_at(&self.file, buf, e.start).map_err(candle_core::Error::wrap);
        // Little-endian float tensors are read straight into the tensor's own buffer (a byte
        // buffer then a typed copy faulted in every weight twice: ~1 s of a UNet load).
        let t = match e.dtype {
            DType::F32 if cfg!(target_endian = "little") => typed::<f32>(len, &e.shape, read)?,
            DType::F16 if cfg!(target_endian = "little") => {
                typed::<half::f16>(len, &e.shape, read)?
            }
            DType::BF16 if cfg!(target_endian = "little") => {
                typed::<half::bf16>(len, &e.shape, read)?
            }
            _ => {
                let mut bytes = vec![0u8; len];
                read(&mut bytes)?;
                Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, &Device::Cpu)?
            }
        };
        t.to_dtype(dtype)?.to_device(dev)
    }
}

/// A tensor of `T` filled by `read` from its little-endian bytes.
fn typed<T: candle_core::WithDType + Default>(
    len: usize,
    shape: &[usize],
    read: impl FnOnce(&mut [u8]) -> candle_core::Result<()>,
) -> candle_core::Result<Tensor> {
    let n = len / std::mem::size_of::<T>();
    if n * std::mem::size_of::<T>() != len || n != shape.iter().product::<usize>() {
        candle_core::bail!("tensor data is {len} bytes, not a {shape:?} array");
    }
    let mut v = vec![T::default(); n];
    // SAFETY: the u8 view covers exactly v's initialised elements; f32/f16/bf16 accept any
    // bit pattern, so whatever `read` writes leaves valid values.
    let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, len) };
    read(bytes)?;
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// `pread` where there is one; elsewhere seek + read (model building is sequential).
#[cfg(unix)]
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

#[cfg(not(unix))]
fn read_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

impl SimpleBackend for SafetensorsFile {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(e) = self.tensors.get(name) {
            if e.shape.as_slice() != s.dims() {
                candle_core::bail!(
                    "shape mismatch for {name}: the file has {:?}, the model wants {:?}",
                    e.shape,
                    s.dims()
                );
            }
        }
        self.read(name, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A backend that knows only names and shapes: it hands out zero-strided (unallocated)
/// tensors and records every request. Used to check that the model builders ask for
/// exactly the tensors of the real SD v1.4 files without allocating 4 GB.
/// Clones share the record, so keep one to read it after handing another to a builder.
#[derive(Clone)]
pub struct ShapeOnlyBackend {
    shapes: std::sync::Arc<HashMap<String, Vec<usize>>>,
    requested: std::sync::Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl ShapeOnlyBackend {
    pub fn new(shapes: HashMap<String, Vec<usize>>) -> Self {
        Self {
            shapes: std::sync::Arc::new(shapes),
            requested: Default::default(),
        }
    }
    /// A var builder over this backend.
    pub fn var_builder(&self, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, Device::Cpu)
    }
    /// Every (name, shape) a builder asked for.
    pub fn requested(&self) -> BTreeMap<String, Vec<usize>> {
        self.requested.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl SimpleBackend for ShapeOnlyBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name}: the file has {:?}, the model wants {:?}",
                t.dims(),
                s.dims()
            );
        }
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("cannot find tensor {name}")))?;
        if let Ok(mut r) = self.requested.lock() {
            r.insert(name.to_string(), shape.clone());
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(shape.as_slice())
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}
