"""Which layers of torchvision architectures ``--structure channels`` can prune, why not the others, and k = C.

    python bench/bench_channels_archs.py [resnet50 mobilenet_v2 ...]

For each architecture (random weights, 10 classes, 3x64x64 input; vit_b_16 at 3x224x224): the chains found
on its fx graph, the conv/linear layers refused (grouped by reason), and the relative change of the outputs
after pruning every chain at k = C from statistics of two random images (must be ~0).
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import torch
import torchvision
from rich.table import Table

from common import show
from rankcut.compress.channels import prune_chain
from rankcut.dist import Context
from rankcut.model.archs import InputContract
from rankcut.model.graph import find_chains
from rankcut.stats.inputs import chain_moments

ARCHS = ["resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "vgg11_bn", "regnet_x_400mf",
         "densenet121", "shufflenet_v2_x0_5", "convnext_tiny", "vit_b_16"]


def reason(text: str) -> str:
    """A refusal without the node names, so equal reasons group."""
    for key in ("residual add", "concatenated", "users", "grouped convolution", "model's output", "permute",
                "multiplied", "shared", "stochastic_depth"):
        if key in text:
            return key
    return text.split(" (")[0][:40]


def check(name: str) -> tuple:
    size = 224 if name.startswith("vit") else 64
    contract = InputContract((3, size, size), (0.0,) * 3, (1.0,) * 3)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10).eval()
    start = time.perf_counter()
    chains, refused = find_chains(model, contract)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = model(x)
        moments = chain_moments(model, chains, [(x, None)], Context(0, 1, torch.device("cpu")))
        for chain in chains:
            prune_chain(model, chain, moments[chain.producer], list(range(chain.channels)))
        got = model(x)
    err = ((got - want).norm() / want.norm()).item()
    reasons = Counter(reason(r) for r in refused.values())
    return len(chains), len(refused), ", ".join(f"{k} {v}" for k, v in reasons.most_common()), err, \
        time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(2)
    table = Table("architecture", "chains", "refused", "refused because", "k = C rel. change", "s",
                  title="--structure channels on torchvision architectures", title_justify="left")
    for name in sys.argv[1:] or ARCHS:
        chains, refused, why, err, seconds = check(name)
        table.add_row(name, str(chains), str(refused), why, f"{err:.1e}", f"{seconds:.0f}")
    show(table)


if __name__ == "__main__":
    main()
