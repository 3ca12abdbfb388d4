"""Deep Latent Particles (DLPv1): Daniel & Tamar, "Unsupervised Image Representation Learning
with Deep Latent Particles", ICML 2022 (arXiv 2205.15821).

The latent is a set of K foreground particles plus one fixed background particle. Each has a
2-D position z_kp ~ N(mu, σ²) and a d-dim appearance feature z_f ~ N(mu_f, σ_f²).

* Prior over positions: image-conditioned. A small CNN proposes one keypoint per patch (spatial
  softmax); the ``n_kp_prior`` proposals farthest from their patch centre are kept. With a dict
  batch that has ``prior_image`` (CelebA's TPS-warped copy) the prior sees that image.
* KL over positions: the Chamfer-KL between the unordered posterior and prior sets,
      KL_ij = ½ Σ_dims [σ_i²/σ_p² + (mu_i - p_j)²/σ_p² - 1 + log σ_p² - log σ_i²],
      L_chamfer = mean_b [Σ_j min_i KL_ij + Σ_i min_j KL_ij].
* Decoder: Gaussian maps at the particles + a PointNet++ readout of the particle graph, decoded
  by a CNN. The *masked model* (``use_object_dec: false``, CelebA) decodes the whole image this
  way; the *object model* (``use_object_dec: true``) decodes each particle's glimpse (alpha + RGB)
  and stitches them over the CNN background with effective masks
      m_k = min(1 - Σ_{j<k} m_j, alpha_k),   rec = (1 - Σ m)·bg + Σ m_k·rgb_k.

    loss = β_rec·L_rec + β_kl·(L_chamfer + kl_balance·L_featKL)

Gradient paths follow the released code: the encoder heatmaps reach the loss only through the
keypoint means mu. Every other reader of them (the appearance features of the particles and of
the background, the decoder's background maps, the ``obj_on`` head) takes them detached, the
PointNet++ sees detached positions, glimpses are cropped at the detached posterior *mean*, and
the stitching detaches the space already taken.

During the object-model warm-up (epoch < ``warmup_epoch``) only the glimpse reconstruction and
the KL terms are optimised; until 5·``warmup_epoch`` (the noisy-mask phase) the transparencies
are uniform noise and the alphas get Gaussian noise. ``sample`` is not provided: the prior needs
an image.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentzoo.models.base import LatentModel, OptimizerFactory, SchedulerFactory, reparameterize
from latentzoo.models.beta_vae import gaussian_kl
from latentzoo.models.nets.particles import (
    GlimpseDecoder,
    GlimpseEncoder,
    KeypointEncoder,
    ParticleDecoder,
    PatchPrior,
    box_masks,
    exclusive_masks,
    gaussian_maps,
    glimpse_size,
    init_dlp_weights,
    mlp,
    place_glimpses,
)
from latentzoo.utils.errors import LatentzooError


def chamfer_kl(
    mu: torch.Tensor, logvar: torch.Tensor, prior: torch.Tensor, prior_logvar: float
) -> torch.Tensor:
    """Closed-form Chamfer-KL between posterior Gaussians mu/logvar [B, K, 2] and prior points
    [B, M, 2] with fixed variance exp(prior_logvar); batch mean. Computed in fp32."""
    mu, logvar, prior = mu.float(), logvar.float(), prior.float()
    var_p = math.exp(prior_logvar)
    sq = (mu.unsqueeze(2) - prior.unsqueeze(1)).pow(2)  # [B, K, M, 2]
    kl = 0.5 * (
        logvar.exp().unsqueeze(2) / var_p + sq / var_p - 1 + prior_logvar - logvar.unsqueeze(2)
    ).sum(-1)
    return (kl.min(dim=1).values.sum(-1) + kl.min(dim=2).values.sum(-1)).mean()


class VGGPerceptual(nn.Module):
    """Σ of squared VGG16 feature differences after features[2, 7, 12, 21, 30] (ImageNet
    weights; DLP feeds un-normalised [0, 1] images: ``normalize=False``). bf16 on GPU."""

    LAYERS = (2, 7, 12, 21, 30)

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        from torchvision.models import VGG16_Weights, vgg16

        try:
            net = vgg16(weights=VGG16_Weights.IMAGENET1K_V1).features[: self.LAYERS[-1] + 1]
        except Exception as error:  # offline, proxy
            hub = torch.hub.get_dir()
            raise LatentzooError(
                f"rec_loss=vgg needs the torchvision VGG16 ImageNet weights (vgg16-397923af.pth) "
                f"in {hub}/checkpoints; the download failed ({error}). Copy the file there from "
                "a machine with internet, or use model.rec_loss=mse."
            ) from error
        self.net = net.eval().requires_grad_(False)
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y])
        if self.normalize:
            h = (h - self.mean) / self.std
        loss = x.new_zeros(x.shape[0])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            for i, layer in enumerate(self.net):
                h = layer(h)
                if i in self.LAYERS:
                    a, b = h.float().chunk(2)
                    loss = loss + (a - b).pow(2).flatten(1).sum(1)
        return loss


class DeepLatentParticles(LatentModel):
    """DLPv1 masked model (``use_object_dec: false``) or object model (``true``).

    Capabilities: ``encode`` (keypoint means flattened [B, 2K], + feature means with
    ``features=True``), ``keypoints`` (mu [B, K, 2] as (row, col) in [-1, 1], confidence
    -Σ log σ² [B, K]), ``reconstruct`` (images in [0, 1]).
    """

    capability_notes = {"sample": "the keypoint prior is conditioned on an image (no free prior)"}

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """The object model's glimpse warm-up trains only part of the nets: under DDP the rest
        are unused in those steps."""
        return self.use_object_dec and self.warmup_epoch > 0

    def __init__(
        self,
        image_shape: list[int],
        n_kp: int = 30,
        n_kp_prior: int = 50,
        patch_size: int = 8,
        learned_feature_dim: int = 10,
        sigma: float = 0.1,
        mask_threshold: float = 0.2,
        anchor_s: float = 0.125,
        enc_channels: tuple[int, ...] = (32, 64, 128, 256),
        prior_channels: tuple[int, ...] = (16, 32, 64),
        dec_channels: tuple[int, ...] | None = None,
        knn_k: int = 10,
        use_object_enc: bool = True,
        use_object_dec: bool = False,
        exclusive_patches: bool = False,
        warmup_epoch: int = 0,
        rec_loss: str = "mse",
        vgg_normalize: bool = False,
        beta_rec: float = 1.0,
        beta_kl: float = 40.0,
        kl_balance: float = 1e-3,
        chamfer_include_bg: bool = False,
        prior_logvar: float = math.log(0.01),
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler, scheduler_interval="epoch")
        self.save_hyperparameters(logger=False, ignore=["optimizer", "scheduler"])
        if learned_feature_dim < 1:
            raise LatentzooError(
                "DLP: model.learned_feature_dim must be >= 1 (the PointNet++ decoder and the "
                "object decoder read the particle features; positions-only d = 0 is not supported)"
            )
        if rec_loss not in ("mse", "vgg"):
            raise LatentzooError(f"DLP: model.rec_loss must be 'mse' or 'vgg', got '{rec_loss}'")
        c, h, w = (int(v) for v in image_shape)
        if h != w:
            raise LatentzooError(f"DLP needs square images, got {h}x{w}")
        enc_channels = tuple(enc_channels)
        self.k, self.d, self.sigma, self.image_size = n_kp, learned_feature_dim, sigma, h
        self.mask_threshold, self.use_object_dec = mask_threshold, use_object_dec
        self.anchor_s, self.warmup_epoch, self.rec_loss = anchor_s, warmup_epoch, rec_loss
        self.beta_rec, self.beta_kl, self.kl_balance = beta_rec, beta_kl, kl_balance
        self.chamfer_include_bg, self.prior_logvar = chamfer_include_bg, prior_logvar

        # encoder side (posterior + prior + appearance)
        self.prior = PatchPrior(c, h, patch_size, n_kp_prior, tuple(prior_channels))
        self.kp_encoder = KeypointEncoder(c, h, n_kp, enc_channels)
        s = self.map_size = self.kp_encoder.map_size
        heatmap_dim = n_kp * s * s
        if use_object_dec:  # glimpses of the image; transparency from the detached heatmaps
            self.feat_encoder = GlimpseEncoder(
                c, h, anchor_s, learned_feature_dim, True, False, exclusive_patches
            )
            self.obj_on_head = mlp([heatmap_dim, 256, 128, n_kp])
        elif use_object_enc:  # glimpses of the detached heatmaps, location appended
            self.feat_encoder = GlimpseEncoder(
                n_kp, s, anchor_s, learned_feature_dim, False, True, exclusive_patches
            )
        else:
            self.feat_encoder = None
        # DLP's `object_enc`: an MLP on mask ⊙ detached heatmaps. It encodes the background
        # particle always, and the foreground particles too when there is no glimpse encoder.
        self.masked_feat = mlp([heatmap_dim, 256, 128, 2 * learned_feature_dim])
        # decoder side: DLP derives the CNN decoder widths from the encoder's (reversed)
        dec_channels = tuple(dec_channels or enc_channels[1:][::-1])
        self.decoder = ParticleDecoder(
            n_kp,
            learned_feature_dim,
            s,
            h,
            c,
            bg_maps=not use_object_dec,
            channels=dec_channels,
            mid_base=enc_channels[0],
            k=knn_k,
        )
        if use_object_dec:
            self.glimpse = glimpse_size(anchor_s, h)
            self.obj_decoder = GlimpseDecoder(learned_feature_dim, self.glimpse, c)
        init_dlp_weights(self)  # conv N(0, 0.01²), as the original
        self._vgg: list[VGGPerceptual] = []  # built on first use; kept out of the state dict

    # -- parameter groups
    def optimizer_params(self) -> Any:
        """Two groups (encoder + prior, decoder) in one Adam: Adam is per-parameter, so this is
        the original's two optimisers stepped on the same loss, with automatic optimisation and
        one scheduler (MultiStepLR acts on every group)."""
        dec = {
            id(p)
            for m in (self.decoder, getattr(self, "obj_decoder", None))
            if m
            for p in m.parameters()
        }
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if id(p) not in dec], "name": "encoder"},
            {"params": [p for p in params if id(p) in dec], "name": "decoder"},
        ]

    # -- training phases (object model)
    def _in_warmup(self) -> bool:
        return self.use_object_dec and self._epoch() < self.warmup_epoch

    def _noisy_masks(self) -> bool:
        """The original's noisy-mask phase: training epochs < 5·warmup_epoch."""
        return self.use_object_dec and self.training and self._epoch() < 5 * self.warmup_epoch

    def _epoch(self) -> int:
        """The training epoch while fitting; outside ``fit`` (test, eval.py, tests) the model is
        past any warm-up (``_fixed_epoch``), so reconstructions are full images."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return self._fixed_epoch
        return trainer.current_epoch

    _fixed_epoch = 10**9  # outside a Trainer: past any warm-up (tests, eval)

    # -- forward
    def _features(
        self, x: torch.Tensor, mu: torch.Tensor, heatmaps: torch.Tensor, fg_masks: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Appearance posteriors of the K + 1 particles and the object model's transparency.

        Returns feat_mu, feat_logvar [B, K+1, d], obj_on (learned) and obj_on_used (uniform
        noise in the noisy-mask phase, as the original), both [B, K] or None, and the glimpse
        crops [B, K, C, g, g] (object model) or None."""
        hm = heatmaps.detach()  # the heatmaps train only through mu
        obj_on = obj_on_used = crops = None
        if self.use_object_dec:
            obj_on = torch.sigmoid(self.obj_on_head(hm.flatten(1)))
            obj_on_used = torch.rand_like(obj_on) if self._noisy_masks() else obj_on
            f_mu, f_lv, crops = self.feat_encoder(x, mu.detach(), obj_on_used)
            # background region: outside every glimpse box on the heatmap grid
            boxes = box_masks(mu.detach(), glimpse_size(self.anchor_s, self.map_size), hm.shape[-1])
            bg_mask = 1 - boxes.squeeze(2).sum(1, keepdim=True).clamp(0, 1)
        else:
            if self.feat_encoder is not None:
                f_mu, f_lv, _ = self.feat_encoder(hm, mu.detach())
            else:
                masked = fg_masks.unsqueeze(2) * hm.unsqueeze(1)  # [B, K, K, S, S]
                f_mu, f_lv = self.masked_feat(masked.flatten(2)).chunk(2, -1)
            bg_mask = 1 - fg_masks.sum(1, keepdim=True).clamp(0, 1)
        bg_mu, bg_lv = self.masked_feat((bg_mask * hm).flatten(1)).chunk(2, -1)
        feat_mu = torch.cat([f_mu, bg_mu.unsqueeze(1)], 1)
        feat_lv = torch.cat([f_lv, bg_lv.unsqueeze(1)], 1)
        return feat_mu, feat_lv, obj_on, obj_on_used, crops

    def forward(self, x: torch.Tensor, deterministic: bool | None = None) -> dict[str, Any]:
        """Everything a step needs. ``deterministic`` (default: not training) uses z_kp = mu."""
        deterministic = not self.training if deterministic is None else deterministic
        b = x.shape[0]
        mu, logvar, heatmaps = self.kp_encoder(x)
        z = reparameterize(mu, logvar, not deterministic)
        bg_lv = math.log(self.sigma**2)
        mu_all = torch.cat([mu, mu.new_zeros(b, 1, 2)], 1)  # + the bg particle at the centre
        logvar_all = torch.cat([logvar, logvar.new_full((b, 1, 2), bg_lv)], 1)

        gmaps = gaussian_maps(z, self.sigma, self.map_size)  # [B, K, S, S]
        fg_masks = (gmaps > self.mask_threshold).to(gmaps.dtype)  # binary: no gradient
        fg_union = fg_masks.sum(1, keepdim=True).clamp(0, 1)

        feat_mu, feat_lv, obj_on, obj_on_used, crops = self._features(x, mu, heatmaps, fg_masks)
        feat = reparameterize(feat_mu, feat_lv, not deterministic)
        out = {
            "mu": mu,
            "logvar": logvar,
            "mu_all": mu_all,
            "logvar_all": logvar_all,
            "z": z,
            "feat_mu": feat_mu,
            "feat_logvar": feat_lv,
            "obj_on": obj_on,
            "obj_on_used": obj_on_used,
            "crops": crops,
        }
        pos_all = torch.cat([z, mu.new_zeros(b, 1, 2)], 1)
        if not self.use_object_dec:
            bg_heatmaps = (1 - fg_union) * heatmaps.detach()
            out["rec"] = self.decoder(pos_all, feat, gmaps, fg_union, bg_heatmaps)
            return out
        # object model: glimpses (alpha, RGB) stitched over the CNN background
        glimpses = self.obj_decoder(feat[:, : self.k].reshape(b * self.k, self.d))
        out["glimpses"] = glimpses.view(b, self.k, *glimpses.shape[1:])
        if self._in_warmup():
            bg = torch.zeros_like(x)  # DLP: no background decoder in the warm-up
        else:  # the background's PointNet sees the foreground features detached
            feat_bg = torch.cat([feat[:, : self.k].detach(), feat[:, self.k :]], 1)
            bg = self.decoder(pos_all, feat_bg, gmaps)
        # placed at z (not detached): the affine grid passes gradients to the positions
        placed = place_glimpses(glimpses, z, self.image_size).clamp(0, 1)
        alpha, rgb = placed[:, :, :1], placed[:, :, 1:]  # [B, K, 1 | C, H, W]
        if self._noisy_masks():
            alpha = alpha + self.sigma * torch.randn_like(alpha) * (alpha > 0.1)
        masks = exclusive_masks(obj_on_used[..., None, None, None] * alpha)
        out["objects"] = (masks * rgb).sum(1)
        out["masks"] = masks
        out["rec"] = (1 - masks.sum(1).clamp(0, 1)) * bg + out["objects"]
        return out

    # -- loss
    def _rec_loss(self, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Σ of squared errors per image (+ VGG perceptual), mean over the batch."""
        loss = (rec - x).pow(2).flatten(1).sum(1)
        if self.rec_loss == "vgg":
            if not self._vgg:  # frozen ImageNet weights: a download, not part of checkpoints
                self._vgg.append(VGGPerceptual(self.hparams.vgg_normalize))
            vgg = self._vgg[0].to(x.device)
            if rec.shape[-1] < 32:  # VGG needs at least 32 px
                rec, x = (F.interpolate(t, size=32, mode="bilinear") for t in (rec, x))
            loss = loss + vgg(rec, x)
        return loss.mean()

    @staticmethod
    def _images(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, the prior's image): a dict batch may carry ``prior_image`` (CelebA's TPS-warped
        pair, as the original's ``use_pairs``); otherwise the prior sees x."""
        if isinstance(batch, dict):
            if "image" not in batch:
                raise LatentzooError(
                    f"DLP: a dict batch needs an 'image' key (got {sorted(batch)}); "
                    "check the datamodule's output"
                )
            return batch["image"], batch.get("prior_image", batch["image"])
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return x, x

    def step(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        x, x_prior = self._images(batch)
        out = self(x, deterministic=stage != "train")
        prior = self.prior(x_prior)
        mu, logvar = (
            (out["mu_all"], out["logvar_all"])
            if self.chamfer_include_bg
            else (out["mu"], out["logvar"])
        )
        kl_kp = chamfer_kl(mu, logvar, prior, self.prior_logvar)
        kl_feat = gaussian_kl(out["feat_mu"], out["feat_logvar"]).sum((1, 2)).mean()
        if self._in_warmup():  # glimpse reconstruction: masked input crops vs decoded RGB
            crops = out["crops"].flatten(0, 1)
            rgb = out["glimpses"][:, :, 1:].flatten(0, 1)
            rec_loss = self._rec_loss(rgb, crops)  # mean over all B·K glimpses, as DLP
        else:
            rec_loss = self._rec_loss(out["rec"], x)
        loss = self.beta_rec * rec_loss + self.beta_kl * (kl_kp + self.kl_balance * kl_feat)
        mse = (out["rec"].detach().clamp(0, 1) - x).pow(2).flatten(1).mean(1)
        psnr = (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()
        return {
            "loss": loss,
            "rec": rec_loss,
            "kl_kp": kl_kp,
            "kl_feat": kl_feat,
            "psnr": psnr,
            "logvar_kp": out["logvar"].mean(),
        }

    # -- capabilities
    @torch.no_grad()
    def keypoints(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means (row, col) in [-1, 1] [B, K, 2] and confidence -Σ log σ² [B, K]."""
        mu, logvar, _ = self.kp_encoder(x)
        return mu, -logvar.sum(-1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, features: bool = False) -> torch.Tensor:
        """Keypoint means flattened [B, 2K]; with ``features`` + feature means [B, (K+1)·d]."""
        if not features:
            return self.kp_encoder(x)[0].flatten(1)
        out = self(x, deterministic=True)
        return torch.cat([out["mu"].flatten(1), out["feat_mu"].flatten(1)], 1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self(x, deterministic=True)["rec"].clamp(0, 1)
