"""Building blocks of the VDVAE: conv factories, diagonal-Gaussian KL and
sampling, and the discretized mixture of logistics (DMoL) likelihood and sampler.

Numerics follow the release exactly (SPEC §5); the DMoL is adapted from
PixelCNN++ (openai/pixel-cnn ``nn.py``) as in the release, generalised to
1-channel images.  All images here are NHWC with values in [-1, 1].
"""
import math

import torch
from torch import nn
from torch.nn import functional as F


# ----------------------------------------------------------------------------- convs

def get_conv(in_dim, out_dim, kernel_size, stride, padding, zero_bias=True, zero_weights=False, groups=1):
    """nn.Conv2d with PyTorch's default init, bias zeroed, weights optionally zeroed."""
    c = nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding, groups=groups)
    if zero_bias:
        c.bias.data *= 0.0
    if zero_weights:
        c.weight.data *= 0.0
    return c


def get_3x3(in_dim, out_dim, zero_bias=True, zero_weights=False, groups=1):
    return get_conv(in_dim, out_dim, 3, 1, 1, zero_bias, zero_weights, groups=groups)


def get_1x1(in_dim, out_dim, zero_bias=True, zero_weights=False, groups=1):
    return get_conv(in_dim, out_dim, 1, 1, 0, zero_bias, zero_weights, groups=groups)


# ----------------------------------------------------------------------------- Gaussians

def gaussian_analytical_kl(mu1, mu2, logsigma1, logsigma2):
    """KL(N(mu1, sigma1^2) || N(mu2, sigma2^2)) per element, in nats (sigmas given as log std).

    The release's formula, value for value.  When a gradient is needed and the four inputs
    have one shape, its backward is the closed form (GaussianKL): 7 elementwise operations
    instead of about 20 through autograd, equal to float rounding."""
    if torch.is_grad_enabled() and mu1.shape == mu2.shape == logsigma1.shape == logsigma2.shape and any(
            t.requires_grad for t in (mu1, mu2, logsigma1, logsigma2)):
        return GaussianKL.apply(mu1, mu2, logsigma1, logsigma2)
    return _kl_terms(mu1, mu2, logsigma1, logsigma2)[0]


def _kl_terms(mu1, mu2, logsigma1, logsigma2):
    """The release's KL expression, evaluated in its order; returns (kl, mu1 - mu2, sigma1^2,
    sigma2^2, the fraction 0.5 (sigma1^2 + (mu1 - mu2)^2) / sigma2^2)."""
    diff = mu1 - mu2
    var1, var2 = logsigma1.exp() ** 2, logsigma2.exp() ** 2
    frac = 0.5 * (var1 + diff ** 2) / var2
    return -0.5 + logsigma2 - logsigma1 + frac, diff, var1, var2, frac


class GaussianKL(torch.autograd.Function):
    """gaussian_analytical_kl with its gradient in closed form.  With d = mu1 - mu2 and
    v1, v2 the variances:  dKL/dmu1 = d / v2 = -dKL/dmu2,  dKL/dlogsigma1 = v1 / v2 - 1,
    dKL/dlogsigma2 = 1 - (v1 + d^2) / v2 = 1 - 2 * frac."""

    @staticmethod
    def forward(ctx, mu1, mu2, logsigma1, logsigma2):
        kl, diff, var1, var2, frac = _kl_terms(mu1, mu2, logsigma1, logsigma2)
        ctx.save_for_backward(diff, var1, var2, frac)
        return kl

    @staticmethod
    def backward(ctx, g):
        diff, var1, var2, frac = ctx.saved_tensors
        g_mu1 = g * diff / var2
        return g_mu1, -g_mu1, g * (var1 / var2 - 1), torch.addcmul(g, g, frac, value=-2)


def gaussian_log_density(z, mu, logsigma):
    """log N(z; mu, sigma^2) per element, in nats."""
    return -0.5 * math.log(2 * math.pi) - logsigma - 0.5 * ((z - mu) * torch.exp(-logsigma)) ** 2


