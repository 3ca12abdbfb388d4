"""Building blocks of Deep Latent Particles (Daniel & Tamar, ICML 2022): spatial softmax, the
per-patch keypoint prior, the posterior keypoint encoder, Gaussian maps, box masks, dense kNN +
PointNet++ message passing, glimpse (STN) encoders/decoders and the CNN decoder.

Layers follow the released DLPv1 code: conv blocks are conv (no bias, replicate padding) + BN +
activation, ReLU in the keypoint CNNs (posterior, prior, glimpse encoder) and LeakyReLU(0.01) in
the decoders, and an upsampling block convolves first and then upsamples ×2 (bilinear).

Coordinates are (row, col) in [-1, 1] (the MAFL ground truth is (x, y): swapped). STN calls
(``affine_grid``) take (x, y) = (col, row), so they swap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from latentzoo.utils.errors import LatentzooError


def conv_block(
    c_in: int,
    c_out: int,
    k: int = 3,
    stride: int = 1,
    act: str = "relu",
    upsample: bool = False,
) -> nn.Sequential:
    """Conv (no bias, replicate padding) + BatchNorm + ReLU / LeakyReLU(0.01), then an optional
    ×2 bilinear upsampling (DLP's block: convolve at the low resolution, then upsample)."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, padding_mode="replicate", bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True) if act == "relu" else nn.LeakyReLU(0.01, inplace=True),
    ]
    if upsample:
        layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers)


