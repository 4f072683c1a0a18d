"""Image classifiers trained by the robust stage: ``small_cnn``, ``vgg16`` and ``wide_resnet``.

Every factory has the same keyword signature::

    factory(in_channels=1, num_classes=10, image_size=32, width=32, depth=16) -> MixableClassifier

so the trainer can build any of them from ``RobustConfig`` without special cases; arguments a
model has no use for are accepted and ignored (each factory's docstring says which).

Every model takes float images in [0, 1], shape (B, C, H, W), and returns logits (B, num_classes).
All of them are a ``MixableClassifier``: a list of blocks, a "neck" that turns the last block's
output into the penultimate feature vector, and a linear ``fc`` head. That common shape gives

* Manifold Mixup (Verma et al. 2019): ``forward(x, mix_layer=k, mix_fn=f)`` applies ``f`` to the
  hidden state at mix position ``k`` and continues the forward pass. Position 0 is the input
  itself (in [0, 1], as given), position ``i`` (1 <= i < num_mix_layers) is the output of
  block ``i``. ``num_mix_layers == len(blocks) + 1``.
* ``features(x)``: the penultimate representation (B, D) (``fc(features(x)) == forward(x)``).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from natra_ray.models.registries import CLASSIFIERS

MixFn = Callable[[Tensor], Tensor]


class MixableClassifier(nn.Module):
    """Base class: ``blocks`` (mixable stages) -> ``neck`` (-> (B, D)) -> ``fc`` (-> logits).

    Subclasses only build the three parts; the forward pass, the mixing and the feature
    extraction live here so every classifier behaves identically for the Manifold Mixup baseline.
    """

    def __init__(self, blocks: Sequence[nn.Module], neck: nn.Module, feature_dim: int,
                 num_classes: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.neck = neck
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.fc = nn.Linear(feature_dim, num_classes)

    @property
    def num_mix_layers(self) -> int:
        """Number of valid ``mix_layer`` values: 0 (the input) and one after each block."""
        return len(self.blocks) + 1

    def _trunk(self, x: Tensor, mix_layer: Optional[int], mix_fn: Optional[MixFn]) -> Tensor:
        """Runs blocks + neck, applying ``mix_fn`` at position ``mix_layer``; returns (B, D)."""
        if (mix_layer is None) != (mix_fn is None):
            # One without the other is a caller bug (e.g. a mixup loss that silently never mixes).
            raise ValueError("mix_layer and mix_fn must be given together "
                             f"(got mix_layer={mix_layer!r}, mix_fn={'set' if mix_fn else None})")
        if mix_layer is not None and not 0 <= mix_layer < self.num_mix_layers:
            raise ValueError(f"mix_layer must be in [0, {self.num_mix_layers - 1}] for "
                             f"{type(self).__name__}; got {mix_layer}")
        h = x  # (B, C, H, W) in [0, 1]
        if mix_layer == 0:
            h = mix_fn(h)  # type: ignore[misc]  (checked above)
        # Centre the pixels: zero-mean inputs condition the first conv's gradient better; done
        # after position 0 so mix_fn sees the images exactly as the caller passed them.
        h = h * 2.0 - 1.0
        for i, block in enumerate(self.blocks, start=1):
            h = block(h)  # (B, C_i, H_i, W_i)
            if i == mix_layer:
                h = mix_fn(h)  # type: ignore[misc]
        return self.neck(h)  # (B, D)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate representation (B, D) of images (B, C, H, W) in [0, 1]."""
        return self._trunk(x, None, None)

    def forward(self, x: Tensor, mix_layer: Optional[int] = None,
                mix_fn: Optional[MixFn] = None) -> Tensor:
        """Logits (B, num_classes); with ``mix_layer``/``mix_fn``, mixes hidden state (see module doc)."""
        return self.fc(self._trunk(x, mix_layer, mix_fn))


