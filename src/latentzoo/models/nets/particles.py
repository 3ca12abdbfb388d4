"""Building blocks of Deep Latent Particles (Daniel & Tamar, ICML 2022): spatial softmax, the
per-patch keypoint prior, the posterior keypoint encoder, Gaussian maps, dense kNN +
PointNet++ message passing, glimpse (STN) encoders/decoders and the CNN decoder.

Coordinates are (row, col) in [-1, 1] (the MAFL ground truth is (x, y): swapped). STN calls
(``affine_grid``) take (x, y) = (col, row), so they swap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def conv_block(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (replicate padding, as in DLP) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, padding_mode="replicate"),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def mlp(sizes: list[int], last_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


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
    """h_i' = max_{j in kNN(i)} MLP([h_j, pos_j - pos_i]) (PointNet++-style edge message)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(c_in + 2, c_out), nn.ReLU(inplace=True), nn.Linear(c_out, c_out)
        )

    def forward(self, h: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        rel = gather_neighbours(pos, idx) - pos.unsqueeze(2)
        msg = self.net(torch.cat([gather_neighbours(h, idx), rel], dim=-1))
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
            raise ValueError(f"image size {image_size} is not a multiple of patch {patch_size}")
        self.patch, self.grid = patch_size, image_size // patch_size
        if n_kp_prior > self.grid**2:
            raise ValueError(f"n_kp_prior={n_kp_prior} > number of patches {self.grid**2}")
        self.n_kp_prior = n_kp_prior
        layers = [conv_block(in_ch, channels[0]), conv_block(channels[0], channels[0])]
        size = patch_size
        for a, b in zip(channels[:-1], channels[1:], strict=True):
            if size > 2:  # stride-2 while the map is larger than 2x2
                layers += [conv_block(a, b, stride=2), conv_block(b, b)]
                size //= 2
            else:
                layers += [conv_block(a, b), conv_block(b, b)]
        layers.append(nn.Conv2d(channels[-1], 1, 1))
        self.cnn = nn.Sequential(*layers)
        centres = (torch.arange(self.grid) + 0.5) * 2 / self.grid - 1
        cr, cc = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("centres", torch.stack([cr, cc], -1).view(-1, 2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        p, g = self.patch, self.grid
        patches = x.unfold(2, p, p).unfold(3, p, p)  # [B, C, g, g, p, p]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b * g * g, c, p, p)
        local = spatial_softmax(self.cnn(patches)).view(b, g * g, 2)  # in the patch's [-1, 1]
        kp = self.centres + local / g  # patch half-width is 1/g in global units
        top = local.pow(2).sum(-1).topk(self.n_kp_prior, dim=1).indices
        return kp.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))  # [B, n_prior, 2]


class KeypointEncoder(nn.Module):
    """Posterior positions: CNN -> K heatmaps on the S×S map -> MLP -> (mu (tanh), logvar)."""

    def __init__(self, in_ch: int, image_size: int, n_kp: int, channels: tuple[int, ...]):
        super().__init__()
        layers = [conv_block(in_ch, channels[0], k=7), conv_block(channels[0], channels[0])]
        for a, b in zip(channels[:-1], channels[1:], strict=True):
            layers += [conv_block(a, b, stride=2), conv_block(b, b)]
        self.cnn = nn.Sequential(*layers)
        self.map_size = image_size // 2 ** (len(channels) - 1)
        self.to_heatmaps = nn.Conv2d(channels[-1], n_kp, 1)
        self.n_kp = n_kp
        self.head = mlp([n_kp * self.map_size**2, 256, 128, 4 * n_kp])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heatmaps = self.to_heatmaps(self.cnn(x))  # [B, K, S, S]
        out = self.head(heatmaps.flatten(1)).view(x.shape[0], self.n_kp, 4)
        return torch.tanh(out[..., :2]), out[..., 2:], heatmaps


def crop_glimpses(src: torch.Tensor, pos: torch.Tensor, scale: float, size: int) -> torch.Tensor:
    """STN crop of size² glimpses covering ``scale`` of the image around ``pos`` [B, K, 2]
    -> [B·K, C, size, size]."""
    b, k, _ = pos.shape
    theta = torch.zeros(b * k, 2, 3, device=src.device, dtype=src.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, 0, 2], theta[:, 1, 2] = pos[..., 1].reshape(-1), pos[..., 0].reshape(-1)  # x, y
    grid = F.affine_grid(theta, [b * k, src.shape[1], size, size], align_corners=False)
    src = src.unsqueeze(1).expand(-1, k, -1, -1, -1).reshape(b * k, *src.shape[1:])
    return F.grid_sample(src, grid, align_corners=False)


def place_glimpses(
    glimpses: torch.Tensor, pos: torch.Tensor, scale: float, size: int
) -> torch.Tensor:
    """Inverse of :func:`crop_glimpses`: put [B·K, C, g, g] at ``pos`` on a size² canvas
    (zeros outside) -> [B, K, C, size, size]."""
    b, k, _ = pos.shape
    theta = torch.zeros(b * k, 2, 3, device=pos.device, dtype=glimpses.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, 0, 2] = -pos[..., 1].reshape(-1) / scale
    theta[:, 1, 2] = -pos[..., 0].reshape(-1) / scale
    grid = F.affine_grid(theta, [b * k, glimpses.shape[1], size, size], align_corners=False)
    out = F.grid_sample(glimpses, grid, align_corners=False, padding_mode="zeros")
    return out.view(b, k, glimpses.shape[1], size, size)


class GlimpseEncoder(nn.Module):
    """Per-particle appearance: crop a glimpse around each (detached) keypoint, CNN (when the
    glimpse is >= 8 px) -> FC, add the location -> FC 128 -> (mu, logvar) of d features, plus a
    transparency logit ``obj_on``."""

    def __init__(self, in_ch: int, glimpse: int, scale: float, d: int) -> None:
        super().__init__()
        self.glimpse, self.scale, self.d = glimpse, scale, d
        if glimpse >= 8:
            self.cnn = nn.Sequential(
                conv_block(in_ch, 16), conv_block(16, 16, stride=2), conv_block(16, 32, stride=2)
            )
            flat = 32 * math.ceil(glimpse / 4) ** 2
        else:
            self.cnn = nn.Identity()
            flat = in_ch * glimpse**2
        self.fc = mlp([flat, 256], last_act=True)
        self.head = mlp([256 + 2, 128, 2 * d + 1])

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, k, _ = pos.shape
        crops = crop_glimpses(src, pos, self.scale, self.glimpse)
        h = self.fc(self.cnn(crops).flatten(1)).view(b, k, 256)
        out = self.head(torch.cat([h, pos], -1))
        return out[..., : self.d], out[..., self.d : 2 * self.d], out[..., -1]


class GlimpseDecoder(nn.Module):
    """Object decoder: FC d -> 256 -> 32·8·8 -> upsample-conv to the glimpse size -> 4 maps
    (alpha, RGB) through a sigmoid."""

    def __init__(self, d: int, glimpse: int, out_ch: int = 3) -> None:
        super().__init__()
        self.glimpse = glimpse
        self.fc = mlp([d, 256, 32 * 8 * 8], last_act=True)
        layers: list[nn.Module] = []
        size = 8
        while size < glimpse:
            layers += [nn.Upsample(scale_factor=2, mode="bilinear"), conv_block(32, 32)]
            size *= 2
        layers.append(nn.Conv2d(32, 1 + out_ch, 3, padding=1))
        self.cnn = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.cnn(self.fc(z).view(-1, 32, 8, 8))
        if out.shape[-1] != self.glimpse:
            out = F.interpolate(out, size=self.glimpse, mode="bilinear")
        return torch.sigmoid(out)  # [N, 4, g, g]


class ParticleDecoder(nn.Module):
    """``gauss_pointnetpp`` (``bg_maps=False``) / ``gauss_pointnetpp_feat`` (``bg_maps=True``).

    PointNet++ over the particle graph -> (B, K, 8, 8) -> upsample to S×S, masked by the
    foreground masks; concatenated with the Gaussian maps (and bg-masked encoder heatmaps) and
    decoded by upsample-conv stages S -> image size, then (K+1)·(⌊32/(K+1)⌋+1) channels and a
    1×1 conv to the image channels. No output activation (as in DLP)."""

    def __init__(
        self,
        n_kp: int,
        d: int,
        map_size: int,
        image_size: int,
        out_ch: int,
        bg_maps: bool,
        channels: tuple[int, ...] = (256, 128, 64),
        k: int = 10,
        widths: tuple[int, ...] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        self.n_kp, self.bg_maps = n_kp, bg_maps
        self.pointnet = PointNetPP(2 + d, widths, k)
        self.fc = nn.Sequential(nn.Linear(widths[-1], n_kp * 64), nn.ReLU(inplace=True))
        n_up = int(math.log2(map_size)) - 3  # 8 -> S (DLP's fixed count, see spec §7.1)
        up: list[nn.Module] = []
        for _ in range(max(n_up, 0)):
            up += [nn.Upsample(scale_factor=2, mode="bilinear"), conv_block(n_kp, n_kp)]
        self.pn_up = nn.Sequential(*up)
        c = (3 if bg_maps else 2) * n_kp
        stages = int(math.log2(image_size // map_size))
        widths_dec = list(channels[:stages]) + [channels[-1]] * max(0, stages - len(channels))
        layers: list[nn.Module] = []
        for w in widths_dec:
            layers += [nn.Upsample(scale_factor=2, mode="bilinear"), conv_block(c, w)]
            c = w
        mid = (n_kp + 1) * (32 // (n_kp + 1) + 1)
        layers += [conv_block(c, mid), nn.Conv2d(mid, out_ch, 1)]
        self.cnn = nn.Sequential(*layers)

    def forward(
        self,
        pos: torch.Tensor,
        feat: torch.Tensor,
        gmaps: torch.Tensor,
        fg_masks: torch.Tensor,
        bg_mask: torch.Tensor,
        heatmaps: torch.Tensor,
    ) -> torch.Tensor:
        b = pos.shape[0]
        g = self.pointnet(pos.detach(), feat)
        pn_maps = self.pn_up(self.fc(g).view(b, self.n_kp, 8, 8))
        if pn_maps.shape[-1] != gmaps.shape[-1]:
            pn_maps = F.interpolate(pn_maps, size=gmaps.shape[-1], mode="bilinear")
        maps = [gmaps, pn_maps * fg_masks]
        if self.bg_maps:
            maps.append(bg_mask * heatmaps)
        return self.cnn(torch.cat(maps, dim=1))