def draw_gaussian_diag_samples(mu, logsigma):
    """z = mu + sigma * eps with one standard-normal draw shaped like mu, filled in
    contiguous (B,C,H,W) order whatever mu's memory format (so channels_last draws the
    same noise per element as the release's empty_like on contiguous tensors)."""
    eps = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device).normal_(0., 1.)
    return torch.exp(logsigma) * eps + mu


# ----------------------------------------------------------------------------- DMoL

def dmol_params_per_mixture(channels):
    """Output channels per mixture component: 10 for RGB (logit + 3 x (mean, log-scale,
    coefficient)), 3 for grayscale (logit, mean, log-scale)."""
    if channels == 3:
        return 10
    if channels == 1:
        return 3
    raise ValueError(f"the DMoL head supports 1 or 3 image channels, not {channels}")


def _unpack(l, channels, nr_mix):
    """Split head output l (B,H,W,P) into mixture logits (B,H,W,M), means and log-scales
    (B,H,W,C,M) and coupling coefficients (B,H,W,C,M) (None for grayscale).

    RGB layout (the release's): [M logits | for c in RGB: M means, M log-scales, M coeffs].
    Grayscale layout: [M logits | M means | M log-scales].
    """
    b, h, w, _ = l.shape
    per_channel = 3 if channels == 3 else 2
    # splits, not slices: in backward one concatenation instead of a zero-filled copy per slice
    logit_probs, rest = l.split([nr_mix, l.shape[-1] - nr_mix], dim=-1)
    parts = rest.reshape(b, h, w, channels, per_channel * nr_mix).split(nr_mix, dim=-1)
    means, log_scales = parts[0], parts[1].clamp_min(-7.)
    coeffs = torch.tanh(parts[2]) if channels == 3 else None
    return logit_probs, means, log_scales, coeffs


def discretized_mix_logistic_loss(x, l, low_bit=False):
    """Negative log-likelihood of images under a discretized mixture of logistics.

    x: (B,H,W,C) targets in [-1, 1] (C = 1 or 3); l: (B,H,W,M*10) for RGB or (B,H,W,M*3)
    for grayscale.  8-bit bins have half-width 1/255 (256 values), 5-bit (``low_bit``)
    bins 1/31 (32 values); the outermost bins are open-ended (x < -0.999, x > 0.999).
    Returns (B,): NLL summed over pixels and channels, divided by H*W*C (nats per dim).
    """
    b, h, w, channels = x.shape
    nr_mix = l.shape[-1] // dmol_params_per_mixture(channels)
    logit_probs, means, log_scales, coeffs = _unpack(l, channels, nr_mix)
    x = x.unsqueeze(-1)  # (B,H,W,C,1), broadcast against the M mixtures
    if channels == 3:
        # PixelCNN++ coupling: green's mean depends on red, blue's on red and green (targets).
        (m1, m2, m3), (c0, c1, c2), (x1, x2, _) = means.unbind(3), coeffs.unbind(3), x.unbind(3)
        means = torch.stack([m1, m2 + c0 * x1, m3 + c1 * x1 + c2 * x2], dim=3)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    half_bin = 1. / 31. if low_bit else 1. / 255.
    plus_in = inv_stdv * (centered_x + half_bin)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - half_bin)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log P(bin) of the lowest value (open to -inf)
    log_one_minus_cdf_min = -F.softplus(min_in)  # log P(bin) of the highest value (open to +inf)
    cdf_delta = cdf_plus - cdf_min  # P(bin) of every other value
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2. * F.softplus(mid_in)  # log density at the bin centre
    # Where P(bin) < 1e-5, approximate it by density x bin width (the release's fallback).
    log_bin_width = math.log(15.5) if low_bit else math.log(127.5)
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min,
                                        torch.where(cdf_delta > 1e-5,
                                                    torch.log(cdf_delta.clamp_min(1e-12)),
                                                    log_pdf_mid - log_bin_width)))
    log_probs = log_probs.sum(dim=3) + log_prob_from_logits(logit_probs)  # (B,H,W,M)
    mixture_probs = torch.logsumexp(log_probs, -1)
    return -1. * mixture_probs.sum(dim=[1, 2]) / (h * w * channels)