def _check_common(in_channels: int, num_classes: int, width: int) -> None:
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _init_weights(module: nn.Module) -> None:
    """He init for convs (as torchvision / the WRN reference code), unit BN, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _conv_bn_relu(in_ch: int, out_ch: int) -> List[nn.Module]:
    # No conv bias: the following BatchNorm's shift makes it redundant.
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True)]


# ---------------------------------------------------------------------------------------------
# small_cnn
# ---------------------------------------------------------------------------------------------

class SmallCNN(MixableClassifier):
    """conv(w)-pool | conv(2w)-conv(2w)-pool | fc(8w)-relu | fc(num_classes), BN after each conv.

    Only one conv runs at full resolution: the usual second full-resolution conv(w) costs ~40%
    of the FLOPs (fwd+bwd of a 128-batch at 28 px, width 32: 14.6 vs 9.1 GFLOP) and bought no
    accuracy on Fashion-MNIST (88.8% vs 88.6% after one epoch; 90.6% after two without it),
    while every adversarial step multiplies this cost. The flattened map is (image_size // 4)^2
    positions (7x7 at 28 px, 8x8 at 32 px) as in the usual MNIST-family CNNs; an input of
    another size is adaptively pooled to that grid first (a no-op when the size matches).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int) -> None:
        grid = max(1, image_size // 4)
        stage1 = nn.Sequential(*_conv_bn_relu(in_channels, width), nn.MaxPool2d(2))  # (B, w, H/2, W/2)
        stage2 = nn.Sequential(*_conv_bn_relu(width, 2 * width), *_conv_bn_relu(2 * width, 2 * width),
                               nn.MaxPool2d(2))  # (B, 2w, H/4, W/4)
        hidden = 8 * width  # 128 at w=16, 256 at w=32: scales with the conv widths
        neck = nn.Sequential(nn.AdaptiveAvgPool2d(grid), nn.Flatten(),  # (B, 2w * grid^2)
                             nn.Linear(2 * width * grid * grid, hidden), nn.ReLU(inplace=True))
        super().__init__([stage1, stage2], neck, hidden, num_classes)
        _init_weights(self)


@CLASSIFIERS.register("small_cnn")
def small_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 32, width: int = 32,
              depth: int = 16) -> SmallCNN:
    """Cheap 3-conv CNN for 28-32 px data; ``width`` = channels of the first conv.

    ``depth`` is ignored (the architecture is fixed).
    """
    _check_common(in_channels, num_classes, width)
    if image_size < 4:
        raise ValueError(f"small_cnn needs image_size >= 4 (it pools twice); got {image_size}")
    return SmallCNN(in_channels, num_classes, image_size, width)


# ---------------------------------------------------------------------------------------------
# vgg16
# ---------------------------------------------------------------------------------------------

# VGG-16 (configuration "D" of Simonyan & Zisserman): 13 convs in 5 stages, base widths.
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class _PoolIfLarger(nn.Module):
    """2x2 max pool that is skipped once the map is 1 px high or wide.

    VGG pools 5 times (designed for 224 px inputs); 28 px inputs reach 1x1 after
    four pools (28-14-7-3-1), so the last pool must become a no-op instead of an error.
    """

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) > 1 else x


