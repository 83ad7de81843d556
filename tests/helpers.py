"""Helpers shared by test files (``from helpers import ...``: pytest puts tests/ on sys.path, as
tests/ is not a package)."""
from __future__ import annotations

import torch

from supermask import desc, export
from supermask.cli import run_main
from supermask.layers import supermask_layers


# The smallest real run: one epoch of a quarter-width fc on synthetic data (seconds).
TINY = ["--dataset", "synthetic", "--epochs", "1", "--width", "0.25", "--val-size", "200", "--no-progress"]


def command(module):
    """A caller of ``module``'s command as the shell would run it: argv items made strings, the exit
    code returned (argparse's one-line refusals exit 2 through SystemExit: returned as their code)."""
    def call(*argv) -> int:
        try:
            return run_main(module.PROG, module.main, [str(a) for a in argv])
        except SystemExit as e:
            return e.code
    return call


def scored_model(config: dict, bn_passes: int = 1, seed: int = 0):
    """config's model as a run builds it (desc.build_model at export.shapes_of(config)), made to
    look trained: N(0, 1) scores in every supermask layer and its BatchNorm running statistics moved
    away from their init by ``bn_passes`` training-mode forwards of a batch of 4 N(1, 3^2) inputs.
    Returns (model in eval mode, input shape, classes, the generator seeded with ``seed`` that drew
    all of it, for the test's further draws)."""
    shape, classes = export.shapes_of(config)
    model = desc.build_model(config, shape, classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in supermask_layers(model):
            layer.scores.copy_(torch.randn(layer.scores.shape, generator=g))
        model.train()
        for _ in range(bn_passes):
            model(torch.randn(4, *shape, generator=g) * 3 + 1)
    model.eval()
    return model, shape, classes, g
