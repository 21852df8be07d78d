//! Attention Based Building Blocks
use candle_core::{DType, IndexOp, Result, Tensor, D};
use candle_nn as nn;
use candle_nn::Module;

#[derive(Debug)]
struct GeGlu {
    proj: crate::kernels::Linear,
}

impl GeGlu {
    fn new(vs: nn::VarBuilder, dim_in: usize, dim_out: usize) -> Result<Self> {
        let proj = crate::kernels::linear(dim_in, dim_out * 2, vs.pp("proj"))?;
        Ok(Self { proj })
    }
}

impl Module for GeGlu {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // Fused on the CPU: one pass instead of chunk copies, gelu and a product.
        crate::kernels::act::geglu(&self.proj.forward(xs)?)
    }
}

/// A feed-forward layer.
#[derive(Debug)]
struct FeedForward {
    project_in: GeGlu,
    linear: crate::kernels::Linear,
}

impl FeedForward {
    // The glu parameter in the python code is unused?
    // https://github.com/huggingface/diffusers/blob/d3d22ce5a894becb951eec03e663951b28d45135/src/diffusers/models/attention.py#L347
    /// Creates a new feed-forward layer based on some given input dimension, some
    /// output dimension, and a multiplier to be used for the intermediary layer.
    fn new(vs: nn::VarBuilder, dim: usize, dim_out: Option<usize>, mult: usize) -> Result<Self> {
        let inner_dim = dim * mult;
        let dim_out = dim_out.unwrap_or(dim);
        let vs = vs.pp("net");
        let project_in = GeGlu::new(vs.pp("0"), dim, inner_dim)?;
        let linear = crate::kernels::linear(inner_dim, dim_out, vs.pp("2"))?;
        Ok(Self { project_in, linear })
    }
}

/// Tokens per feed-forward chunk on the CPU. The GEGLU projection is 8× the width of its
/// input (2 × 4096 × 2560 floats = 84 MB at 512²): whole, it is a fresh mmap (page faults and
/// zeroing, ~5% of a forward) and leaves the caches; in 1024-token chunks it is neither.
/// The feed-forward is per token, so chunking changes no value.
const FF_CHUNK: usize = 1024;

impl FeedForward {
    /// The layer over `chunk` tokens at a time (batch and sequence flattened).
    fn forward_in_chunks(&self, xs: &Tensor, chunk: usize) -> Result<Tensor> {
        self.chunks_with(xs, chunk, None)
    }

