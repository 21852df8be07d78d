//! Prompt → text embeddings: the CLIP BPE tokenizer and the CLIP text transformer.
//!
//! The encoder is easel's own rather than candle-transformers' `clip` module, because that
//! one hard-codes its configs (private fields), requires the `text_model.` prefix, and
//! breaks for batch sizes other than its head count (its causal mask is built per batch
//! and then added to a per-head tensor). This one reads `config.json`, accepts both tensor
//! layouts, and encodes the negative and positive prompt in one batch.

use crate::config::TextEncoderConfig;
use crate::kernels::clip;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

/// CLIP's pre-tokenisation pattern (transformers' `CLIPTokenizer`).
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// A prompt as token ids, padded to the encoder's context length.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    /// `context_length` ids: BOS, the prompt's tokens, EOS, then padding.
    pub ids: Vec<u32>,
    /// The part of the prompt that did not fit, if any (diffusers warns about it too).
    pub truncated: Option<String>,
}

/// The CLIP BPE tokenizer, giving exactly the ids of transformers' `CLIPTokenizer`.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    context_length: usize,
}

impl ClipTokenizer {
    /// Loads `tokenizer.json` when the folder has one, else builds the tokenizer from
    /// `vocab.json` + `merges.txt` exactly as transformers converts CLIP's slow tokenizer.
    pub fn from_dir(dir: &Path, context_length: usize) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let tokenizer = if json.is_file() {
            let mut t = Tokenizer::from_file(&json)
                .map_err(|e| anyhow!("cannot load {}: {e}", json.display()))?;
            // easel adds BOS/EOS and pads itself.
            t.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
            t.with_padding(None);
            t.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
            t
        } else {
            Self::build(&dir.join("vocab.json"), &dir.join("merges.txt"))?
        };
        let id = |tok: &str| {
            tokenizer
                .token_to_id(tok)
                .ok_or_else(|| anyhow!("the tokenizer in {} has no {tok} token", dir.display()))
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        let pad = match pad_token(dir)? {
            Some(tok) => id(&tok)?,
            None => eos,
        };
        Ok(Self {
            tokenizer,
            bos,
            eos,
            pad,
            context_length,
        })
    }

    fn build(vocab: &Path, merges: &Path) -> Result<Tokenizer> {
        for f in [vocab, merges] {
            if !f.is_file() {
                bail!("tokenizer file {} is missing", f.display());
            }
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .unk_token(EOS.into())
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| anyhow!("cannot load the BPE vocabulary {}: {e}", vocab.display()))?;
        let mut t = Tokenizer::new(bpe);
        let replace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| anyhow!("{e}"))?;
        t.with_normalizer(Some(NormalizerSequence::new(vec![
            NormalizerWrapper::from(NFC),
            NormalizerWrapper::from(replace),
            NormalizerWrapper::from(Lowercase),
        ])));
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| anyhow!("{e}"))?;
        t.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::from(split),
            PreTokenizerWrapper::from(ByteLevel::new(false, true, true)),
        ])));
        // transformers treats the special tokens as atomic even inside prompt text.
        t.add_special_tokens(&[AddedToken::from(BOS, true), AddedToken::from(EOS, true)]);
        Ok(t)
    }

    /// Token ids for `text`, truncated and padded to the context length.
    pub fn encode(&self, text: &str) -> Result<TokenizedPrompt> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize the prompt: {e}"))?;
        let body = enc.get_ids();
        let room = self.context_length.saturating_sub(2);
        let (kept, dropped) = body.split_at(body.len().min(room));
        let mut ids = Vec::with_capacity(self.context_length);
        ids.push(self.bos);
        ids.extend_from_slice(kept);
        ids.push(self.eos);
        ids.resize(self.context_length, self.pad);
        let truncated = (!dropped.is_empty()).then(|| self.decode(dropped));
        Ok(TokenizedPrompt { ids, truncated })
    }

    /// Text for token ids (for the truncation warning): byte-level decoding with the
    /// end-of-word marker turned back into a space.
    pub fn decode(&self, ids: &[u32]) -> String {
        let table = byte_decoder();
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(tok) = self.tokenizer.id_to_token(id) else {
                continue;
            };
            let (word, end) = match tok.strip_suffix("</w>") {
                Some(w) => (w, true),
                None => (tok.as_str(), false),
            };
            bytes.extend(word.chars().filter_map(|c| table.get(&c).copied()));
            if end {
                bytes.push(b' ');
            }
        }
        String::from_utf8_lossy(&bytes).trim_end().to_string()
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }
}

/// GPT-2's byte ↔ unicode table, inverted.
fn byte_decoder() -> std::collections::HashMap<char, u8> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .filter_map(|(b, c)| char::from_u32(c).map(|c| (c, b as u8)))
        .collect()
}

