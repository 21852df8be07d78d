#!/usr/bin/env python3
"""Generate the committed parity fixtures for easel (see scripts/README.md).

Run from the repo root:
    /work/venv/bin/python scripts/make_fixtures.py                 # tests/fixtures/*
    /work/venv/bin/python scripts/make_fixtures.py --full-size DIR [--fp16-variant]

Everything is deterministic (fixed seeds, deterministic algorithms, float32, CPU).
"""
import argparse
import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

import diffusers  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.disable_progress_bar()

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures"
TOK_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]

# --------------------------------------------------------------------------------------
# Real SD v1.4 configs (CompVis/stable-diffusion-v1-4)
# --------------------------------------------------------------------------------------
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

SD14_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

SD14_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)

SD14_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    projection_dim=768,
)

# model_index.json exactly as on the hub (with safety checker / feature extractor entries)
SD14_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.2.2",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

# --------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------
TINY = {
    "tiny-a": dict(
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4,
            cross_attention_dim=8,
            norm_num_groups=8,
        ),
        vae=dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=32,
        ),
        text=dict(
            vocab_size=49408,
            hidden_size=8,
            intermediate_size=19,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
            projection_dim=8,
        ),
        unet_hw=(16, 16),
        vae_hw=(16, 16),
        runs=[
            dict(name="run0", scheduler="pndm", prompt="a landscape with mountains and a river",
                 negative_prompt="", steps=5, guidance=7.5, width=32, height=32, seed=42),
            dict(name="run1", scheduler="ddim", prompt="a red cube", negative_prompt="blurry",
                 steps=4, guidance=7.5, width=32, height=32, seed=7),
            dict(name="run2", scheduler="pndm", prompt="a cat", negative_prompt=None,
                 steps=3, guidance=1.0, width=32, height=32, seed=3),
        ],
    ),
    "tiny-b": dict(
        unet=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=[2, 4, 8],
            use_linear_projection=True,
            cross_attention_dim=4,
            norm_num_groups=8,
        ),
        vae=dict(
            block_out_channels=(8, 16, 16),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=4,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            sample_size=32,
        ),
        text=dict(
            vocab_size=49408,
            hidden_size=4,
            intermediate_size=10,
            num_hidden_layers=3,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
            projection_dim=4,
        ),
        unet_hw=(8, 12),
        vae_hw=(8, 12),
        runs=[
            dict(name="run0", scheduler="pndm", prompt="a photo of a dog", negative_prompt="low quality",
                 steps=3, guidance=7.5, width=48, height=32, seed=1234),
            dict(name="run1", scheduler="ddim", prompt="Ünïcödé café, 🎨 art!", negative_prompt="",
                 steps=6, guidance=5.0, width=48, height=32, seed=99),
        ],
    ),
}

TEXT_PROMPTS = [
    "a landscape with mountains and a river",
    "",
    "A photo of an astronaut riding a horse on Mars, 4k, highly detailed",
]


# --------------------------------------------------------------------------------------
# 1. Tokenizer
# --------------------------------------------------------------------------------------
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def find_bpe_gz():
    import open_clip

    p = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    assert p.exists(), p
    return p


