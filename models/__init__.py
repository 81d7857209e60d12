"""Plain torch networks (no Lightning): backbones and the layers of each technique."""

from models.convnet import ConvNet
from models.mlp import MLP

__all__ = ["MLP", "ConvNet"]
