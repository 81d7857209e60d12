"""NeuMeta target networks: the width-h networks whose weights the INR generates (spec: shared/specs/neumeta.md
§1.2, §2.2, §9.3).

Four targets, each a plain ``nn.Module`` built as ``Class(input_shape, num_classes, width=h, ...)``, each in the
file of its layout: ``NeuMetaHead`` and ``NeuMetaResidual`` (``head.py``: MLPs behind a fixed stem, "digits_head",
"mnist_head", "digits_res"), ``NeuMetaCNN`` (``cnn.py``: the repo's 3-conv "LeNet", "mnist_cnn") and
``NeuMetaResNet20`` (``resnet20.py``: CIFAR ResNet-20 with a resizable last block, "cifar_resnet20_block").

With ``batch_norm=True`` a BatchNorm sits after every producer except the last layer (before the ReLU, and for
the residual target after fc2, before the add, as in a ResNet BasicBlock; the ResNet-20 has it by default, with
bias-free convs, as the standard network). NeuMeta folds it away before smoothing and INR training (§1.1,
``models.neumeta_smoothing.fold_batchnorm_``); the INR always generates the folded (BN-free) tensors.

Each target carries a *layout* (a small frozen dataclass, picklable, independent of the module's weights) that
lists, as functions of h, the generated tensors in state-dict order (``tensors(h)``: name -> shape; the INR
numbers them t = 0 .. T-1 in this order, §3.1) and the cliques (§2.2, ``base.py``). The first layer's input axis
(pixels) and the last layer's output axis (classes) belong to no clique, so they are never permuted (§2.5).
"""

from models.neumeta_targets.base import Clique, Member, NeuMetaTarget
from models.neumeta_targets.cnn import CNNLayout, NeuMetaCNN
from models.neumeta_targets.head import HeadLayout, NeuMetaHead, NeuMetaResidual, ResidualLayout
from models.neumeta_targets.resnet20 import NeuMetaResNet20, ResNet20Layout

__all__ = ["Member", "Clique", "NeuMetaTarget", "HeadLayout", "ResidualLayout", "NeuMetaHead", "NeuMetaResidual",
           "CNNLayout", "NeuMetaCNN", "ResNet20Layout", "NeuMetaResNet20"]
