"""Building blocks of the VDVAE: conv factories, diagonal-Gaussian KL and
sampling, and the discretized mixture of logistics (DMoL) likelihood and sampler.

Numerics follow the release exactly; the DMoL is adapted from
PixelCNN++ (openai/pixel-cnn ``nn.py``) as in the release, generalised to
1-channel images.  All images here are NHWC with values in [-1, 1].
"""
import contextlib
import functools
import math

import torch
from torch import nn
from torch.nn import functional as F

from hps import low_bit_targets


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


# ----------------------------------------------------------------------------- keyed noise

MASK32 = 0xFFFFFFFF
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # Philox-4x32 round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Philox key increments (golden ratio, sqrt(3) - 1)


def _halves(m, device, ndim):
    """The 16-bit halves (low, high) of a 32-bit multiplier, or of one multiplier per stacked
    word (a list), as an int64 tensor shaped to broadcast against (stack, *words) of ``ndim``
    dimensions behind a leading axis of the two halves: (2, 1, ..) or (2, len(m), 1, ..)."""
    m = torch.tensor(m, dtype=torch.int64)
    h = torch.stack([m & 0xFFFF, m >> 16])
    return h.view(h.shape + (1,) * (ndim - m.dim())).to(device)


def _mul_words(a, m):
    """a * m for an int64 tensor a of 32-bit words and a 32-bit multiplier m (an int, or
    _halves of one multiplier per leading index of a), as one (2, *a.shape) tensor of its low
    and high 32 bits.  m is split into 16-bit halves so that no int64 product overflows
    (each is below 2**48): exact integer arithmetic, the same bits on any device.  Both
    halves' products come from one multiplication."""
    p = a.unsqueeze(0) * (m if torch.is_tensor(m) else _halves(m, a.device, a.dim()))
    lo, hi = p.unbind(0)  # a * low half, a * high half
    tmp = hi & 0xFFFF
    lo.add_(tmp, alpha=1 << 16)  # the low 48 bits of a * m
    hi.bitwise_right_shift_(16).add_(torch.bitwise_right_shift(lo, 32, out=tmp))
    lo.bitwise_and_(MASK32)
    return p


def _mulhilo32(a, m):
    """(hi, lo): the upper and lower 32 bits of a * m (see _mul_words)."""
    lo, hi = _mul_words(a, m).unbind(0)
    return hi, lo


@functools.lru_cache(maxsize=64)
def _round_constants(key, rounds, device, ndim):
    """Philox's constants for the stacked state of _philox_rounds: the multipliers' halves, in
    the order (c2's, c0's), and every round's key, (rounds, 2, 1, ..) in the order (k0, k1).
    Kept once made: a copy from the host to a GPU waits for the device, at every batch."""
    k0, k1 = key
    keys = [[(k0 + r * PHILOX_W[0]) & MASK32, (k1 + r * PHILOX_W[1]) & MASK32] for r in range(rounds)]
    return (_halves([PHILOX_M[1], PHILOX_M[0]], device, ndim),
            torch.tensor(keys, dtype=torch.int64).view(rounds, 2, *(1,) * (ndim - 1)).to(device))


def _philox_rounds(a, b, constants, rounds, first=0):
    """Philox-4x32 rounds ``first`` .. ``rounds - 1`` on the counter words stacked in pairs:
    a = (c2, c0) and b = (c1, c3), each (2, ...); ``constants`` from _round_constants.  One
    round is then one stacked multiply-high-low and two xors, for all four words:
    (c0, c1, c2, c3) <- (hi(c2) ^ c1 ^ k0, lo(c2), hi(c0) ^ c3 ^ k1, lo(c0)).  Returns the
    words as one (2, 2, ...) tensor: [0] = (w1, w3), [1] = (w0, w2)."""
    halves, keys = constants
    for r in range(first, rounds):
        words = _mul_words(a, halves)
        lo, hi = words  # (lo(c2), lo(c0)) = the new (c1, c3); (hi(c2), hi(c0))
        hi.bitwise_xor_(b).bitwise_xor_(keys[r])  # the new (c0, c2)
        if r < rounds - 1:
            a, b = hi.flip(0), lo  # (c2, c0), (c1, c3) for the next round
    return words


