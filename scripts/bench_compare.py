#!/usr/bin/env python3
"""Times easel and diffusers on the same machine, in one run, on the same diffusers-layout folder
(e.g. a full-size random-weight SD v1.4 made by `scripts/make_fixtures.py --full-size`), and prints
easel/diffusers ratios. Every measurement runs in its own process so peak RSS is per measurement.

    python scripts/bench_compare.py /work/fullsize [--threads 2] [--iters 3] [--rounds 2] [--size 512] [--only unet,vae]

Rows (`--only`): unet, unet-bf16 (one UNet forward, batch 2), step, step-bf16 (the UNet call of a
guided step: one latent and two prompts; diffusers repeats the latent, easel shares the layers
before the first cross-attention), vae, vae-bf16, text, e2e, e2e-bf16.

With `--rounds R` each case runs R times on each side, alternating easel and diffusers (and
which goes first), and keeps each side's fastest iteration: on shared VMs the matrix units' rate
swings ~3x within seconds (`EASEL_AMXBENCH_PEAK=1 cargo run --release --example amxbench`), and
alternating gives both sides the same chances at a quiet spell.

The easel side is `examples/sdbench.rs`, built here with `cargo build --release --example sdbench`.
"""
import argparse, json, os, platform, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PY_CHILD = r'''
import json, resource, sys, time, torch
mode, folder, size, batch, iters, dtype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7])
torch.set_num_threads(threads)
dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
from diffusers import UNet2DConditionModel, AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer
g = torch.Generator().manual_seed(0)
lat = size // 8
t0 = time.perf_counter()
need = {"unet": ["unet"], "step": ["unet"], "vae": ["vae"], "text": ["text"], "e2e": ["unet", "vae", "text"]}[mode]
unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dt).eval() if "unet" in need else None
vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dt).eval() if "vae" in need else None
te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dt).eval() if "text" in need else None
tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer") if "text" in need else None
load_s = time.perf_counter() - t0
latents = torch.randn((batch, 4, lat, lat), generator=g).to(dt)
ctx = torch.randn((batch, 77, 768), generator=g).to(dt)
def encode():
    ids = tok(["", "a photograph of an astronaut riding a horse"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    return te(ids)[0]
times = []
with torch.inference_mode():
    for _ in range(iters):
        t = time.perf_counter()
        if mode == "unet":
            unet(latents, 500, encoder_hidden_states=ctx)
        elif mode == "step":
            # StableDiffusionPipeline's guided step: the latent repeated once per prompt.
            x = latents[:1]
            unet(torch.cat([x] * batch), 500, encoder_hidden_states=ctx)
        elif mode == "vae":
            vae.decode(latents[:1] / vae.config.scaling_factor)
        elif mode == "text":
            encode()
        else:
            emb = encode()
            x = latents[:1]
            out = unet(torch.cat([x, x]), 500, encoder_hidden_states=emb).sample
            vae.decode(out[:1] / vae.config.scaling_factor)
        times.append(time.perf_counter() - t)
print(json.dumps({"mode": mode, "load_s": load_s, "times": times, "min_s": min(times),
                  "vmhwm_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
'''


def last_json(out):
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON in output:\n" + out)


def run(cmd, env):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        err = (r.stderr.strip().splitlines() or ["?"])[-1]
        sys.stderr.write(f"failed ({err}): {' '.join(cmd[:2])}\n")
        return None
    return last_json(r.stdout)


def merged(results):
    """One side's rounds as one result: its fastest iteration, its highest peak RSS."""
    ok = [r for r in results if r]
    if not ok:
        return None
    out = dict(min(ok, key=lambda r: r["min_s"]))
    out["times"] = [t for r in ok for t in r["times"]]
    out["vmhwm_kb"] = max(r["vmhwm_kb"] for r in ok)
    return out


def fmt_s(r):
    return f"{r['min_s']:.3f} s" if r else "unsupported"