    /// `forward(xs) + residual`, the residual added inside the last projection.
    fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if xs.device().is_cpu() {
            self.chunks_with(xs, FF_CHUNK, Some(residual))
        } else {
            self.forward(xs)? + residual
        }
    }

    fn chunks_with(&self, xs: &Tensor, chunk: usize, residual: Option<&Tensor>) -> Result<Tensor> {
        let run = |xs: &Tensor, r: Option<Tensor>| {
            self.linear
                .forward_add(&self.project_in.forward(xs)?, r.as_ref())
        };
        let (b, t, c) = xs.dims3()?;
        if b * t <= chunk {
            return run(xs, residual.cloned());
        }
        let flat = xs.reshape((b * t, c))?;
        let flat_r = residual.map(|r| r.reshape((b * t, ()))).transpose()?;
        let chunks = (0..b * t)
            .step_by(chunk)
            .map(|r| {
                let len = chunk.min(b * t - r);
                let res = flat_r.as_ref().map(|x| x.narrow(0, r, len)).transpose()?;
                run(&flat.narrow(0, r, len)?, res)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = Tensor::cat(&chunks, 0)?;
        let c_out = out.dim(1)?;
        out.reshape((b, t, c_out))
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if xs.device().is_cpu() {
            self.forward_in_chunks(xs, FF_CHUNK)
        } else {
            self.linear.forward(&self.project_in.forward(xs)?)
        }
    }
}

#[cfg(feature = "flash-attn")]
fn flash_attn(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    softmax_scale: f32,
    causal: bool,
) -> Result<Tensor> {
    candle_flash_attn::flash_attn(q, k, v, softmax_scale, causal)
}

#[cfg(not(feature = "flash-attn"))]
fn flash_attn(_: &Tensor, _: &Tensor, _: &Tensor, _: f32, _: bool) -> Result<Tensor> {
    // candle-transformers panics here (`unimplemented!`); a missing feature is an error.
    candle_core::bail!("flash attention needs a build with `--features flash-attn`")
}

#[derive(Debug)]
pub struct CrossAttention {
    to_q: crate::kernels::Linear,
    to_k: crate::kernels::Linear,
    to_v: crate::kernels::Linear,
    to_out: crate::kernels::Linear,
    heads: usize,
    scale: f64,
    slice_size: Option<usize>,
    use_flash_attn: bool,
}

impl CrossAttention {
    // Defaults should be heads = 8, dim_head = 64, context_dim = None
    pub fn new(
        vs: nn::VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        slice_size: Option<usize>,
        use_flash_attn: bool,
    ) -> Result<Self> {
        let inner_dim = dim_head * heads;
        let context_dim = context_dim.unwrap_or(query_dim);
        let scale = 1.0 / f64::sqrt(dim_head as f64);
        let to_q = crate::kernels::linear_no_bias(query_dim, inner_dim, vs.pp("to_q"))?;
        let to_k = crate::kernels::linear_no_bias(context_dim, inner_dim, vs.pp("to_k"))?;
        let to_v = crate::kernels::linear_no_bias(context_dim, inner_dim, vs.pp("to_v"))?;
        let to_out = crate::kernels::linear(inner_dim, query_dim, vs.pp("to_out.0"))?;
        Ok(Self {
            to_q,
            to_k,
            to_v,
            to_out,
            heads,
            scale,
            slice_size,
            use_flash_attn,
        })
    }

    fn reshape_heads_to_batch_dim(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch_size, seq_len, dim) = xs.dims3()?;
        xs.reshape((batch_size, seq_len, self.heads, dim / self.heads))?
            .transpose(1, 2)?
            .reshape((batch_size * self.heads, seq_len, dim / self.heads))
    }

    fn reshape_batch_dim_to_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (batch_size, seq_len, dim) = xs.dims3()?;
        xs.reshape((batch_size / self.heads, self.heads, seq_len, dim))?
            .transpose(1, 2)?
            .reshape((batch_size / self.heads, seq_len, dim * self.heads))
    }

    fn sliced_attention(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        slice_size: usize,
    ) -> Result<Tensor> {
        let batch_size_attention = query.dim(0)?;
        let mut hidden_states = Vec::with_capacity(batch_size_attention / slice_size);
        let in_dtype = query.dtype();
        let query = query.to_dtype(DType::F32)?;
        let key = key.to_dtype(DType::F32)?;
        let value = value.to_dtype(DType::F32)?;

        // candle-transformers stacks the slices (rank 4, which then fails) and drops the
        // remainder when slice_size does not divide the batch; concatenate every slice.
        for start_idx in (0..batch_size_attention).step_by(slice_size) {
            let end_idx = (start_idx + slice_size).min(batch_size_attention);

            let xs = query
                .i(start_idx..end_idx)?
                .matmul(&(key.i(start_idx..end_idx)?.t()? * self.scale)?)?;
            let xs = nn::ops::softmax(&xs, D::Minus1)?.matmul(&value.i(start_idx..end_idx)?)?;
            hidden_states.push(xs)
        }
        let hidden_states = Tensor::cat(&hidden_states, 0)?.to_dtype(in_dtype)?;
        self.reshape_batch_dim_to_heads(&hidden_states)
    }

    fn attention(&self, query: &Tensor, key: &Tensor, value: &Tensor) -> Result<Tensor> {
        let xs = if self.use_flash_attn {
            let init_dtype = query.dtype();
            let q = query
                .to_dtype(candle_core::DType::F16)?
                .unsqueeze(0)?
                .transpose(1, 2)?;
            let k = key
                .to_dtype(candle_core::DType::F16)?
                .unsqueeze(0)?
                .transpose(1, 2)?;
            let v = value
                .to_dtype(candle_core::DType::F16)?
                .unsqueeze(0)?
                .transpose(1, 2)?;
            flash_attn(&q, &k, &v, self.scale as f32, false)?
                .transpose(1, 2)?
                .squeeze(0)?
                .to_dtype(init_dtype)?
        } else {
            // Blocked over queries on the CPU: never materialises (len × len) per head.
            if self.to_q.is_bf16() {
                crate::kernels::attention_bf16(query, key, value, self.scale)?
            } else {
                crate::kernels::attention(query, key, value, self.scale)?
            }
        };
        self.reshape_batch_dim_to_heads(&xs)
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_add(xs, context, None)
    }

    /// `forward(xs, context) + residual`, the residual added inside the output projection.
    pub fn forward_add(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let query = self.to_q.forward(xs)?;
        let context = context.unwrap_or(xs).contiguous()?;
        let key = self.to_k.forward(&context)?;
        let value = self.to_v.forward(&context)?;
        if !self.use_flash_attn && self.slice_size.is_none() {
            // Heads stay side by side: no split/merge copies around the kernel.
            let (q, k, v, h, s) = (&query, &key, &value, self.heads, self.scale);
            let xs = if self.to_q.is_bf16() {
                crate::kernels::attention_bf16_heads(q, k, v, h, s)?
            } else {
                crate::kernels::attention_heads(q, k, v, h, s)?
            };
            return self.to_out.forward_add(&xs, residual);
        }
        let query = self.reshape_heads_to_batch_dim(&query)?;
        let key = self.reshape_heads_to_batch_dim(&key)?;
        let value = self.reshape_heads_to_batch_dim(&value)?;
        let dim0 = query.dim(0)?;
        let slice_size = self.slice_size.filter(|&slice_size| dim0 >= slice_size);
        let xs = match slice_size {
            None => self.attention(&query, &key, &value)?,
            Some(slice_size) => self.sliced_attention(&query, &key, &value, slice_size)?,
        };
        self.to_out.forward_add(&xs, residual)
    }
}