def mlp(sizes: list[int], last_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def init_dlp_weights(module: nn.Module) -> None:
    """DLP's initialisation: conv weights N(0, 0.01²) with zero bias, BatchNorm (1, 0); linear
    layers keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class KeypointCNN(nn.Module):
    """KeyNet-style CNN (DLP's keypoint CNN): a ``first_kernel`` conv and a 3×3 conv at
    ``channels[0]``, then per further width a stride-2 conv and a 3×3 conv (ReLU), then a 1×1
    conv to ``n_maps`` heatmaps of size/2^(len(channels)-1)."""

    def __init__(self, in_ch: int, channels: tuple[int, ...], n_maps: int, first_kernel: int = 3):
        super().__init__()
        c0 = channels[0]
        layers = [conv_block(in_ch, c0, first_kernel), conv_block(c0, c0)]
        for a, b in zip(channels[:-1], channels[1:], strict=True):
            layers += [conv_block(a, b, stride=2), conv_block(b, b)]
        self.features = nn.Sequential(*layers)
        self.to_maps = nn.Conv2d(channels[-1], n_maps, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_maps(self.features(x))


def spatial_softmax(heatmap: torch.Tensor) -> torch.Tensor:
    """Separable spatial softmax: [N, C, H, W] -> expected (row, col) in [-1, 1], [N, C, 2].

    Each axis: average the map over the other axis, softmax, expectation on linspace(-1, 1)."""
    h, w = heatmap.shape[-2:]
    rows = torch.linspace(-1, 1, h, device=heatmap.device, dtype=heatmap.dtype)
    cols = torch.linspace(-1, 1, w, device=heatmap.device, dtype=heatmap.dtype)
    p_row = heatmap.mean(-1).softmax(-1)  # [N, C, H]
    p_col = heatmap.mean(-2).softmax(-1)  # [N, C, W]
    return torch.stack([(p_row * rows).sum(-1), (p_col * cols).sum(-1)], dim=-1)


def gaussian_maps(mu: torch.Tensor, sigma: float, size: int) -> torch.Tensor:
    """Isotropic Gaussians exp(-|u - mu|² / 2σ²) at ``mu`` [B, K, 2] on a size² grid
    -> [B, K, S, S]."""
    grid = torch.linspace(-1, 1, size, device=mu.device, dtype=mu.dtype)
    d_row = (grid.view(1, 1, size, 1) - mu[..., 0, None, None]) ** 2
    d_col = (grid.view(1, 1, 1, size) - mu[..., 1, None, None]) ** 2
    return torch.exp(-(d_row + d_col) / (2 * sigma**2))


def glimpse_size(anchor_s: float, size: int) -> int:
    """DLP's glimpse side in pixels of a size² map: round(anchor_s · (size - 1))."""
    return max(1, round(anchor_s * (size - 1)))


def box_masks(centre: torch.Tensor, box: int, size: int) -> torch.Tensor:
    """Binary box² squares centred at ``centre`` [B, K, 2] on a size² map -> [B, K, 1, S, S].

    As DLP builds them: a centred box on a canvas of the box padded by (size - box)//2 on each
    side, translated to the keypoint with nearest sampling. The box is separable, so each axis
    is a 1-D test: pixel i is inside when the canvas index nearest to (u_i - c) is in the box."""
    pad = (size - box) // 2
    canvas = box + 2 * pad  # = size, or size - 1 when size - box is odd
    u = (2 * torch.arange(canvas, device=centre.device, dtype=centre.dtype) + 1) / canvas - 1
    src = (u - centre.unsqueeze(-1) + 1) * canvas / 2 - 0.5  # continuous canvas index
    idx = torch.round(src)  # round half to even, as grid_sample's nearest mode
    inside = ((idx >= pad) & (idx < pad + box)).to(centre.dtype)  # [B, K, 2, canvas]
    mask = inside[..., 0, :, None] * inside[..., 1, None, :]
    if canvas != size:  # DLP's canvas is one pixel short: pad it back to the map size
        mask = F.pad(mask, (0, size - canvas, 0, size - canvas))
    return mask.unsqueeze(2)


def exclusive_masks(masks: torch.Tensor) -> torch.Tensor:
    """Cumulative masks [B, K, ...]: particle k keeps only the space that particles < k left,
    m_k = min(1 - Σ_{j<k} m_j, mask_k), with the taken space detached (as DLP)."""
    taken = masks[:, 0]
    out = [taken]
    for k in range(1, masks.shape[1]):
        m = torch.minimum(1 - taken.detach(), masks[:, k])
        out.append(m)
        taken = taken + m
    return torch.stack(out, 1)


def knn(pos: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k nearest points per point, self included (distance 0):
    [B, N, 2] -> [B, N, k]."""
    dist = torch.cdist(pos, pos)
    return dist.topk(k, dim=-1, largest=False).indices


def gather_neighbours(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], idx [B, N, k] -> [B, N, k, C]."""
    b, n, k = idx.shape
    flat = idx.reshape(b, n * k, 1).expand(-1, -1, x.shape[-1])
    return x.gather(1, flat).view(b, n, k, x.shape[-1])


class PointNetLayer(nn.Module):
    """h_i' = relu(max_{j in kNN(i)} MLP([h_j, pos_j - pos_i])) with DLP's edge MLP
    Linear-BN-ReLU-Linear-BN. BatchNorm sees every edge of the batch ([B·N·k, C]), as the
    original's message-passing layer normalises its edge list."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(c_in + 2, c_out),
            nn.BatchNorm1d(c_out),
            nn.ReLU(inplace=True),
            nn.Linear(c_out, c_out),
            nn.BatchNorm1d(c_out),
        )

    def forward(self, h: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        rel = gather_neighbours(pos, idx) - pos.unsqueeze(2)
        edges = torch.cat([gather_neighbours(h, idx), rel], dim=-1)  # [B, N, k, C + 2]
        msg = self.net(edges.flatten(0, 2)).view(*edges.shape[:3], -1)
        return F.relu(msg.max(dim=2).values)


class PointNetPP(nn.Module):
    """Dense kNN graph (self-loops) + max-aggregation layers + global max-pool
    -> [B, widths[-1]]."""

    def __init__(self, c_in: int, widths: tuple[int, ...] = (64, 128, 256, 512), k: int = 10):
        super().__init__()
        self.k = k
        sizes = [c_in, *widths]
        self.layers = nn.ModuleList(
            PointNetLayer(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )

    def forward(self, pos: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        idx = knn(pos, min(self.k, pos.shape[1]))
        h = torch.cat([pos, feat], dim=-1)
        for layer in self.layers:
            h = layer(h, pos, idx)
        return h.max(dim=1).values


class PatchPrior(nn.Module):
    """Image-conditioned keypoint prior: one spatial-softmax keypoint per non-overlapping patch,
    keeping the ``n_kp_prior`` proposals farthest from their patch centre (DLP's saliency rule).
    The per-patch CNN runs once on all patches as a batch [B·P, C, p, p]."""

    def __init__(
        self,
        in_ch: int,
        image_size: int,
        patch_size: int,
        n_kp_prior: int,
        channels: tuple[int, ...] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise LatentzooError(
                f"DLP: image size {image_size} is not a multiple of model.patch_size={patch_size}; "
                "pick a patch size that divides it"
            )
        self.patch, self.grid = patch_size, image_size // patch_size
        if n_kp_prior > self.grid**2:
            raise LatentzooError(
                f"DLP: model.n_kp_prior={n_kp_prior} exceeds the {self.grid**2} patches "
                f"({image_size} px / patch {patch_size})²; lower it or the patch size"
            )
        self.n_kp_prior = n_kp_prior
        self.cnn = KeypointCNN(in_ch, channels, n_maps=1, first_kernel=3)
        # DLP's local -> global map: local ±1 are the patch's first/last pixel centres, pixels
        # are normalised by (image_size - 1) (linspace convention, as the Gaussian maps).
        starts = torch.arange(self.grid) * patch_size
        sr, sc = torch.meshgrid(starts, starts, indexing="ij")
        self.register_buffer("starts", torch.stack([sr, sc], -1).view(-1, 2).float(), False)
        self.image_size = image_size

    def to_global(self, local: torch.Tensor) -> torch.Tensor:
        """Patch-local (row, col) in [-1, 1] [B, P, 2] -> image coordinates in [-1, 1]."""
        pixels = (local + 1) / 2 * (self.patch - 1) + self.starts
        return pixels / (self.image_size - 1) * 2 - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        p, g = self.patch, self.grid
        patches = x.unfold(2, p, p).unfold(3, p, p)  # [B, C, g, g, p, p]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * g * g, c, p, p)
        local = spatial_softmax(self.cnn(patches)).view(b, g * g, 2)  # in the patch's [-1, 1]
        kp = self.to_global(local)
        top = local.pow(2).sum(-1).topk(self.n_kp_prior, dim=1).indices  # far from the centre
        return kp.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))  # [B, n_prior, 2]


class KeypointEncoder(nn.Module):
    """Posterior positions: CNN (first conv 7×7) -> K heatmaps on the S×S map -> MLP ->
    (mu (tanh), logvar)."""

    def __init__(self, in_ch: int, image_size: int, n_kp: int, channels: tuple[int, ...]):
        super().__init__()
        self.cnn = KeypointCNN(in_ch, channels, n_maps=n_kp, first_kernel=7)
        self.map_size = image_size // 2 ** (len(channels) - 1)
        self.n_kp = n_kp
        self.head = mlp([n_kp * self.map_size**2, 256, 128, 4 * n_kp])

    @property
    def to_heatmaps(self) -> nn.Conv2d:
        """The 1×1 conv that makes the heatmaps (the layer DLP's detaches protect)."""
        return self.cnn.to_maps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heatmaps = self.cnn(x)  # [B, K, S, S]
        out = self.head(heatmaps.flatten(1)).view(x.shape[0], self.n_kp, 4)
        return torch.tanh(out[..., :2]), out[..., 2:], heatmaps


def crop_glimpses(src: torch.Tensor, pos: torch.Tensor, size: int) -> torch.Tensor:
    """STN crop of size² glimpses (size pixels of the source's side) centred at ``pos``
    [B, K, 2]. ``src`` is one map per image [B, C, H, W] or one per particle [B, K, C, H, W]
    -> [B·K, C, size, size]. The same pixels as DLP's translate-then-slice crop."""
    b, k, _ = pos.shape
    if src.dim() == 4:
        src = src.unsqueeze(1).expand(-1, k, -1, -1, -1)
    src = src.reshape(b * k, *src.shape[2:])
    scale = size / src.shape[-1]
    theta = torch.zeros(b * k, 2, 3, device=src.device, dtype=src.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, 0, 2], theta[:, 1, 2] = pos[..., 1].reshape(-1), pos[..., 0].reshape(-1)  # x, y
    grid = F.affine_grid(theta, [b * k, src.shape[1], size, size], align_corners=False)
    return F.grid_sample(src, grid, align_corners=False)


def place_glimpses(glimpses: torch.Tensor, pos: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`crop_glimpses`: put [B·K, C, g, g] at ``pos`` on a size² canvas
    (zeros outside) -> [B, K, C, size, size]."""
    b, k, _ = pos.shape
    scale = glimpses.shape[-1] / size
    theta = torch.zeros(b * k, 2, 3, device=pos.device, dtype=glimpses.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, 0, 2] = -pos[..., 1].reshape(-1) / scale
    theta[:, 1, 2] = -pos[..., 0].reshape(-1) / scale
    grid = F.affine_grid(theta, [b * k, glimpses.shape[1], size, size], align_corners=False)
    out = F.grid_sample(glimpses, grid, align_corners=False, padding_mode="zeros")
    return out.view(b, k, glimpses.shape[1], size, size)


class GlimpseEncoder(nn.Module):
    """DLP's object encoder: per-particle appearance (mu, logvar) of d features from a glimpse
    around each (detached) keypoint.

    The source is masked by each particle's glimpse box before cropping; with ``exclusive``
    the boxes (times ``obj_on`` when given) become cumulative masks, so a region already taken
    by an earlier particle is blank for later ones (one particle per object).
    ``cnn=True`` (object model, on the image): KeyNet CNN (16, 16, 32) -> 32 maps of glimpse/4.
    ``cnn=False`` (masked model, on the heatmaps): the raw glimpse. ``encode_location`` appends
    the keypoint. Then FC 256 -> 128 -> 2d."""

    def __init__(
        self,
        in_ch: int,
        map_size: int,
        anchor_s: float,
        d: int,
        cnn: bool,
        encode_location: bool,
        exclusive: bool = False,
    ) -> None:
        super().__init__()
        self.map_size, self.d = map_size, d
        self.glimpse = glimpse_size(anchor_s, map_size)
        self.encode_location, self.exclusive = encode_location, exclusive
        self.cnn = KeypointCNN(in_ch, (16, 16, 32), n_maps=32) if cnn else nn.Identity()
        with torch.no_grad():
            flat = self.cnn(torch.zeros(2, in_ch, self.glimpse, self.glimpse)).flatten(1).shape[1]
        self.fc = mlp([flat + 2 * encode_location, 256, 128, 2 * d])

    def crops(
        self, src: torch.Tensor, pos: torch.Tensor, obj_on: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Masked glimpses of ``src`` at ``pos`` [B, K, 2] -> [B, K, C, g, g]."""
        b, k, _ = pos.shape
        masks = box_masks(pos, self.glimpse, src.shape[-1])  # [B, K, 1, H, W]
        if self.exclusive:
            if obj_on is not None:
                masks = obj_on[:, :, None, None, None] * masks
            masks = exclusive_masks(masks.clamp(0, 1))
        crops = crop_glimpses(masks * src.unsqueeze(1), pos, self.glimpse)
        return crops.view(b, k, *crops.shape[1:])

    def forward(
        self, src: torch.Tensor, pos: torch.Tensor, obj_on: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, k, _ = pos.shape
        crops = self.crops(src, pos, obj_on)
        h = self.cnn(crops.flatten(0, 1)).reshape(b, k, -1)
        if self.encode_location:
            h = torch.cat([h, pos], -1)
        mu, logvar = self.fc(h).chunk(2, -1)
        return mu, logvar, crops


class GlimpseDecoder(nn.Module):
    """DLP's object decoder: FC d -> 256 -> 32·8·8, conv-upsample blocks to the glimpse size
    (32 -> 64 channels, then 64), a 3×3 conv to 32, a 1×1 conv to 4 maps (alpha, RGB), sigmoid.
    LeakyReLU(0.01)."""

    def __init__(self, d: int, glimpse: int, out_ch: int = 3) -> None:
        super().__init__()
        self.glimpse = glimpse
        self.fc = mlp([d, 256, 32 * 8 * 8], last_act=True)
        n_up = int(math.log2(glimpse)) - 3
        widths = [64] * n_up if n_up > 0 else [32]  # DLP always upsamples at least once
        layers: list[nn.Module] = []
        c = 32
        for w in widths:
            layers.append(conv_block(c, w, act="leaky", upsample=True))
            c = w
        layers += [conv_block(c, 32, act="leaky"), nn.Conv2d(32, 1 + out_ch, 1)]
        self.cnn = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.cnn(self.fc(z).view(-1, 32, 8, 8))
        if out.shape[-1] != self.glimpse:  # glimpse not 8·2^n: resample to it
            out = F.interpolate(out, size=self.glimpse, mode="bilinear")
        return torch.sigmoid(out)  # [N, 4, g, g]


class ParticleDecoder(nn.Module):
    """``gauss_pointnetpp`` (``bg_maps=False``) / ``gauss_pointnetpp_feat`` (``bg_maps=True``).

    PointNet++ over the particle graph -> FC -> (B, K, 8, 8) -> conv-upsample to S×S. The
    CNN input is the Gaussian maps and the PointNet maps (``gauss_pointnetpp``), or the
    Gaussian maps, the PointNet maps times the union foreground mask and the bg-masked encoder
    heatmaps (``gauss_pointnetpp_feat``). Conv-upsample stages S -> image size (``channels``),
    a 3×3 conv to (K+1)·(⌊mid_base/(K+1)⌋+1) channels and a 1×1 conv to the image channels.
    LeakyReLU(0.01); no output activation (as in DLP)."""

    def __init__(
        self,
        n_kp: int,
        d: int,
        map_size: int,
        image_size: int,
        out_ch: int,
        bg_maps: bool,
        channels: tuple[int, ...] = (256, 128, 64),
        mid_base: int = 32,
        k: int = 10,
        widths: tuple[int, ...] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        self.n_kp, self.bg_maps = n_kp, bg_maps
        self.pointnet = PointNetPP(2 + d, widths, k)
        self.fc = nn.Sequential(nn.Linear(widths[-1], n_kp * 64), nn.ReLU(inplace=True))
        n_up = int(math.log2(map_size)) - 3  # 8 -> S (DLP's count, see spec §7.1)
        self.pn_up = nn.Sequential(
            *(conv_block(n_kp, n_kp, act="leaky", upsample=True) for _ in range(max(n_up, 0)))
        )
        c = (3 if bg_maps else 2) * n_kp
        stages = int(math.log2(image_size // map_size))
        widths_dec = list(channels[:stages]) + [channels[-1]] * max(0, stages - len(channels))
        layers: list[nn.Module] = []
        for w in widths_dec:
            layers.append(conv_block(c, w, act="leaky", upsample=True))
            c = w
        mid = (n_kp + 1) * (mid_base // (n_kp + 1) + 1)
        layers += [conv_block(c, mid, act="leaky"), nn.Conv2d(mid, out_ch, 1)]
        self.cnn = nn.Sequential(*layers)

    def pointnet_maps(self, pos: torch.Tensor, feat: torch.Tensor, size: int) -> torch.Tensor:
        """PointNet++ readout of the (detached) particle graph -> [B, K, size, size]."""
        g = self.pointnet(pos.detach(), feat)
        maps = self.pn_up(self.fc(g).view(pos.shape[0], self.n_kp, 8, 8))
        if maps.shape[-1] != size:
            maps = F.interpolate(maps, size=size, mode="bilinear")
        return maps

    def forward(
        self,
        pos: torch.Tensor,
        feat: torch.Tensor,
        gmaps: torch.Tensor,
        fg_union: torch.Tensor | None = None,
        bg_heatmaps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``fg_union`` [B, 1, S, S] and ``bg_heatmaps`` (bg mask ⊙ detached heatmaps) are read
        by ``gauss_pointnetpp_feat`` only."""
        pn_maps = self.pointnet_maps(pos, feat, gmaps.shape[-1])
        if not self.bg_maps:
            return self.cnn(torch.cat([gmaps, pn_maps], dim=1))
        return self.cnn(torch.cat([gmaps, pn_maps * fg_union, bg_heatmaps], dim=1))
