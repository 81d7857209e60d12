"""Plain torch networks (no Lightning): backbones and the layers of each technique."""

from models.backbone import BackboneClassifier
from models.bert import BertClassifier
from models.convnet import ConvNet
from models.layercollapse import CollapsibleBlock, CollapsibleMLP, collapse_chain
from models.collapse_chains import collapse_chains_, find_chains, to_prelu_
from models.collapsible_vgg import CollapsibleVGG
from models.lrunet import LruNet
from models.mixer import MLPMixer
from models.mlp import MLP
from models.mobile_baselines import MobileNetV1, MobileNetV2Small, ShuffleNetV1, ShuffleNetV2Small
from models.morphonet import MorphoCNN, MorphoMLP, MorphoTransformer
from models.morphreuse import SharedCoreMLP, ShapeSharedBert
from models.zoo import TimmNet, TorchvisionNet
from models.masked_network import MaskedNetwork, apply_masks
from models.neumeta_targets import NeuMetaCNN, NeuMetaHead, NeuMetaResidual, NeuMetaResNet20

__all__ = ["MLP", "ConvNet", "BackboneClassifier", "BertClassifier", "SharedCoreMLP", "ShapeSharedBert",
           "MorphoMLP", "MorphoCNN", "MorphoTransformer", "CollapsibleBlock", "CollapsibleMLP", "collapse_chain",
           "find_chains", "to_prelu_", "collapse_chains_", "CollapsibleVGG", "MLPMixer",
           "LruNet", "MobileNetV1", "MobileNetV2Small", "ShuffleNetV1", "ShuffleNetV2Small",
           "NeuMetaHead", "NeuMetaResidual", "NeuMetaCNN", "NeuMetaResNet20", "TorchvisionNet", "TimmNet",
           "MaskedNetwork", "apply_masks"]
