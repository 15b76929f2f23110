"""DeConvNet reconstruction vs Captum's NeuronDeconvolution, and the cost of code-space feature visualisation.

Run: ``python benchmarks/bench_deconv_codespace.py [--quick]`` (CPU; prints a markdown table).

- ``deconvnet(model, x, NeuronTarget(layer, (c,)))`` (the strongest activation of channel ``c``) against Captum's
  ``NeuronDeconvolution`` with a selector that takes the channel's maximum: Captum's map is the deconvnet of the
  one-hot top signal, ours carries the activation itself, so ours = a_max * Captum's (checked, max relative
  difference). Our forward stops at the layer; Captum's runs the whole network.
- ``feature_visualization`` with ``GeneratorCode`` (a small MLP generator) against the Fourier parameterisation
  at the same steps, on the quickstart-sized CNN: ms per run. No peer library has a generator parameterisation.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lightning_interp.demo import shapes_cnn
from lightning_interp.methods import GeneratorCode, NeuronTarget, deconvnet, feature_visualization


def _best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    torch.manual_seed(0)
    import torchvision
    from captum.attr import NeuronDeconvolution

    model = torchvision.models.vgg11(num_classes=10).eval()
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    layer, channel = "features.10", 5  # the pool after the fourth convolution (block 3): (4, 256, 4, 4)
    module = dict(model.named_modules())[layer]
    ours = deconvnet(model, x, NeuronTarget(layer, (channel,)))
    with torch.no_grad():
        top = model.features[:11](x)[:, channel].flatten(1).amax(dim=1)
    peer = NeuronDeconvolution(model, module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peer.attribute(x, lambda out: out[:, channel].flatten(1).amax(dim=1))
        agreement = float((ours - top[:, None, None, None] * theirs).abs().max() / ours.abs().max())
        captum_ms = _best_ms(lambda: peer.attribute(x, lambda out: out[:, channel].flatten(1).amax(dim=1)), repeats)
    ours_ms = _best_ms(lambda: deconvnet(model, x, NeuronTarget(layer, (channel,))), repeats)
    print("| what | ours ms | peer ms | agreement |")
    print("|---|---|---|---|")
    print(
        f"| deconvnet reconstruction, vgg11 {layer} channel {channel}, 4 x 3 x 64 x 64 | {ours_ms:.1f} | "
        f"Captum NeuronDeconvolution {captum_ms:.1f} | max rel. diff of ours vs a_max x Captum's: {agreement:.1e} |"
    )

    net = shapes_cnn(num_classes=4, width=16).eval()
    steps = 16 if args.quick else 128
    generator = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 3 * 32 * 32), nn.Sigmoid())
    generator.append(nn.Unflatten(1, (3, 32, 32)))
    code = GeneratorCode(generator, code_shape=64)
    for name, parameterization in (("fourier", "fourier"), ("generator code (64-d, MLP)", code)):
        ms = _best_ms(
            lambda p=parameterization: feature_visualization(
                net, ["class:0", "class:1", "class:2", "class:3"], image_shape=(3, 32, 32), steps=steps,
                parameterization=p,
            ),
            repeats,
        )  # fmt: skip
        print(f"| feature_visualization, {name}, 4 targets, {steps} steps, 32 x 32 | {ms:.0f} | - | - |")


if __name__ == "__main__":
    main()