/// A basic Transformer block.
#[derive(Debug)]
struct BasicTransformerBlock {
    attn1: CrossAttention,
    ff: FeedForward,
    attn2: CrossAttention,
    norm1: nn::LayerNorm,
    norm2: nn::LayerNorm,
    norm3: nn::LayerNorm,
}

impl BasicTransformerBlock {
    fn new(
        vs: nn::VarBuilder,
        dim: usize,
        n_heads: usize,
        d_head: usize,
        context_dim: Option<usize>,
        sliced_attention_size: Option<usize>,
        use_flash_attn: bool,
    ) -> Result<Self> {
        let attn1 = CrossAttention::new(
            vs.pp("attn1"),
            dim,
            None,
            n_heads,
            d_head,
            sliced_attention_size,
            use_flash_attn,
        )?;
        let ff = FeedForward::new(vs.pp("ff"), dim, None, 4)?;
        let attn2 = CrossAttention::new(
            vs.pp("attn2"),
            dim,
            context_dim,
            n_heads,
            d_head,
            sliced_attention_size,
            use_flash_attn,
        )?;
        let norm1 = crate::kernels::layer_norm(dim, 1e-5, vs.pp("norm1"))?;
        let norm2 = crate::kernels::layer_norm(dim, 1e-5, vs.pp("norm2"))?;
        let norm3 = crate::kernels::layer_norm(dim, 1e-5, vs.pp("norm3"))?;
        Ok(Self {
            attn1,
            ff,
            attn2,
            norm1,
            norm2,
            norm3,
        })
    }

    fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        use crate::kernels::clip::apply_layer_norm as ln;
        // Each residual is added inside the projection that ends its branch.
        let xs = self
            .attn1
            .forward_add(&ln(&self.norm1, xs)?, None, Some(xs))?;
        // A context with more rows than the latents (a guided step: one latent, the negative
        // and the positive prompt) is where the two stop being the same: everything up to
        // here ran once per latent, the rest runs once per context.
        let xs = match context {
            Some(c) => super::repeat_batch(&xs, c.dim(0)?)?,
            None => xs,
        };
        let xs = self
            .attn2
            .forward_add(&ln(&self.norm2, &xs)?, context, Some(&xs))?;
        self.ff.forward_add(&ln(&self.norm3, &xs)?, &xs)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SpatialTransformerConfig {
    pub depth: usize,
    pub num_groups: usize,
    pub context_dim: Option<usize>,
    pub sliced_attention_size: Option<usize>,
    pub use_linear_projection: bool,
}

impl Default for SpatialTransformerConfig {
    fn default() -> Self {
        Self {
            depth: 1,
            num_groups: 32,
            context_dim: None,
            sliced_attention_size: None,
            use_linear_projection: false,
        }
    }
}

#[derive(Debug)]
enum Proj {
    Conv2d(crate::kernels::Conv2d),
    Linear(crate::kernels::Linear),
}

// Aka Transformer2DModel
#[derive(Debug)]
pub struct SpatialTransformer {
    norm: crate::kernels::GroupNorm,
    proj_in: Proj,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
    pub config: SpatialTransformerConfig,
}

impl SpatialTransformer {
    pub fn new(
        vs: nn::VarBuilder,
        in_channels: usize,
        n_heads: usize,
        d_head: usize,
        use_flash_attn: bool,
        config: SpatialTransformerConfig,
    ) -> Result<Self> {
        let inner_dim = n_heads * d_head;
        let norm = crate::kernels::group_norm(config.num_groups, in_channels, 1e-6, vs.pp("norm"))?;
        let proj_in = if config.use_linear_projection {
            Proj::Linear(crate::kernels::linear(
                in_channels,
                inner_dim,
                vs.pp("proj_in"),
            )?)
        } else {
            Proj::Conv2d(crate::kernels::conv2d(
                in_channels,
                inner_dim,
                1,
                Default::default(),
                vs.pp("proj_in"),
            )?)
        };
        let mut transformer_blocks = vec![];
        let vs_tb = vs.pp("transformer_blocks");
        for index in 0..config.depth {
            let tb = BasicTransformerBlock::new(
                vs_tb.pp(index.to_string()),
                inner_dim,
                n_heads,
                d_head,
                config.context_dim,
                config.sliced_attention_size,
                use_flash_attn,
            )?;
            transformer_blocks.push(tb)
        }
        let proj_out = if config.use_linear_projection {
            Proj::Linear(crate::kernels::linear(
                in_channels,
                inner_dim,
                vs.pp("proj_out"),
            )?)
        } else {
            Proj::Conv2d(crate::kernels::conv2d(
                inner_dim,
                in_channels,
                1,
                Default::default(),
                vs.pp("proj_out"),
            )?)
        };
        Ok(Self {
            norm,
            proj_in,
            transformer_blocks,
            proj_out,
            config,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (batch, _channel, height, weight) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let xs = match &self.proj_in {
            // NCHW → (batch, pixels, channels) with easel's parallel transpose (candle's
            // strided copy runs on one thread).
            Proj::Conv2d(p) => {
                let xs = p.forward(&xs)?;
                let c = xs.dim(1)?;
                crate::kernels::transpose_batched(&xs.reshape((batch, c, height * weight))?)?
            }
            Proj::Linear(p) => {
                let c = xs.dim(1)?;
                p.forward(&crate::kernels::transpose_batched(&xs.reshape((
                    batch,
                    c,
                    height * weight,
                ))?)?)?
            }
        };
        let mut xs = xs;
        for block in self.transformer_blocks.iter() {
            xs = block.forward(&xs, context)?
        }
        // The blocks may have widened the batch to the context's (see BasicTransformerBlock).
        let batch = xs.dim(0)?;
        let residual = &super::repeat_batch(residual, batch)?;
        let to_nchw = |xs: &Tensor| -> Result<Tensor> {
            let c = xs.dim(2)?;
            crate::kernels::transpose_batched(xs)?.reshape((batch, c, height, weight))
        };
        match &self.proj_out {
            // The residual added by the 1×1 convolution as it writes its output.
            Proj::Conv2d(p) => {
                let e = crate::kernels::Epilogue {
                    shift: None,
                    residual: Some(residual),
                };
                p.forward_with(&to_nchw(&xs)?, e)
            }
            Proj::Linear(p) => to_nchw(&p.forward(&xs)?)? + residual,
        }
    }
}

/// Configuration for an attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionBlockConfig {
    pub num_head_channels: Option<usize>,
    pub num_groups: usize,
    pub rescale_output_factor: f64,
    pub eps: f64,
}

impl Default for AttentionBlockConfig {
    fn default() -> Self {
        Self {
            num_head_channels: None,
            num_groups: 32,
            rescale_output_factor: 1.,
            eps: 1e-5,
        }
    }
}

#[derive(Debug)]
pub struct AttentionBlock {
    group_norm: crate::kernels::GroupNorm,
    query: crate::kernels::Linear,
    key: crate::kernels::Linear,
    value: crate::kernels::Linear,
    proj_attn: crate::kernels::Linear,
    channels: usize,
    num_heads: usize,
    config: AttentionBlockConfig,
}

// In the .safetensor weights of official Stable Diffusion 3 Medium Huggingface repo
// https://huggingface.co/stabilityai/stable-diffusion-3-medium
// Linear layer may use a different dimension for the weight in the linear, which is
// incompatible with the current implementation of the nn::linear constructor.
// This is a workaround to handle the different dimensions.
fn get_qkv_linear(channels: usize, vs: nn::VarBuilder) -> Result<crate::kernels::Linear> {
    match vs.get((channels, channels), "weight") {
        Ok(_) => crate::kernels::linear(channels, channels, vs),
        Err(_) => {
            let weight = vs
                .get((channels, channels, 1, 1), "weight")?
                .reshape((channels, channels))?;
            let bias = vs.get((channels,), "bias")?;
            crate::kernels::Linear::new(nn::Linear::new(weight, Some(bias)))
        }
    }
}

impl AttentionBlock {
    pub fn new(vs: nn::VarBuilder, channels: usize, config: AttentionBlockConfig) -> Result<Self> {
        let num_head_channels = config.num_head_channels.unwrap_or(channels);
        let num_heads = channels / num_head_channels;
        let group_norm = crate::kernels::group_norm(
            config.num_groups,
            channels,
            config.eps,
            vs.pp("group_norm"),
        )?;
        let (q_path, k_path, v_path, out_path) = if vs.contains_tensor("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        let query = get_qkv_linear(channels, vs.pp(q_path))?;
        let key = get_qkv_linear(channels, vs.pp(k_path))?;
        let value = get_qkv_linear(channels, vs.pp(v_path))?;
        let proj_attn = get_qkv_linear(channels, vs.pp(out_path))?;
        Ok(Self {
            group_norm,
            query,
            key,
            value,
            proj_attn,
            channels,
            num_heads,
            config,
        })
    }

    fn transpose_for_scores(&self, xs: Tensor) -> Result<Tensor> {
        let (batch, t, h_times_d) = xs.dims3()?;
        xs.reshape((batch, t, self.num_heads, h_times_d / self.num_heads))?
            .transpose(1, 2)
    }
}

impl Module for AttentionBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let in_dtype = xs.dtype();
        let residual = xs;
        let (batch, channel, height, width) = xs.dims4()?;
        let xs = self
            .group_norm
            .forward(xs)?
            .reshape((batch, channel, height * width))?
            .transpose(1, 2)?;