def log_prob_from_logits(x):
    """Numerically stable log-softmax over the last axis (the release's formula)."""
    m = x.max(dim=-1, keepdim=True)[0]
    return x - m - torch.log(torch.exp(x - m).sum(dim=-1, keepdim=True))


def sample_from_discretized_mix_logistic(l, nr_mix, channels=3):
    """Draw images (B,H,W,C) in [-1, 1] from DMoL parameters l (B,H,W,P).

    Random draws, in order: uniforms for the Gumbel-max mixture choice, shaped (B,H,W,M),
    then uniforms for the logistic samples, shaped (B,H,W,C); both in (1e-5, 1-1e-5).
    """
    b, h, w, _ = l.shape
    logit_probs, means, log_scales, coeffs = _unpack(l, channels, nr_mix)
    eps = torch.empty(logit_probs.shape, device=l.device).uniform_(1e-5, 1. - 1e-5)
    amax = torch.argmax(logit_probs - torch.log(-torch.log(eps)), dim=3)
    sel = F.one_hot(amax, num_classes=nr_mix).to(l.dtype).unsqueeze(3)  # (B,H,W,1,M)
    means = (means * sel).sum(dim=4)  # (B,H,W,C): the chosen component's parameters
    log_scales = (log_scales * sel).sum(dim=4)
    u = torch.empty(means.shape, device=means.device).uniform_(1e-5, 1. - 1e-5)
    x = means + torch.exp(log_scales) * (torch.log(u) - torch.log(1. - u))
    if channels == 1:
        return x.clamp(-1., 1.)
    coeffs = (coeffs * sel).sum(dim=4)
    x0 = x[..., 0].clamp(-1., 1.)
    x1 = (x[..., 1] + coeffs[..., 0] * x0).clamp(-1., 1.)
    x2 = (x[..., 2] + coeffs[..., 1] * x0 + coeffs[..., 2] * x1).clamp(-1., 1.)
    return torch.stack([x0, x1, x2], dim=3)


class DmolNet(nn.Module):
    """Output head: 1x1 conv from the decoder's final state to DMoL parameters."""

    def __init__(self, H):
        super().__init__()
        self.H = H
        self.channels = H.image_channels
        self.low_bit = H.dataset in ['ffhq_256']  # 5-bit targets (SPEC §7)
        self.out_conv = get_conv(H.width, H.num_mixtures * dmol_params_per_mixture(self.channels),
                                 kernel_size=1, stride=1, padding=0)
        self.loss_fn = discretized_mix_logistic_loss  # VAE.compile_blocks swaps in a compiled copy

    def forward(self, px_z):
        """px_z (B,width,H,W) -> DMoL parameters (B,H,W,P), always float32."""
        return self.out_conv(px_z).permute(0, 2, 3, 1).float()

    def nll(self, px_z, x):
        """Per-image NLL in nats/dim of targets x (B,H,W,C)."""
        return self.loss_fn(x=x, l=self.forward(px_z), low_bit=self.low_bit)

    def sample_float(self, px_z):
        """Images (B,H,W,C) in [-1, 1]."""
        return sample_from_discretized_mix_logistic(self.forward(px_z), self.H.num_mixtures, self.channels)

    def sample(self, px_z):
        """uint8 numpy images (B,H,W,C): (x + 1) * 127.5 clipped to [0, 255] and truncated."""
        xhat = (self.sample_float(px_z) + 1.0) * 127.5
        return xhat.clamp(0.0, 255.0).detach().cpu().numpy().astype('uint8')
