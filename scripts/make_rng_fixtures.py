"""Write tests/fixtures/torch_randn.safetensors: reference torch.randn draws on the CPU.

Run from the repository root with a Python that has torch and safetensors:
    python scripts/make_rng_fixtures.py [OUT.safetensors]
The torch version and CPU capability used are stored in the file's metadata, because
torch's float32 randn for >= 16 values takes a different code path per capability
(AVX2 builds use avx_mathfun's log/sincos; DEFAULT and AVX512 use libm).
"""

import os
import sys

import torch
from safetensors.torch import save_file

SEEDS = [0, 1, 42, 1234, 4294967295, 2**40 + 17]
# The 64x64 latent shape is 64 KiB per seed; only these seeds keep it, to stay small.
BIG_SHAPE = (1, 4, 64, 64)
BIG_SEEDS = [0, 42, 2**40 + 17]
SHAPES = [(1,), (3,), (15,), (16,), (17,), (33,), (2, 3, 5), (1, 4, 8, 8), BIG_SHAPE, (2, 4, 13, 7)]
STREAM = [("a", (1, 4, 16, 16)), ("b", (1, 4, 16, 16)), ("c", (5,)), ("d", (7,)), ("e", (20,))]


def main() -> None:
    tensors = {}
    for seed in SEEDS:
        for shape in SHAPES:
            if shape == BIG_SHAPE and seed not in BIG_SEEDS:
                continue
            g = torch.Generator("cpu").manual_seed(seed)
            name = f"s{seed}_{'x'.join(str(d) for d in shape)}"
            tensors[name] = torch.randn(shape, generator=g, dtype=torch.float32).contiguous()
    g = torch.Generator("cpu").manual_seed(42)
    for suffix, shape in STREAM:
        tensors[f"stream42_{suffix}"] = torch.randn(shape, generator=g, dtype=torch.float32).contiguous()
    metadata = {
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    default = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "torch_randn.safetensors")
    out = sys.argv[1] if len(sys.argv) > 1 else default
    save_file(tensors, out, metadata=metadata)
    print(f"wrote {len(tensors)} tensors to {os.path.normpath(out)} ({metadata})")


if __name__ == "__main__":
    main()
