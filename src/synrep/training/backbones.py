"""Image encoders: a Vision Transformer with the standard sizes, a small CNN and a small ResNet.

Every backbone maps images ``[B, C, H, W]`` (float, normalised) to features ``[B, feature_dim]``.
The ViT also exposes ``forward_tokens(x, mask)`` -> ``(cls [B, D], patches [B, N, D])`` with an
optional boolean patch mask ``[B, N]`` (masked patches are replaced by a learned mask token), which
masked image modelling (iBOT / SynCLR) needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SynrepError
from ..registry import Registry

VIT_SIZES = {  # name: (embed_dim, depth, num_heads)
    "vit-micro": (128, 4, 4),
    "vit-tiny": (192, 12, 3),
    "vit-small": (384, 12, 6),
    "vit-base": (768, 12, 12),
    "vit-large": (1024, 24, 16),
}



class BackboneError(SynrepError, ValueError):
    """A backbone setting the architecture cannot honour (patch size vs image size, timm missing, ...)."""

@dataclass
class BackboneConfig:
    name: str = "cnn"  # cnn, resnet, vit-micro|tiny|small|base|large, or timm:<name>
    image_size: int = 28  # input size in px: the random-resized crop's output
    in_channels: int = 1  # 1 (grayscale) or 3 (RGB); data are converted to this
    patch_size: int = 7  # ViT patch size in px
    width: int = 32  # base channel width of the cnn / resnet
    embed_dim: int = 0  # ViT width (0 = the named size's)
    depth: int = 0  # ViT blocks (0 = the named size's)
    num_heads: int = 0  # ViT attention heads (0 = the named size's)
    conv_stem: bool = False  # ViT only: a convolutional stem instead of one big patchify conv (Xiao et al. 2021)

    @classmethod
    def key_help(cls) -> dict[str, str]:
        """``--help`` text for keys whose choices come from a registry."""
        return {"name": BACKBONES.describe()}

    def check(self) -> None:
        from ..config import require

        problem = BACKBONES.problem(self.name)
        require(problem is None, "name", problem or "")
        require(self.in_channels in (1, 3), "in_channels", f"must be 1 or 3, got {self.in_channels}")
        for key in ("image_size", "patch_size", "width"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("embed_dim", "depth", "num_heads"):
            require(getattr(self, key) >= 0, key, f"must be >= 0 (0 = the size's default), got {getattr(self, key)}")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def conv_patch_stem(in_channels: int, dim: int, patch_size: int) -> nn.Sequential:
    """Stride-2 3x3 convs (BN, ReLU) down to ``patch_size``, then a 1x1 projection: ``[B, C, H, W] -> [B, dim, H/p, W/p]``.

    Early convolutions give a small ViT the locality prior it cannot learn from a few thousand images.
    """
    if patch_size & (patch_size - 1):
        raise BackboneError(f"conv_stem needs a power-of-two patch_size, got {patch_size}")
    layers, cin, width = [], in_channels, max(16, dim // 4)
    for _ in range(max(0, patch_size.bit_length() - 1)):
        layers += [nn.Conv2d(cin, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        cin, width = width, min(dim, width * 2)
    return nn.Sequential(*layers, nn.Conv2d(cin, dim, 1))


class VisionTransformer(nn.Module):
    """ViT with a class token and learned position embeddings (interpolated for other input sizes)."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int, depth: int, heads: int,
                 conv_stem: bool = False):
        super().__init__()
        if image_size % patch_size:
            raise BackboneError(f"backbone.image_size {image_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.patch_embed = conv_patch_stem(in_channels, dim, patch_size) if conv_stem else nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.feature_dim = dim
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def num_patches(self, image_size: int) -> int:
        return (image_size // self.patch_size) ** 2

    def _pos(self, grid: int) -> torch.Tensor:
        if grid == self.grid:
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        d = patches.shape[-1]
        patches = patches.reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        patches = nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, d)], dim=1)

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, C, H, W]``, mask bool ``[B, N]`` or None -> cls ``[B, D]``, patches ``[B, N, D]``."""
        tokens = self.patch_embed(x)
        grid = tokens.shape[-1]
        tokens = tokens.flatten(2).transpose(1, 2)
        if mask is not None:
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype).expand_as(tokens), tokens)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self._pos(grid)
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        return tokens[:, 0], tokens[:, 1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[0]


class SmallCNN(nn.Module):
    """Four 3x3 conv layers (widths w, 2w, 4w, 8w; stride 2 after the first), BN, ReLU, global average pool."""

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        chans = [in_channels, width, width * 2, width * 4, width * 8]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.feature_dim = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class SmallResNet(nn.Module):
    """ResNet-18 layout (2-2-2-2 basic blocks) with base width ``width`` and a 3x3 stem for small images."""

    def __init__(self, in_channels: int, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        blocks, cin = [], width
        for i, cout in enumerate([width, width * 2, width * 4, width * 8]):
            blocks += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


class TimmBackbone(nn.Module):
    def __init__(self, name: str, cfg: BackboneConfig):
        super().__init__()
        try:
            import timm
        except ImportError as err:
            raise BackboneError(f"backbone 'timm:{name}' needs timm (pip install timm; it also needs torchvision): {err}") from None
        self.model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=cfg.in_channels, img_size=cfg.image_size) \
            if "vit" in name else timm.create_model(name, pretrained=False, num_classes=0, in_chans=cfg.in_channels)
        self.feature_dim = self.model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


BACKBONES = Registry("backbone", BackboneError)
"""Every backbone: ``factory(argument, cfg: BackboneConfig) -> nn.Module`` with ``feature_dim``; the trait
``patch_tokens`` marks backbones with ``forward_tokens`` (what masked image modelling needs)."""


@BACKBONES.register("cnn", help="a small 4-stage CNN (width = backbone.width)", patch_tokens=False, convolutional=True)
def _cnn(_, cfg: BackboneConfig) -> nn.Module:
    return SmallCNN(cfg.in_channels, cfg.width)


@BACKBONES.register("resnet", help="a small ResNet (width = backbone.width)", patch_tokens=False, convolutional=True)
def _resnet(_, cfg: BackboneConfig) -> nn.Module:
    return SmallResNet(cfg.in_channels, cfg.width)


def _register_vit(name: str, dim: int, depth: int, heads: int) -> None:
    @BACKBONES.register(name, help=f"ViT, width {dim}, {depth} blocks, {heads} heads", patch_tokens=True, convolutional=False)
    def _vit(_, cfg: BackboneConfig) -> nn.Module:
        return VisionTransformer(cfg.image_size, cfg.patch_size, cfg.in_channels, cfg.embed_dim or dim,
                                 cfg.depth or depth, cfg.num_heads or heads, cfg.conv_stem)


for _name, (_dim, _depth, _heads) in VIT_SIZES.items():
    _register_vit(_name, _dim, _depth, _heads)


@BACKBONES.register("timm", argument="<name>", help="any timm model, random weights (needs timm)", patch_tokens=False,
                   convolutional=True)  # channels-last is harmless for a timm ViT and helps its CNNs
def _timm(name: str, cfg: BackboneConfig) -> nn.Module:
    return TimmBackbone(name, cfg)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """Build the backbone named by ``cfg.name`` with random weights."""
    return BACKBONES.build(cfg.name, cfg)
