"""Plain torch networks (no Lightning): backbones and the layers of each technique."""

from models.backbone import BackboneClassifier
from models.bert import BertClassifier
from models.convnet import ConvNet
from models.mlp import MLP
from models.morphonet import MorphoCNN, MorphoMLP, MorphoTransformer
from models.morphreuse import SharedCoreMLP, ShapeSharedBert

__all__ = ["MLP", "ConvNet", "BackboneClassifier", "BertClassifier", "SharedCoreMLP", "ShapeSharedBert",
           "MorphoMLP", "MorphoCNN", "MorphoTransformer"]