def philox4x32(counter, key, rounds=10):
    """The Philox-4x32-R counter-based generator (Salmon et al. 2011, "Parallel random
    numbers: as easy as 1, 2, 3"; Random123's philox4x32_R; R = 10 is its default) on
    int64 tensors.

    counter: four int64 tensors of 32-bit words (broadcastable against each other, e.g. an
    element index (G,) against an image index (B, 1)); key: two 32-bit ints.  Returns four
    int64 tensors of 32-bit random words of the broadcast shape, a bijective function of the
    counter for a fixed key."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*counter)
    constants = _round_constants(key, rounds, c0.device, c0.dim() + 1)
    (w1, w3), (w0, w2) = _philox_rounds(torch.stack([c2, c0]), torch.stack([c1, c3]), constants, rounds)
    return w0, w1, w2, w3


def uniform_from_bits(w):
    """32-bit words -> uniforms in (0, 1] (float32): (top 24 bits + 1/2) / 2**24.  (The int64
    top bits and 1/2 meet in float32, exactly: they are below 2**24.)"""
    return ((w >> 8) + 0.5).mul_(2. ** -24)


class KeyedNormal:
    """Standard-normal noise that is a function of (seed, image, sample, layer, element)
    only, so an image gets the same noise whatever the batch it shares, the process that
    evaluates it or the device (EDM's per-sample seeding, taken down to the element).

    Row r of the batch is sample ``samples[r]`` of image ``images[r]`` (global positions in
    the split).  ``normal(layer, shape)`` draws (rows, *shape) from Philox-4x32-7 blocks
    with key (seed, 0) and counter (g, layer, image, sample), g = 0 .. G-1 with G = n/4
    rounded up (n elements in ``shape``): the block's words (w0, w1) and (w2, w3) become two
    pairs of normals by Box-Muller on 24-bit uniforms, elements g, G+g (from w0, w1) and
    2G+g, 3G+g (from w2, w3) of the row in C order.  The integer part gives identical bits
    on every device; the float part (log, sqrt, cos, sin in float32) agrees to a few ulps.

    On a GPU every operator is a kernel launch, so draws are written in few of them
    (docs/evaluation.md): the four counter words go through each round as two stacked pairs;
    the first round, which depends on the layer only through one xor, is computed once per
    element count; and once told which draws a pass will ask for (``expect``, as
    VAE.keyed_noise does), the first draw of a shape makes those of the following layers of
    that shape too, in the same operators, and hands them out as they are asked for."""

    # Seven rounds: the fewest that pass all of TestU01's BigCrush in Salmon et al.'s tests
    # (Random123's default of ten adds a safety margin).  Ten cost 12-16% of a tiny model's
    # evaluation on the CPU, seven 7-9%.
    ROUNDS = 7
    # Philox blocks (layers x rows x G) drawn together at the most: the int64 words of 2**22
    # blocks and their temporaries take about 0.4 GB (counted from the tensor sizes).
    GROUP_BLOCKS = 1 << 22

    def __init__(self, seed, images, samples=None):
        self.key = (int(seed) & MASK32, 0)
        self.images = torch.as_tensor(images, dtype=torch.int64)
        self.samples = torch.zeros_like(self.images) if samples is None else \
            torch.as_tensor(samples, dtype=torch.int64, device=self.images.device).expand_as(self.images)
        self._first_round = {}  # (device, G) -> what round 0 leaves of the counter, see _after_round_0
        self._expected = {}  # shape -> the layers a pass will draw with that shape, in order (expect)
        self._drawn = {}  # (layer, shape, device) -> normals drawn ahead with an earlier layer's

    def __len__(self):
        return len(self.images)

    def repeat(self, first, n):
        """Samples first .. first+n-1 of every image, rows ordered sample-major (row k*N + i is
        sample first+k of image i, as ``evaluation.log_weights`` repeats a batch)."""
        k = torch.arange(first, first + n, dtype=torch.int64, device=self.images.device)
        return KeyedNormal(self.key[0], self.images.repeat(n),
                           (self.samples.repeat(n) + k.repeat_interleave(len(self))))

    def expect(self, draws):
        """The draws a pass will ask for, [(layer, shape)] in order; the values do not change."""
        self._expected, self._drawn = {}, {}
        for layer, shape in draws:
            self._expected.setdefault(tuple(shape), []).append(layer)

    def _after_round_0(self, n_blocks, device):
        """Philox's first round on the counter (g, layer, image, sample) for every layer at
        once: (c2, c0) and (c1, c3) after it are (hi(g) ^ sample ^ k1, hi(image) ^ k0 ^ layer)
        and (lo(image), lo(g)), so only one xor depends on the layer.  Returns (c2 (rows, G),
        (c1, c3) (2, rows, G), hi(image) ^ k0 (rows, 1))."""
        cached = self._first_round.get((device, n_blocks))
        if cached is None:
            rows = len(self.images)
            m_c2, m_c0 = _round_constants(self.key, self.ROUNDS, device, 3)[0].unbind(1)  # halves, (2, 1, 1) each
            images = (self.images.to(device) & MASK32)[:, None]  # (rows, 1)
            samples = (self.samples.to(device) & MASK32)[:, None]
            hi_img, lo_img = _mulhilo32(images, m_c2)  # (rows, 1)
            hi_g, lo_g = _mulhilo32(torch.arange(n_blocks, dtype=torch.int64, device=device), m_c0)  # (1, G)
            c2 = hi_g ^ (samples ^ self.key[1])  # (rows, G), the same for every layer
            b = torch.stack([lo_img.expand(rows, n_blocks), lo_g.expand(rows, n_blocks)])
            cached = self._first_round[(device, n_blocks)] = c2, b, hi_img ^ self.key[0]
        return cached

    def normal(self, layer, shape, device=None):
        """float32 standard normals (rows, *shape) on ``device`` (default: the images')."""
        device = self.images.device if device is None else torch.device(device)
        shape = tuple(shape)
        drawn = self._drawn.pop((layer, shape, device), None)
        if drawn is not None:
            return drawn
        layers = [layer]
        expected = self._expected.get(shape, [])
        if layer in expected:  # this layer and the next expected ones of its shape, within GROUP_BLOCKS
            per_layer = len(self.images) * ((math.prod(shape) + 3) // 4)
            first = expected.index(layer)
            layers = expected[first:first + max(1, self.GROUP_BLOCKS // per_layer)]
        z = self._normals(layers, shape, device)
        for other, zl in zip(layers[1:], z[1:]):
            self._drawn[(other, shape, device)] = zl
        return z[0]

    def _normals(self, layers, shape, device):
        """The normals of several layers of one shape: a list of (rows, *shape)."""
        n, rows, n_layers = math.prod(shape), len(self.images), len(layers)
        n_blocks = (n + 3) // 4
        c2, b, hi_img_k0 = self._after_round_0(n_blocks, device)
        c0 = torch.bitwise_xor(hi_img_k0.expand(rows, n_blocks), _int_tensor(tuple(layers), device).view(-1, 1, 1))
        a = torch.stack([c2.expand(n_layers, rows, n_blocks), c0])  # (2, layers, rows, G), after round 0
        constants = _round_constants(self.key, self.ROUNDS, device, 4)
        w = _philox_rounds(a, b[:, None], constants, self.ROUNDS, first=1)  # (2, 2, layers, rows, G)
        u = uniform_from_bits(w)  # [0] = (w1, w3), [1] = (w0, w2)
        r = u[1].log_().mul_(-2.).sqrt_()  # Box-Muller: radii from w0, w2, angles from w1, w3
        theta = u[0].mul_(2 * math.pi)
        z = torch.empty(n_layers, rows, 4, n_blocks, device=device)
        zv = z.view(n_layers, rows, 2, 2, n_blocks).permute(2, 3, 0, 1, 4)  # (pair, cos/sin, layers, rows, G)
        torch.cos(theta, out=zv[:, 0])
        torch.sin(theta, out=zv[:, 1])
        zv.mul_(r.unsqueeze(1))
        return [zl.view(rows, -1)[:, :n].reshape(rows, *shape) for zl in z]


@functools.lru_cache(maxsize=256)
def _int_tensor(values, device):
    """An int64 tensor of ``values`` on ``device``, made once (see _round_constants)."""
    return torch.tensor(values, dtype=torch.int64).to(device)


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
        self.low_bit = low_bit_targets(H)  # 5-bit targets, as the release trains ffhq256
        self.out_conv = get_conv(H.width, H.num_mixtures * dmol_params_per_mixture(self.channels),
                                 kernel_size=1, stride=1, padding=0)
        self.loss_fn = discretized_mix_logistic_loss  # VAE.compile_blocks swaps in a compiled copy

    def forward(self, px_z):
        """px_z (B,width,H,W) -> DMoL parameters (B,H,W,P), computed in float32 under any autocast:
        in bf16 a mixture mean near +-1 would be rounded by about one 8-bit bin (spacing 2**-7),
        which a sharp mixture's likelihood feels (0.11 nats/dim on the sharp mixtures of
        tests/test_dmol.py)."""
        device = px_z.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else \
                contextlib.nullcontext():  # (devices without autocast, e.g. meta, have nothing to turn off)
            return self.out_conv(px_z.float()).permute(0, 2, 3, 1)

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
