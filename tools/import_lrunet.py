"""Turn an LruNet checkpoint as the authors released it into a Lightning checkpoint ``train.py test`` accepts.

The released files (okankop/CNN-layer-reuse) are legacy pickles ``{'net': state_dict, 'acc', 'epoch'}`` with
``module.``-prefixed keys and no ``num_batches_tracked``. N, width, classes and input channels are read from the
key shapes (``models.lrunet.lrunet_config_from_state_dict``); the network is built, loaded strictly, wrapped in
``lightning_modules.LayerReuse`` and saved with the published accuracy and epoch under ``morphlab.imported``.

    python tools/import_lrunet.py 10-LruNet-1x_fmnist.t7 imported.ckpt
    python train.py test --config configs/fashion_mnist/lrunet.yaml --ckpt_path imported.ckpt

Unpickling runs code stored in the file: import only checkpoints from a source you trust.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import lightning
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lightning_modules import LayerReuse  # noqa: E402
from models.lrunet import LruNet, load_published_state_dict, lrunet_config_from_state_dict  # noqa: E402

# Which config tests an imported checkpoint as published (dataset from classes and input channels, N, width).
PARITY_CONFIGS = {
    (10, 1, 10, 1): "configs/fashion_mnist/lrunet.yaml",
    (10, 1, 1, 1): "configs/fashion_mnist/lrunet_n1.yaml",
    (10, 3, 14, 1): "configs/cifar10/lrunet.yaml",
    (10, 3, 1, 1): "configs/cifar10/lrunet_n1.yaml",
    (100, 3, 14, 2): "configs/cifar100/lrunet.yaml",
    (100, 3, 1, 2): "configs/cifar100/lrunet_n1.yaml",
}


def load_legacy(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=False)``: the released files are pickles that the safe loader refuses."""
    print(f"[import] unpickling the legacy checkpoint {path} (weights_only=False: this runs code stored in the "
          "file; import only files from a source you trust)", file=sys.stderr)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict {{'net': state_dict, ...}}.")
    return checkpoint


def convert(checkpoint: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The Lightning checkpoint (weights-only loadable) and the inferred LruNet configuration."""
    config = lrunet_config_from_state_dict(checkpoint)
    side = 28 if config["in_channels"] == 1 else 32
    input_shape = (config["in_channels"], side, side)

    def factory(shape, classes):
        return LruNet(shape, classes, reuse=config["reuse"], width=config["width"], mode="parity")

    module = LayerReuse(net=factory, input_shape=input_shape, num_classes=config["num_classes"])
    load_published_state_dict(module.net, checkpoint)
    imported = {"source": source, "config": config}
    for key in ("acc", "epoch"):
        if isinstance(checkpoint.get(key), (int, float)):
            imported[f"published_{key}"] = float(checkpoint[key]) if key == "acc" else int(checkpoint[key])
    out = {
        "state_dict": {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()},
        "pytorch-lightning_version": lightning.__version__,
        "epoch": int(checkpoint.get("epoch", 0) or 0),
        "global_step": 0,
        "morphlab": {"train_seconds": 0.0, "epochs_trained": 0, "imported": imported},
    }
    return out, config


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="released checkpoint ({'net': state_dict, 'acc', 'epoch'})")
    parser.add_argument("output", type=Path, help="Lightning checkpoint to write (.ckpt)")
    args = parser.parse_args(argv)
    checkpoint = load_legacy(args.source)
    out, config = convert(checkpoint, str(args.source))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(args.output.suffix + ".part")
    torch.save(out, tmp)
    tmp.replace(args.output)  # never leave a half-written checkpoint
    key = (config["num_classes"], config["in_channels"], config["reuse"], config["width"])
    target = PARITY_CONFIGS.get(key)
    published = out["morphlab"]["imported"].get("published_acc")
    print(f"[import] {config['reuse']}-LruNet-{config['width']}x, {config['num_classes']} classes, "
          f"{config['in_channels']} input channel(s); published accuracy {published} -> {args.output}")
    if target:
        print(f"python train.py test --config {target} --ckpt_path {args.output}")
    else:
        print(f"no shipped config has this shape; test with a config whose model.init_args.net.init_args has "
              f"reuse: {config['reuse']}, width: {config['width']} and a matching datamodule.")
    return args.output


if __name__ == "__main__":
    main()
