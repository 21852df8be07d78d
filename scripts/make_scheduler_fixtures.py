"""Records HF diffusers schedulers step by step, for tests/schedulers.rs.

Run from the repository root: `python scripts/make_scheduler_fixtures.py` (needs torch,
diffusers, scipy, safetensors). Writes tests/fixtures/schedulers/{index.json,cases.safetensors}.

Each case builds `Class.from_config(SD14_PNDM_CONFIG | spacing, **kind_overrides)` exactly as
easel's `SchedulerKind::build` does, runs the Stable Diffusion pipeline's denoising loop with a
deterministic fake UNet, and records what the UNet saw (timesteps, scaled inputs), what it
returned, every latent after `step`, and every noise tensor the scheduler drew.
"""

import inspect
import json
import os
import sys
import warnings

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_lcm,
)
from diffusers.utils import logging as dlogging

warnings.filterwarnings("ignore")
dlogging.set_verbosity_error()

OUT = "tests/fixtures/schedulers"
SHAPE = (1, 4, 4, 4)
STEPS = [1, 2, 3, 7, 8, 25, 50]
FEW = [1, 3, 8]

# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json, shared with make_fixtures.py.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import SCHEDULER_CONFIG as SD14  # noqa: E402

# easel CLI name -> (diffusers class, the overrides that define the sampler). Must agree with
# SchedulerKind::build.
KINDS = {
    "pndm": (PNDMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {"use_karras_sigmas": False}),
    "dpm++2m": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "dpm++2m-karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpm++2m-sde": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    ),
    "lms": (LMSDiscreteScheduler, {"use_karras_sigmas": False}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}

# Every noise tensor a scheduler draws goes through the randn_tensor its module imported;
# wrap it to record the draws so the Rust side can replay them in order.
DRAWS = []
for module in (
    scheduling_ddim,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_lcm,
):
    original = module.randn_tensor

    def recording(*args, _original=original, **kwargs):
        out = _original(*args, **kwargs)
        DRAWS.append(out.detach().clone().float())
        return out

    module.randn_tensor = recording


PATTERN = torch.arange(64, dtype=torch.float32).reshape(SHAPE) * 0.37


def fake_unet(model_input, t):
    """Deterministic stand-in for the UNet: depends on the input and the timestep."""
    return 0.8 * model_input + 0.1 * torch.sin(float(t) / 100.0 + PATTERN)


def timestep_value(t):
    """The number the UNet sees: float32 timesteps stay fractional, int64 ones are integers."""
    return float(t.item()) if t.is_floating_point() else float(int(t.item()))


def run_case(case_id, kind, steps, config_extra, eta, seed):
    cls, overrides = KINDS[kind]
    config = dict(SD14, **config_extra)
    sched = cls.from_config(config, **overrides)
    sched.set_timesteps(steps)
    init_sigma = sched.init_noise_sigma
    init_sigma = float(init_sigma.item() if torch.is_tensor(init_sigma) else init_sigma)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(SHAPE, generator=gen, dtype=torch.float32) * sched.init_noise_sigma
    step_gen = torch.Generator().manual_seed(seed + 1)
    # As StableDiffusionPipeline.prepare_extra_step_kwargs: pass what step() accepts.
    accepted = inspect.signature(sched.step).parameters
    extra = {}
    if "generator" in accepted:
        extra["generator"] = step_gen
    if "eta" in accepted:
        extra["eta"] = eta
    DRAWS.clear()
    inputs, outputs, lats = [], [], []
    init = latents.clone()
    identity = True
    for t in sched.timesteps:
        model_input = sched.scale_model_input(latents, t)
        identity = identity and torch.equal(model_input, latents)
        model_output = fake_unet(model_input, timestep_value(t))
        latents = sched.step(model_output, t, latents, **extra).prev_sample
        inputs.append(model_input.clone())
        outputs.append(model_output.clone())
        lats.append(latents.clone())
    tensors = {
        f"{case_id}.init": init.contiguous(),
        # float64 holds every float32 and int64 timestep exactly (JSON parsers may round).
        f"{case_id}.timesteps": torch.tensor([timestep_value(t) for t in sched.timesteps], dtype=torch.float64),
        f"{case_id}.model_output": torch.stack(outputs).contiguous(),
        f"{case_id}.latents": torch.stack(lats).contiguous(),
    }
    # Schedulers whose scale_model_input is the identity need no record of it (saves space).
    if not identity:
        tensors[f"{case_id}.model_input"] = torch.stack(inputs).contiguous()
    if DRAWS:
        tensors[f"{case_id}.noise"] = torch.stack(DRAWS).contiguous()
    assert torch.isfinite(tensors[f"{case_id}.latents"]).all(), (case_id, kind, steps, config_extra)
    entry = {
        "id": case_id,
        "scheduler": kind,
        "class": cls.__name__,
        "steps": steps,
        "eta": eta,
        "config_extra": config_extra,
        "scales_input": not identity,
        "init_noise_sigma": init_sigma,
        "noise_draws": len(DRAWS),
    }
    return entry, tensors


def main():
    if not os.path.isdir("tests") or not os.path.isfile("Cargo.toml"):
        sys.exit("run from the repository root")
    os.makedirs(OUT, exist_ok=True)
    plan = []
    for kind in KINDS:
        for n in STEPS:
            plan.append((kind, n, {}, 0.0))
    for n in STEPS:
        plan.append(("ddim", n, {}, 1.0))
        plan.append(("dpm++2m", n, {"timestep_spacing": "trailing"}, 0.0))
        plan.append(("dpm++2m", n, {"timestep_spacing": "leading"}, 0.0))
    # Other spacings and options the model config may carry, fewer step counts each.
    for n in FEW:
        for spacing in ("leading", "trailing"):
            for kind in ("euler", "euler-a", "heun", "lms", "unipc", "dpm++2m-karras"):
                plan.append((kind, n, {"timestep_spacing": spacing}, 0.0))
        for spacing in ("linspace", "trailing"):
            plan.append(("pndm", n, {"timestep_spacing": spacing}, 0.0))
            plan.append(("ddim", n, {"timestep_spacing": spacing}, 0.0))
        plan.append(("unipc", n, {"solver_order": 3}, 0.0))
        plan.append(("unipc", n, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 0.0))
        plan.append(("dpm++2m", n, {"solver_type": "heun"}, 0.0))
        plan.append(("dpm++2m", n, {"prediction_type": "v_prediction"}, 0.0))
        plan.append(("euler", n, {"prediction_type": "v_prediction"}, 0.0))
        plan.append(("ddim", n, {"set_alpha_to_one": True, "clip_sample": True}, 0.0))
        plan.append(("lcm", n, {"original_inference_steps": 25}, 0.0))
    index, tensors = [], {}
    for i, (kind, n, extra, eta) in enumerate(plan):
        entry, t = run_case(f"c{i:03d}", kind, n, extra, eta, seed=1000 + i)
        index.append(entry)
        tensors.update(t)
    save_file(tensors, f"{OUT}/cases.safetensors")
    os.chmod(f"{OUT}/cases.safetensors", 0o644)
    meta = {
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "shape": list(SHAPE),
        "base_config": SD14,
        "cases": index,
    }
    with open(f"{OUT}/index.json", "w") as f:
        json.dump(meta, f, separators=(",", ":"))
    size = sum(os.path.getsize(f"{OUT}/{n}") for n in os.listdir(OUT))
    print(f"{len(index)} cases, {size / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