def fmt_gb(r):
    return f"{r['vmhwm_kb']/1e6:.2f} GB" if r else "n/a"


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs per side, alternating easel and diffusers; the fastest counts")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--only", default="unet,unet-bf16,step,step-bf16,vae,vae-bf16,text,e2e,e2e-bf16")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--baseline-exe", help="an sdbench built from an older easel, timed as 'before'")
    args = ap.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    subprocess.run(["cargo", "build", "--release", "--example", "sdbench"], cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    exe = os.path.join(target, "release", "examples", "sdbench")
    cases = {
        "unet": ("unet", 2, "f32", args.iters), "unet-bf16": ("unet", 2, "bf16", args.iters),
        "step": ("step", 2, "f32", args.iters), "step-bf16": ("step", 2, "bf16", args.iters),
        "vae": ("vae", 1, "f32", args.iters), "vae-bf16": ("vae", 1, "bf16", args.iters), "text": ("text", 2, "f32", max(args.iters, 5)),
        "e2e": ("e2e", 1, "f32", 1), "e2e-bf16": ("e2e", 1, "bf16", 1),
    }
    rows = []
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} threads, "
          f"{args.size}x{args.size}, {args.folder}, {args.rounds} round(s) of {args.iters} "
          "iterations per side", flush=True)
    for name in args.only.split(","):
        mode, batch, dt, iters = cases[name]
        def easel():
            return run([exe, mode, args.folder, "--size", str(args.size), "--batch", str(batch),
                        "--iters", str(iters), "--dtype", dt], env)

        def diffusers():
            return run([args.python, "-c", PY_CHILD, mode, args.folder, str(args.size),
                        str(batch), str(iters), dt, str(args.threads)], env)
        es, ds = [], []
        for r in range(max(args.rounds, 1)):
            if r % 2 == 0:
                es.append(easel())
                ds.append(diffusers())
            else:
                ds.append(diffusers())
                es.append(easel())
        e, d = merged(es), merged(ds)
        base = None
        if args.baseline_exe:
            base = run([args.baseline_exe, mode, args.folder, "--size", str(args.size), "--batch",
                        str(batch), "--iters", str(min(iters, 2)), "--dtype", dt], env)
        rows.append((name, e, d, base))
        print(f"  {name:10s} easel {fmt_s(e)} {fmt_gb(e)} | diffusers {fmt_s(d)} {fmt_gb(d)}"
              + (f" | before {fmt_s(base)} {fmt_gb(base)}" if args.baseline_exe else ""), flush=True)
    print()
    b = bool(args.baseline_exe)
    print("| measurement | easel | diffusers | easel / diffusers |"
          + (" easel before | before / diffusers |" if b else ""))
    print("|---|---|---|---|" + ("---|---|" if b else ""))
    for name, e, d, base in rows:
        if name.startswith("e2e"):
            def ratio(x):
                return f"{x['vmhwm_kb']/d['vmhwm_kb']:.2f}x" if x and d else "n/a"
            line = (f"| peak RSS, {name} (one image: load + text + 1 UNet step + decode) | {fmt_gb(e)} | "
                    f"{fmt_gb(d)} | {ratio(e)} |")
            if b:
                line += f" {fmt_gb(base)} | {ratio(base)} |"
            # Wall time including loading: a one-image easel run loads the UNet and VAE inside
            # generation (lazily), diffusers before it, so only the sum compares.
            def wall(x):
                return x["load_s"] + x["min_s"] if x else None
            def fmt_w(x):
                return f"{wall(x):.3f} s" if x else "n/a"
            def wratio(x):
                return f"{wall(x)/wall(d):.2f}x" if x and d else "n/a"
            line += (f"\n| wall, {name} (load + text + 1 UNet step + decode) | {fmt_w(e)} | "
                     f"{fmt_w(d)} | {wratio(e)} |")
            if b:
                line += f" {fmt_w(base)} | {wratio(base)} |"
        else:
            def ratio(x):
                return f"{x['min_s']/d['min_s']:.2f}x" if x and d else "n/a"
            label = {"unet": "UNet forward f32, batch 2", "unet-bf16": "UNet forward bf16, batch 2",
                     "step": "UNet call of a guided step f32 (1 latent, 2 prompts)",
                     "step-bf16": "UNet call of a guided step bf16 (1 latent, 2 prompts)",
                     "vae": "VAE decode f32", "vae-bf16": "VAE decode bf16", "text": "text encoder f32, 2x77"}[name]
            line = f"| {label} | {fmt_s(e)} | {fmt_s(d)} | {ratio(e)} |"
            if b:
                line += f" {fmt_s(base)} | {ratio(base)} |"
        print(line)


if __name__ == "__main__":
    main()
