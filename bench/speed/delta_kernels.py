"""One linear layer's forward + backward, per delta implementation, on this machine (docs/perf_notes.md).

    python bench/speed/delta_kernels.py [--threads 1] [--tokens 1024] [--device cpu]

For the 124M LLaMA's layer shapes (768 x 768, 2048 x 768, 768 x 2048) and densities 0.1%, 1%, 5%, it
times (median of 5, ms) the frozen base layer alone (what any adapter pays: output and input gradient),
speft-ds's dense and sparse paths (base + delta, value gradients), and the paper code's approach
(W + scatter_add(indices, values) as a dense weight through plain autograd).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from speft_ds.methods.speft.delta import SparseDeltaLinear  # noqa: E402

SHAPES = [(768, 768), (2048, 768), (768, 2048)]
DENSITIES = [0.001, 0.01, 0.05]


def median_ms(step, repeats: int = 5) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="1: one of 2 ranks on a 2-core machine")
    parser.add_argument("--tokens", type=int, default=1024, help="micro-batch x sequence length")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"{args.tokens} tokens, {args.threads} thread(s), {args.device}; ms per forward + backward")
    print("| layer (out x in) | density | base only | dense | sparse | paper approach |")
    print("|---|---|---|---|---|---|")
    for out_features, in_features in SHAPES:
        base = torch.nn.Linear(in_features, out_features, bias=False, device=args.device).requires_grad_(False)
        x = torch.randn(args.tokens, in_features, generator=generator).to(args.device).requires_grad_(True)
        upstream = torch.randn(args.tokens, out_features, generator=generator).to(args.device)
        for density in DENSITIES:
            k = max(1, round(density * out_features * in_features))
            indices = torch.randperm(out_features * in_features, generator=generator)[:k].sort().values.to(args.device)
            values = torch.zeros(k, device=args.device, requires_grad=True)
            layers = {impl: SparseDeltaLinear(base, indices, impl=impl) for impl in ("dense", "sparse")}

            def paper():
                delta = torch.zeros(out_features * in_features, device=args.device).scatter_add(0, indices, values)
                (F.linear(x, base.weight + delta.view_as(base.weight)) * upstream).sum().backward()

            times = {"base only": median_ms(lambda: (base(x) * upstream).sum().backward()),
                     **{impl: median_ms(lambda layer=layer: (layer(x) * upstream).sum().backward())
                        for impl, layer in layers.items()},
                     "paper approach": median_ms(paper)}
            print(f"| {out_features} x {in_features} | {density:g} | " + " | ".join(f"{t:.1f}" for t in times.values())
                  + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