class VGG16(MixableClassifier):
    """VGG-16 with BatchNorm; stage channels = base * width / 64; classifier fc-fc-fc.

    The spatial map is global-average-pooled before the classifier (1x1 already for 28/32 px
    inputs), which makes the model independent of the input size. Dropout of the original
    classifier is left out: BN regularises enough at this scale and it would make adversarial
    examples depend on the dropout mask.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        blocks: List[nn.Module] = []
        ch = in_channels
        for base_widths in _VGG16_STAGES:
            layers: List[nn.Module] = []
            for base in base_widths:
                out = max(1, round(base * width / 64))
                layers += _conv_bn_relu(ch, out)
                ch = out
            layers.append(_PoolIfLarger())
            blocks.append(nn.Sequential(*layers))  # (B, ch, H', W')
        hidden = ch  # 512 at width 64, as in the CIFAR VGG variants
        neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, ch)
                             nn.Linear(ch, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, hidden), nn.ReLU(inplace=True))  # (B, hidden)
        super().__init__(blocks, neck, hidden, num_classes)
        _init_weights(self)


@CLASSIFIERS.register("vgg16")
def vgg16(in_channels: int = 1, num_classes: int = 10, image_size: int = 32, width: int = 32,
          depth: int = 16) -> VGG16:
    """VGG-16-BN; ``width`` = channels of the first stage (64 gives 64-128-256-512-512).

    ``image_size`` and ``depth`` are ignored (any input size >= 1 px works; depth is fixed at 16).
    """
    _check_common(in_channels, num_classes, width)
    return VGG16(in_channels, num_classes, width)


# ---------------------------------------------------------------------------------------------
# wide_resnet
# ---------------------------------------------------------------------------------------------

class _PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 + shortcut.

    When the shape changes the shortcut is a strided 1x1 conv applied to the *pre-activated*
    input, as in the reference WRN code (the BN-ReLU is shared by both branches).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.shortcut: Optional[nn.Module] = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_ch, H, W) -> (B, out_ch, H/s, W/s)
        a = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        h = self.conv1(a)
        h = self.conv2(F.relu(self.bn2(h)))
        return h + skip


def wide_resnet_widen_factor(width: int) -> int:
    """The widen factor k encoded by ``width``.

    Rule: ``width <= 20`` *is* k (WRN-28-10 is ``width=10``); ``width > 20`` is the channel
    count of the first group, 16k, and must be a multiple of 16 (``width=32`` -> k=2, so the
    config default ``width=32, depth=16`` gives WRN-16-2). Channel counts 16 and below are thus
    not expressible, which costs nothing: they would be k <= 1.
    """
    if width < 1:
        raise ValueError(f"wide_resnet width must be >= 1; got {width}")
    if width <= 20:
        return width
    if width % 16:
        raise ValueError("wide_resnet width > 20 means first-group channels (16k) and must be a "
                         f"multiple of 16 (32, 48, 64, ...); got {width}. Use width <= 20 to "
                         "give the widen factor k directly")
    return width // 16


class WideResNet(MixableClassifier):
    """WRN-depth-k (Zagoruyko & Komodakis 2016): conv3x3(16), then three groups of
    n = (depth - 4) / 6 pre-activation blocks with 16k, 32k, 64k channels (strides 1, 2, 2),
    then BN-ReLU-global average pool. Mix positions: input, after each group (3 blocks)."""

    def __init__(self, in_channels: int, num_classes: int, depth: int, k: int) -> None:
        n = (depth - 4) // 6
        chans = (16 * k, 32 * k, 64 * k)
        stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)  # (B, 16, H, W)
        groups: List[nn.Module] = []
        ch = 16
        for g, (out, stride) in enumerate(zip(chans, (1, 2, 2))):
            layers = [_PreActBlock(ch if i == 0 else out, out, stride if i == 0 else 1)
                      for i in range(n)]
            ch = out
            # The stem joins group 1: mixing right after a bias-free conv would equal mixing the
            # input (the conv is linear), so that position would be redundant.
            groups.append(nn.Sequential(stem, *layers) if g == 0 else nn.Sequential(*layers))
        # Pre-activation nets end with a BN-ReLU (the last block's output is un-normalised).
        neck = nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU(inplace=True),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())  # (B, 64k)
        super().__init__(groups, neck, ch, num_classes)
        self.depth, self.widen_factor = depth, k
        _init_weights(self)


@CLASSIFIERS.register("wide_resnet")
def wide_resnet(in_channels: int = 1, num_classes: int = 10, image_size: int = 32, width: int = 32,
                depth: int = 16) -> WideResNet:
    """WideResNet-``depth``-k; depth = 6n + 4, k from ``width`` (see ``wide_resnet_widen_factor``).

    ``image_size`` is ignored (global pooling makes the model size-independent).
    """
    _check_common(in_channels, num_classes, width)
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"wide_resnet depth must be 6n+4 (10, 16, 22, 28, ...); got {depth}")
    return WideResNet(in_channels, num_classes, depth, wide_resnet_widen_factor(width))