/// The padding token named in `tokenizer_config.json` / `special_tokens_map.json`
/// (SD 1.x pads with `<|endoftext|>`, SD 2.x with `!`).
fn pad_token(dir: &Path) -> Result<Option<String>> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        let v: serde_json::Value = crate::config::read_json(&path)?;
        match v.get("pad_token") {
            Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
            Some(serde_json::Value::Object(o)) => {
                if let Some(serde_json::Value::String(s)) = o.get("content") {
                    return Ok(Some(s.clone()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
}

struct Attention {
    /// The q, k and v projections stacked into one (3·hidden × hidden) linear: one GEMM
    /// instead of three, and its output is what the causal-attention kernel reads.
    qkv: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    /// `residual + attention(xs)`, the residual added inside the output projection.
    fn forward(&self, xs: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        let o = clip::causal_self_attention(&fused(&self.qkv, xs, None, None)?, self.heads)?;
        fused(&self.out, &o, None, Some(residual))
    }
}

/// `act(l(xs)) + residual`, fused into the GEMM on the CPU (see [`clip::linear`]).
fn fused(
    l: &Linear,
    xs: &Tensor,
    act: Option<Activation>,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let epilogue = match act {
        None => clip::Epilogue::None,
        Some(Activation::QuickGelu) => clip::Epilogue::QuickGelu,
        // No fused kernel for erf-GELU (CLIP variants other than SD 1.x's).
        Some(Activation::Gelu) => {
            let y = l.forward(xs)?.gelu_erf()?;
            return match residual {
                Some(r) => y + r,
                None => Ok(y),
            };
        }
    };
    clip::linear(xs, l.weight(), l.bias(), epilogue, residual)
}

/// `ln(xs)` through easel's kernel (see [`clip::layer_norm`]).
fn norm(ln: &LayerNorm, xs: &Tensor) -> candle_core::Result<Tensor> {
    clip::apply_layer_norm(ln, xs)
}

/// One linear computing `[a | b | c]` for linears `a`, `b`, `c` on the same input.
fn stack_linears(parts: &[Linear]) -> candle_core::Result<Linear> {
    let weights: Vec<&Tensor> = parts.iter().map(|l| l.weight()).collect();
    let biases = parts
        .iter()
        .map(|l| l.bias().cloned())
        .collect::<Option<Vec<_>>>();
    let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
    Ok(Linear::new(Tensor::cat(&weights, 0)?, bias))
}

/// The same linear with its weight stored transposed, (in × out) row-major behind a
/// transposed view, so `weightᵀ` is a plain row-major matrix: the layout gemm multiplies
/// fastest for these shapes (measured ~15% faster than the (out × in) layout as loaded).
fn transposed_storage(l: Linear) -> candle_core::Result<Linear> {
    if !l.weight().device().is_cpu() {
        return Ok(l);
    }
    let w = crate::kernels::transpose(l.weight())?.t()?;
    Ok(Linear::new(w, l.bias().cloned()))
}

struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.attn.forward(&norm(&self.ln1, xs)?, xs)?;
        let m = fused(&self.fc1, &norm(&self.ln2, &h)?, Some(self.act), None)?;
        fused(&self.fc2, &m, None, Some(&h))
    }
}

/// CLIP's text transformer (transformers' `CLIPTextModel`), returning the last hidden state
/// after the final layer norm, which is what Stable Diffusion conditions on.
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    max_positions: usize,
}

impl ClipTextModel {
    /// Builds the model; tensors may be named with or without the `text_model.` prefix
    /// (the hub's SD v1.4 file has it, transformers 5's `save_pretrained` drops it).
    pub fn new(vb: VarBuilder, cfg: &TextEncoderConfig) -> Result<Self> {
        cfg.validate()?;
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let token_embedding = embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, h), "weight")?;
        let act = match cfg.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            _ => Activation::QuickGelu,
        };
        let ln = |vb: VarBuilder| layer_norm(h, cfg.layer_norm_eps, vb);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let vb = vb.pp(format!("encoder.layers.{i}"));
                let a = vb.pp("self_attn");
                let qkv = stack_linears(&[
                    linear(h, h, a.pp("q_proj"))?,
                    linear(h, h, a.pp("k_proj"))?,
                    linear(h, h, a.pp("v_proj"))?,
                ])?;
                Ok(EncoderLayer {
                    ln1: ln(vb.pp("layer_norm1"))?,
                    attn: Attention {
                        qkv: transposed_storage(qkv)?,
                        out: transposed_storage(linear(h, h, a.pp("out_proj"))?)?,
                        heads: cfg.num_attention_heads,
                    },
                    ln2: ln(vb.pp("layer_norm2"))?,
                    fc1: transposed_storage(linear(h, cfg.intermediate_size, vb.pp("mlp.fc1"))?)?,
                    fc2: transposed_storage(linear(cfg.intermediate_size, h, vb.pp("mlp.fc2"))?)?,
                    act,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = ln(vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// `ids`: (batch, seq) u32 → (batch, seq, hidden).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, s) = ids.dims2()?;
        if s > self.max_positions {
            bail!(
                "{s} tokens exceed the text encoder's {} positions",
                self.max_positions
            );
        }
        let pos = self.position_embedding.narrow(0, 0, s)?;
        let mut xs = self.token_embedding.forward(ids)?.broadcast_add(&pos)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        Ok(norm(&self.final_layer_norm, &xs)?)
    }

    /// Embeddings for already-tokenized prompts (one row each).
    pub fn encode(&self, prompts: &[&TokenizedPrompt], device: &Device) -> Result<Tensor> {
        let s = prompts
            .first()
            .map(|p| p.ids.len())
            .context("no prompt to encode")?;
        let ids: Vec<u32> = prompts.iter().flat_map(|p| p.ids.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (prompts.len(), s), device)?;
        self.forward(&ids)
    }
}