def write_tokenizer(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    text = gzip.open(find_bpe_gz()).read().decode("utf-8")
    lines = text.split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    assert len(merges) == 48894
    merges = [tuple(m.split()) for m in merges]
    assert all(len(m) == 2 for m in merges)
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    enc = {v: i for i, v in enumerate(vocab)}
    # hub vocab.json is compact JSON (no spaces), non-ASCII unescaped
    (out / "vocab.json").write_text(json.dumps(enc, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                    encoding="utf-8")

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    tok_cfg = {
        "add_prefix_space": False,
        "bos_token": added("<|startoftext|>"),
        "do_lower_case": True,
        "eos_token": added("<|endoftext|>"),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added("<|endoftext|>"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")

    def st(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    stm = {
        "bos_token": st("<|startoftext|>"),
        "eos_token": st("<|endoftext|>"),
        "pad_token": "<|endoftext|>",
        "unk_token": st("<|endoftext|>"),
    }
    (out / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")

    tok = CLIPTokenizer.from_pretrained(str(out))
    assert len(tok) == 49408, len(tok)
    assert tok.bos_token_id == 49406 and tok.eos_token_id == 49407 and tok.pad_token_id == 49407
    ids = tok("a photo of a cat").input_ids
    # known ids from openai/clip-vit-large-patch14
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    return tok


def link_tokenizer(dst: Path, src_rel_dir: str):
    """Replace dst/ with per-file relative symlinks to src_rel_dir/FILE (relative to dst)."""
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in TOK_FILES:
        os.symlink(f"{src_rel_dir}/{f}", dst / f)


# --------------------------------------------------------------------------------------
# 2. Tiny pipelines
# --------------------------------------------------------------------------------------
def build_pipeline(spec, tokenizer):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"])
    w = unet.conv_out.weight
    if torch.count_nonzero(w) == 0:
        with torch.no_grad():
            w.copy_(torch.randn_like(w) * 0.02)
    torch.manual_seed(1)
    vae = AutoencoderKL(**spec["vae"])
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text"]))
    scheduler = PNDMScheduler.from_config(SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe = pipe.to(torch.float32)
    for m in (unet, vae, text_encoder):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# transformers 5 saves CLIPTextModel tensors WITHOUT the "text_model." prefix (it strips it on load via
# conversion_mapping.PrefixChange); the real hub checkpoints (CompVis/stable-diffusion-v1-4, transformers 4.x)
# HAVE it. tiny-a and --full-size are rewritten to the hub layout; tiny-b keeps the transformers-5 layout so
# the loader is tested against both. transformers 5 loads either.
HUB_TEXT_PREFIX = "text_model."


def add_text_model_prefix(path: Path):
    from safetensors.torch import load_file

    sd = load_file(str(path))
    assert not any(k.startswith(HUB_TEXT_PREFIX) for k in sd)
    save_file({HUB_TEXT_PREFIX + k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def save_pipeline(pipe, out: Path, tok_link_rel=None, tok_src=None, hub_text_prefix=False):
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    if hub_text_prefix:
        add_text_model_prefix(out / "text_encoder" / "model.safetensors")
    # Replace whatever transformers wrote for the tokenizer with the hub-style files.
    if tok_link_rel is not None:
        link_tokenizer(out / "tokenizer", tok_link_rel)
    else:
        shutil.rmtree(out / "tokenizer")
        shutil.copytree(tok_src, out / "tokenizer")


# --------------------------------------------------------------------------------------
# 3. References
# --------------------------------------------------------------------------------------
def c(t):
    return t.detach().to("cpu").contiguous().clone()


def make_reference(name, spec, pipe):
    tensors = {}
    meta = {"name": name}
    H = spec["text"]["hidden_size"]

    with torch.no_grad():
        # text encoder
        ids = torch.stack([
            torch.tensor(pipe.tokenizer(p, padding="max_length", max_length=77, truncation=True).input_ids,
                         dtype=torch.int64) for p in TEXT_PROMPTS
        ])
        emb = pipe.text_encoder(ids)[0]
        tensors["text.input_ids"] = c(ids)
        tensors["text.embeds"] = c(emb.float())
        meta["prompts"] = TEXT_PROMPTS

        # unet
        h, w = spec["unet_hw"]
        g = torch.Generator("cpu").manual_seed(1000)
        sample = torch.randn((2, 4, h, w), generator=g)
        ehs = torch.randn((2, 77, spec["unet"]["cross_attention_dim"]), generator=g)
        out = pipe.unet(sample, 981, encoder_hidden_states=ehs).sample
        out_t = pipe.unet(sample, torch.tensor([981.0]), encoder_hidden_states=ehs).sample
        assert torch.equal(out, out_t)
        tensors["unet.sample"] = c(sample)
        tensors["unet.timestep"] = torch.tensor([981.0], dtype=torch.float32)
        tensors["unet.encoder_hidden_states"] = c(ehs)
        tensors["unet.out"] = c(out)
        assert out.abs().max() > 1e-3, "unet output trivially zero"

        # vae decode
        vh, vw = spec["vae_hw"]
        g = torch.Generator("cpu").manual_seed(2000)
        lat = torch.randn((1, 4, vh, vw), generator=g)
        dec = pipe.vae.decode(lat).sample
        tensors["vae.latents"] = c(lat)
        tensors["vae.out"] = c(dec)

    f = pipe.vae_scale_factor
    meta["vae_scale_factor"] = f
    meta["vae_scaling_factor"] = pipe.vae.config.scaling_factor
    meta["unet"] = {
        "sample_shape": list(tensors["unet.sample"].shape),
        "encoder_hidden_states_shape": list(tensors["unet.encoder_hidden_states"].shape),
        "timestep": 981.0,
        "out_shape": list(tensors["unet.out"].shape),
    }
    meta["vae"] = {"latents_shape": list(tensors["vae.latents"].shape),
                   "out_shape": list(tensors["vae.out"].shape)}
    meta["text"] = {"input_ids_shape": list(tensors["text.input_ids"].shape),
                    "embeds_shape": list(tensors["text.embeds"].shape), "hidden_size": H}

    pndm = pipe.scheduler
    runs_meta = []
    for r in spec["runs"]:
        if r["scheduler"] == "ddim":
            pipe.scheduler = DDIMScheduler.from_config(pndm.config)
        else:
            pipe.scheduler = PNDMScheduler.from_config(pndm.config)
        Hh, Ww, seed = r["height"], r["width"], r["seed"]
        do_cfg = r["guidance"] > 1.0

        def run(latents=None):
            rec = {"latents": [], "prompt_embeds": None}

            def cb(p, i, t, kw):
                rec["latents"].append(kw["latents"].clone())
                if i == 0:
                    rec["prompt_embeds"] = kw["prompt_embeds"].clone()
                return kw

            img = pipe(
                r["prompt"], negative_prompt=r["negative_prompt"], num_inference_steps=r["steps"],
                guidance_scale=r["guidance"], height=Hh, width=Ww,
                generator=torch.Generator("cpu").manual_seed(seed), latents=latents, output_type="np",
                callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
            ).images
            return img, rec

        with torch.no_grad():
            img, rec = run()
            timesteps = [int(t) for t in pipe.scheduler.timesteps]
            init = torch.randn((1, 4, Hh // f, Ww // f), generator=torch.Generator("cpu").manual_seed(seed))
            img2, rec2 = run(latents=init.clone())
            assert np.array_equal(img, img2), "init latents mismatch"
            for a, b in zip(rec["latents"], rec2["latents"]):
                assert torch.equal(a, b)
            # prompt embeds: check against encode_prompt concatenated as the pipeline does
            pe, npe = pipe.encode_prompt(r["prompt"], "cpu", 1, do_cfg, r["negative_prompt"])
            expect = torch.cat([npe, pe]) if do_cfg else pe
            assert torch.equal(expect, rec["prompt_embeds"]), "prompt_embeds mismatch"
            assert rec["prompt_embeds"].shape[0] == (2 if do_cfg else 1)

        n = r["name"]
        assert len(rec["latents"]) == len(timesteps)
        tensors[f"{n}.init_latents"] = c(init)
        tensors[f"{n}.prompt_embeds"] = c(rec["prompt_embeds"])
        tensors[f"{n}.latents"] = c(torch.stack(rec["latents"]))
        tensors[f"{n}.image_float"] = c(torch.from_numpy(np.ascontiguousarray(img[0])).float())
        tensors[f"{n}.image"] = torch.from_numpy((img[0] * 255).round().astype(np.uint8)).contiguous()
        m = dict(r)
        m["num_unet_calls"] = len(timesteps)
        m["timesteps"] = timesteps
        m["init_noise_sigma"] = float(pipe.scheduler.init_noise_sigma)
        m["do_classifier_free_guidance"] = do_cfg
        m["eta"] = 0.0
        runs_meta.append(m)
    pipe.scheduler = pndm
    meta["runs"] = runs_meta
    if name == "tiny-a":
        meta["scheduler_runs"] = make_scheduler_runs(pipe, tensors)
    meta["versions"] = versions()
    meta["tensors"] = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                       for k, v in sorted(tensors.items())}

    ref = FIX / "reference"
    ref.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(ref / f"{name}.safetensors"))
    (ref / f"{name}.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_scheduler_runs(pipe, tensors):
    """One seeded end-to-end run per easel sampler (the same class + overrides as
    SchedulerKind::build, shared with make_scheduler_fixtures.py). Stochastic samplers draw
    their noise from the pipeline's generator after the initial latents, as easel does."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_scheduler_fixtures import KINDS

    original = pipe.scheduler
    out = []
    for i, (kind, (cls, overrides)) in enumerate(KINDS.items()):
        pipe.scheduler = cls.from_config(original.config, **overrides)
        steps, seed, W, H = 4, 500 + i, 32, 32
        rec = []

        def cb(p, step, t, kw):
            rec.append(kw["latents"].clone())
            return kw

        with torch.no_grad():
            img = pipe("a lighthouse on a cliff", negative_prompt="fog", num_inference_steps=steps,
                       guidance_scale=7.5, height=H, width=W,
                       generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                       callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"]).images
        n = f"sched-{kind}"
        tensors[f"{n}.latents"] = torch.stack(rec).contiguous()
        tensors[f"{n}.image"] = torch.from_numpy((img[0] * 255).round().astype(np.uint8)).contiguous()
        out.append({"name": n, "scheduler": kind, "prompt": "a lighthouse on a cliff", "negative_prompt": "fog",
                    "steps": steps, "guidance": 7.5, "width": W, "height": H, "seed": seed,
                    "timesteps": [float(t) for t in pipe.scheduler.timesteps],
                    "init_noise_sigma": float(pipe.scheduler.init_noise_sigma)})
    pipe.scheduler = original
    return out


def versions():
    import open_clip

    return {"diffusers": diffusers.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__,
            "numpy": np.__version__, "open_clip_torch": open_clip.__version__}


# --------------------------------------------------------------------------------------
# 4. Tokenizer cases
# --------------------------------------------------------------------------------------
TOKENIZER_CASES = [
    "a photo of a cat",
    "a landscape with mountains and a river",
    "A photo of an astronaut riding a horse on Mars, 4k, highly detailed",
    "A BEAUTIFUL SUNSET OVER THE OCEAN",
    "MiXeD CaSe PrOmPt WiTh WeIrD cApS",
    "café naïve Über résumé façade",
    "niño mañana straße øresund",
    "Ελληνικά γράμματα αβγ",
    "Привет мир, кошка",
    "你好世界",
    "日本語のテキスト、こんにちは",
    "한국어 텍스트 안녕하세요",
    "مرحبا بالعالم",
    "🎨🔥",
    "a family 👨‍👩‍👧‍👦 at the beach",
    "wow...!!!",
    "(((masterpiece))), best quality",
    "[foo:bar:0.5]",
    "1024x768",
    "3.14159",
    "the year 2024",
    "they're it's don't I'LL we've she'd",
    "tab\tseparated\twords",
    "line one\nline two\r\nline three",
    "multiple     spaces   between",
    "   leading and trailing spaces   ",
    "non\u00a0breaking\u00a0space",
    "",
    " ",
    ", ".join(["red"] * 60),
    " ".join(f"word{i % 17} and" if i % 3 == 0 else ["forest", "castle", "dragon", "cloud", "river"][i % 5]
             for i in range(200)),
    "text with <|endoftext|> inside",
    "<|startoftext|>hello<|endoftext|>",
    "salt &amp; pepper &lt;3",
    "https://example.com/a?b=c",
    "email me@example.org #hashtag @user",
    "under_score-hyphen/slash\\backslash",
    "quotes \"double\" 'single' `back`",
    "accents decomposed: cafe\u0301 nai\u0308ve",
    "fullwidth ＡＢＣ１２３",
    "ligature ﬁ ﬂ and ™ © ®",
    "snake_case_and_CamelCase",
]


def write_tokenizer_cases(tok):
    cases = []
    for t in TOKENIZER_CASES:
        ids = tok(t, padding="max_length", max_length=77, truncation=True).input_ids
        assert len(ids) == 77
        cases.append({"text": t, "ids": ids, "ids_untruncated": tok(t).input_ids})
    out = {"tokenizer_class": type(tok).__name__, "cases": cases}
    (FIX / "tokenizer_cases.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n",
                                              encoding="utf-8")


# --------------------------------------------------------------------------------------
# 5. Full-size configs + manifest
# --------------------------------------------------------------------------------------
def meta_models():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET)
        vae = AutoencoderKL(**SD14_VAE)
        te = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
    return unet, vae, te


def write_sd14_configs():
    out = FIX / "sd-v1-4"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    unet, vae, te = meta_models()
    unet.save_config(str(out / "unet"))
    vae.save_config(str(out / "vae"))
    te.config.architectures = ["CLIPTextModel"]
    te.config.dtype = "float32"
    te.config.save_pretrained(str(out / "text_encoder"))
    PNDMScheduler.from_config(SCHEDULER_CONFIG).save_config(str(out / "scheduler"))
    (out / "model_index.json").write_text(json.dumps(SD14_MODEL_INDEX, indent=2) + "\n")
    link_tokenizer(out / "tokenizer", "../../tiny-a/tokenizer")

    manifest = {}
    for key, m in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        sd = m.state_dict()
        if key == "text_encoder":
            sd = {HUB_TEXT_PREFIX + k: v for k, v in sd.items()}
            buffers = {HUB_TEXT_PREFIX + k: v for k, v in m.named_buffers()}
        else:
            buffers = dict(m.named_buffers())
        persistent_buffers = sorted(k for k in sd if k in buffers)
        non_persistent = sorted(k for k in buffers if k not in sd)
        manifest[key] = {
            "tensors": {k: list(v.shape) for k, v in sd.items()},
            "num_tensors": len(sd),
            "num_elements": int(sum(v.numel() for v in sd.values())),
            "persistent_buffers": persistent_buffers,
            "non_persistent_buffers": non_persistent,
        }
    manifest["notes"] = (
        "Names/shapes from state_dict() of meta-device models (diffusers/transformers versions below). "
        "text_encoder names carry the hub prefix 'text_model.' (transformers>=5 state_dict() has no prefix; "
        "hub CompVis/stable-diffusion-v1-4 files have it). Old hub text encoder files may additionally contain "
        "the int64 [1,77] buffer 'text_model.embeddings.position_ids' (non-persistent in current transformers); "
        "a loader should ignore it. No dtype: real hub weights are float32 (fp16 variant: float16)."
    )
    manifest["versions"] = versions()
    (FIX / "sd-v1-4-manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# --------------------------------------------------------------------------------------
# 6. Full-size random pipeline
# --------------------------------------------------------------------------------------
def write_full_size(out: Path, fp16_variant: bool):
    t0 = time.time()
    tok = CLIPTokenizer.from_pretrained(str(FIX / "tiny-a" / "tokenizer"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD14_UNET)
    vae = AutoencoderKL(**SD14_VAE)
    te = CLIPTextModel(CLIPTextConfig(**SD14_TEXT))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=PNDMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    print(f"[full-size] built in {time.time() - t0:.1f}s", flush=True)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    add_text_model_prefix(out / "text_encoder" / "model.safetensors")
    print(f"[full-size] fp32 saved at {time.time() - t0:.1f}s", flush=True)
    if fp16_variant:
        pipe.to(torch.float16)
        # save into a temp dir so the fp32 configs (text_encoder dtype) are not overwritten
        tmp = out.parent / (out.name + ".fp16tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        pipe.save_pretrained(str(tmp), safe_serialization=True, variant="fp16")
        for f in sorted(tmp.glob("*/*.fp16.safetensors")):
            shutil.move(str(f), str(out / f.parent.name / f.name))
        shutil.rmtree(tmp)
        add_text_model_prefix(out / "text_encoder" / "model.fp16.safetensors")
        print(f"[full-size] fp16 saved at {time.time() - t0:.1f}s", flush=True)
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(FIX / "tiny-a" / "tokenizer", out / "tokenizer")
    print(f"[full-size] done in {time.time() - t0:.1f}s -> {out}", flush=True)


# --------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--full-size", metavar="OUT_DIR", help="write a full-size random SD v1.4 pipeline")
    ap.add_argument("--fp16-variant", action="store_true", help="with --full-size: also *.fp16.safetensors")
    args = ap.parse_args()

    if args.full_size:
        assert (FIX / "tiny-a" / "tokenizer" / "vocab.json").exists(), "run without --full-size first"
        write_full_size(Path(args.full_size), args.fp16_variant)
        return

    t0 = time.time()
    FIX.mkdir(parents=True, exist_ok=True)
    tok_dir = FIX / "_tokenizer_tmp"
    tok = write_tokenizer(tok_dir)
    print(f"tokenizer class: {type(tok).__name__} ({time.time() - t0:.1f}s)", flush=True)

    for name, spec in TINY.items():
        built = pipe = build_pipeline(spec, tok)
        if name == "tiny-a":
            save_pipeline(pipe, FIX / name, tok_src=tok_dir, hub_text_prefix=True)
        else:
            save_pipeline(pipe, FIX / name, tok_link_rel="../../tiny-a/tokenizer")
        # reload from disk to make sure the layout loads and outputs come from the saved weights
        pipe = StableDiffusionPipeline.from_pretrained(str(FIX / name), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        for a, b in zip(built.text_encoder.state_dict().values(), pipe.text_encoder.state_dict().values()):
            assert torch.equal(a, b), "text encoder did not round-trip"
        assert pipe.safety_checker is None
        assert type(pipe.scheduler).__name__ == "PNDMScheduler"
        make_reference(name, spec, pipe)
        if name == "tiny-a":
            write_tokenizer_cases(pipe.tokenizer)
        print(f"{name} done ({time.time() - t0:.1f}s)", flush=True)
    shutil.rmtree(tok_dir)

    write_sd14_configs()
    print(f"all done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