        let query_proj = self.query.forward(&xs)?;
        let key_proj = self.key.forward(&xs)?;
        let value_proj = self.value.forward(&xs)?;

        let (b, t, _) = query_proj.dims3()?;
        let h = self.num_heads;
        let flat = |x: Tensor| -> Result<Tensor> {
            let d = x.dim(2)? / h;
            self.transpose_for_scores(x)?.reshape((b * h, t, d))
        };
        let (q, k, v) = (flat(query_proj)?, flat(key_proj)?, flat(value_proj)?);
        let scale = f64::powf(self.channels as f64 / self.num_heads as f64, -0.5);
        let xs = if self.query.is_bf16() {
            crate::kernels::attention_bf16(&q, &k, &v, scale)?
        } else {
            crate::kernels::attention(&q, &k, &v, scale)?
        };
        let xs = xs.reshape((b, h, t, xs.dim(2)?))?;
        let xs = xs.to_dtype(in_dtype)?;
        let xs = xs.transpose(1, 2)?.contiguous()?;
        let xs = xs.flatten_from(D::Minus2)?;
        let xs = self
            .proj_attn
            .forward(&xs)?
            .t()?
            .reshape((batch, channel, height, width))?;
        crate::kernels::scaled_sum(&xs, residual, self.config.rescale_output_factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn chunked_feed_forward_equals_whole() -> Result<()> {
        let vm = nn::VarMap::new();
        let vs = nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let ff = FeedForward::new(vs, 8, None, 4)?;
        let x = Tensor::randn(0f32, 1.0, (2, 13, 8), &Device::Cpu)?;
        let whole = ff.forward_in_chunks(&x, usize::MAX)?;
        // The residual as the transformer block adds it: inside the last projection, per chunk.
        let r = Tensor::randn(0f32, 1.0, (2, 13, 8), &Device::Cpu)?;
        let with_r = (&whole + &r)?;
        for chunk in [1, 7, 26] {
            let got = ff.forward_in_chunks(&x, chunk)?;
            let err = crate::kernels::max_abs_diff(&got, &whole)?;
            assert!(err < 1e-5, "chunk {chunk}: {err}");
            let got = ff.chunks_with(&x, chunk, Some(&r))?;
            let err = crate::kernels::max_abs_diff(&got, &with_r)?;
            assert!(err < 1e-5, "chunk {chunk} + residual: {err}");
        }
        Ok(())
    }
}
