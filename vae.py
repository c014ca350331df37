"""The Very Deep VAE (Child 2021, arXiv 2011.10650), parameter-for-parameter the release.

A bottom-up ``Encoder`` of residual ``Block``s collects activations at every
resolution; a top-down ``Decoder`` of ``DecBlock``s turns them into posteriors
q(z_i | z_<i, x), priors p(z_i | z_<i) and the final state, which the DMoL head
(``vae_helpers.DmolNet``) turns into p(x | z).  Layer strings (e.g. "32x11,32d2") decide the
blocks; parameter names and order match the released checkpoints.

    from hps import preset; from vae import VAE; import torch
    with torch.device('meta'): print(VAE(preset('cifar10')).num_params())   # 39145700
"""
import contextlib
import itertools
import math
import re
from collections import defaultdict

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from hps import UserError
from vae_helpers import (DmolNet, discretized_mix_logistic_loss, draw_gaussian_diag_samples, gaussian_analytical_kl,
                         get_1x1, get_3x3)


LAYER_TOKEN = re.compile(r'([+-]?\d+)(?:([xdm])([+-]?\d+))?')
TOKEN_FORMS = ("RxN (N blocks at resolution R), RdK (one block, then average-pooled by K), RmS (one decoder "
               "block that mixes in resolution S) or R (one block), with positive integers R, N, K, S")


def layer_tokens(s, flag='layer string'):
    """'32x2,32d2,4m1,1' -> [('32x2', 32, 'x', 2), ('32d2', 32, 'd', 2), ('4m1', 4, 'm', 1), ('1', 1, '', None)]:
    (token, resolution, kind, number) per token, every number a positive integer.  A token
    that is not of the four forms is a UserError naming ``flag``, the token and the forms."""
    if not s or not isinstance(s, str):
        raise UserError(f"{flag} is not set: give a layer string of comma-separated tokens {TOKEN_FORMS}")
    out = []
    for tok in s.split(','):
        m = LAYER_TOKEN.fullmatch(tok.strip())
        if m is None:
            raise UserError(f"{flag} {s!r}: bad token {tok!r}: expected {TOKEN_FORMS}")
        res, kind, num = int(m.group(1)), m.group(2) or '', None if m.group(3) is None else int(m.group(3))
        if res < 1:
            raise UserError(f"{flag} {s!r}: token {tok!r} is at resolution {res}: a resolution R must be >= 1")
        if num is not None and num < 1:
            what = {'x': 'block count N of RxN', 'd': 'down rate K of RdK', 'm': 'mixin resolution S of RmS'}[kind]
            raise UserError(f"{flag} {s!r}: token {tok!r} has {what} = {num}: it must be >= 1")
        out.append((tok, res, kind, num))
    return out


def parse_layer_string(s):
    """'32x2,32d2,4m1,1' -> [(32, None), (32, None), (32, 2), (4, 1), (1, None)].

    The second entry is the down rate (``RdK``, encoder), the mixin resolution
    (``RmS``, decoder) or None.
    """
    layers = []
    for _, res, kind, num in layer_tokens(s):
        layers += [(res, None)] * num if kind == 'x' else [(res, num if kind else None)]
    return layers


def get_width_settings(width, s):
    """Channels per resolution: ``width`` unless ``s`` ('512:32,256:64') says otherwise."""
    mapping = defaultdict(lambda: width)
    for tok in s.split(',') if s else []:
        m = re.fullmatch(r'(\d+):(\d+)', tok.strip())
        if m is None or min(int(m.group(1)), int(m.group(2))) < 1:
            raise UserError(f"--custom_width_str {s!r}: bad token {tok!r}: expected resolution:width pairs of "
                            "positive integers separated by commas, e.g. 512:32,256:64")
        mapping[int(m.group(1))] = int(m.group(2))
    return mapping


def pad_channels(t, width):
    """Zero-pad (B,C,H,W) to (B,width,H,W)."""
    return F.pad(t, (0, 0, 0, 0, 0, width - t.shape[1]))


class Block(nn.Module):
    """Bottleneck residual block: GELU before each of c1 (1x1), c2, c3 (3x3, or 1x1 at
    resolution <= 2) and c4 (1x1); optional residual; optional average pooling."""

    def __init__(self, in_width, middle_width, out_width, down_rate=None, residual=False, use_3x3=True,
                 zero_last=False):
        super().__init__()
        self.down_rate = down_rate
        self.residual = residual
        conv = get_3x3 if use_3x3 else get_1x1
        self.c1 = get_1x1(in_width, middle_width)
        self.c2 = conv(middle_width, middle_width)
        self.c3 = conv(middle_width, middle_width)
        self.c4 = get_1x1(middle_width, out_width, zero_weights=zero_last)

    def forward(self, x, activated=False):
        """x (B,in,R,R) -> (B,out,R/down,R/down).  ``activated``: x is already GELU(input), for
        non-residual blocks whose caller shares one GELU between blocks (DecBlock)."""
        xhat = self.c1(x if activated else F.gelu(x))
        xhat = self.c2(F.gelu(xhat))
        xhat = self.c3(F.gelu(xhat))
        xhat = self.c4(F.gelu(xhat))
        out = x + xhat if self.residual else xhat
        if self.down_rate is not None:
            out = F.avg_pool2d(out, kernel_size=self.down_rate, stride=self.down_rate)
        return out


def _maybe_checkpoint(enabled, fn, *args):
    """Activation checkpointing (recompute in backward) when enabled and training.  The
    recomputed functions draw no random numbers (Block: none; DecBlock._step gets its noise
    as an argument), so the RNG states are not saved and restored around each block."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


class Encoder(nn.Module):
    """Bottom-up pass: x (B,H,W,C) -> {resolution: activation (B,width[res],res,res)}."""

    def __init__(self, H):
        super().__init__()
        self.H = H
        self.grad_checkpoint = False
        self.in_conv = get_3x3(H.image_channels, H.width)
        self.widths = get_width_settings(H.width, H.custom_width_str)
        blockstr = parse_layer_string(H.enc_blocks)
        enc_blocks = []
        for res, down_rate in blockstr:
            use_3x3 = res > 2  # no 3x3 convs on 1x1 and 2x2 maps
            enc_blocks.append(Block(self.widths[res], int(self.widths[res] * H.bottleneck_multiple),
                                    self.widths[res], down_rate=down_rate, residual=True, use_3x3=use_3x3))
        for b in enc_blocks:
            b.c4.weight.data *= math.sqrt(1 / len(blockstr))
        self.enc_blocks = nn.ModuleList(enc_blocks)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
        x = x.contiguous(memory_format=_memory_format(self))
        x = self.in_conv(x).float()  # residual stream in float32 also under autocast (no-op in fp32)
        activations = {x.shape[2]: x}
        for block in self.enc_blocks:
            x = _maybe_checkpoint(self.grad_checkpoint, block, x)
            res = x.shape[2]
            x = x if x.shape[1] == self.widths[res] else pad_channels(x, self.widths[res])
            activations[res] = x
        return activations


def _memory_format(module):
    return torch.channels_last if getattr(module, 'channels_last', False) else torch.contiguous_format


class DecBlock(nn.Module):
    """One top-down step at resolution ``res``, as in the release: posterior ``enc``, ``prior``,
    latent projection ``z_proj`` and residual ``resnet``."""

    def __init__(self, H, res, mixin, n_blocks):
        super().__init__()
        self.base = res
        self.mixin = mixin
        self.H = H
        self.widths = get_width_settings(H.width, H.custom_width_str)
        width = self.widths[res]
        use_3x3 = res > 2
        cond_width = int(width * H.bottleneck_multiple)
        self.zdim = H.zdim
        self.grad_checkpoint = False
        self.noise_slice = None
        self.noise = None  # a vae_helpers.KeyedNormal while VAE.keyed_noise is active
        self.index = None  # position in the decoder, set by Decoder (keys the keyed noise)
        self.enc = Block(width * 2, cond_width, H.zdim * 2, residual=False, use_3x3=use_3x3)
        self.prior = Block(width, cond_width, H.zdim * 2 + width, residual=False, use_3x3=use_3x3, zero_last=True)
        self.z_proj = get_1x1(H.zdim, width)
        self.z_proj.weight.data *= math.sqrt(1 / n_blocks)
        self.resnet = Block(width, cond_width, width, residual=True, use_3x3=use_3x3)
        self.resnet.c4.weight.data *= math.sqrt(1 / n_blocks)

    def _prior(self, x, activated=False):
        """x (B,w,R,R) -> prior mean, prior log-std (B,zdim,R,R) and residual xpp (B,w,R,R).
        ``activated``: x is GELU(state) (see Block.forward)."""
        feats = self.prior(x, activated=activated)
        # one split (its backward: one concatenation), not three slices (three zero-filled copies)
        return feats.split([self.zdim, self.zdim, feats.shape[1] - 2 * self.zdim], dim=1)

    def _mix(self, xs, x):
        """Add the nearest-upsampled state of the mixin resolution (first w channels)."""
        if self.mixin is not None:
            low = xs[self.mixin]
            low = low if low.shape[1] == x.shape[1] else low[:, :x.shape[1]]  # no slice (and backward copy) when whole
            x = x + F.interpolate(low, scale_factor=self.base // self.mixin)
        return x

    def _step(self, x, gelu_acts, eps):
        """Posterior step at this resolution.  x: (B,w,R,R) state; gelu_acts: GELU of the encoder
        activation (B,w,R,R); eps: (B,zdim,R,R) standard normal noise.  Returns the new state,
        z = qm + exp(qv) * eps, and the posterior and prior means and log-stds (B,zdim,R,R).

        Both ``enc`` and ``prior`` open with a GELU of their input, and GELU is elementwise:
        enc(cat[x, acts]) = enc.c1..c4(cat[gelu(x), gelu(acts)]).  So gelu(x) is computed once
        for both, and gelu(acts) once per resolution (Decoder.forward), not once per block.
        The forward values are bitwise those of the release's formulation."""
        gx = F.gelu(x)
        qm, qv = self.enc(torch.cat([gx, gelu_acts], dim=1), activated=True).chunk(2, dim=1)
        pm, pv, xpp = self._prior(gx, activated=True)
        z = torch.exp(qv) * eps + qm
        h = x + xpp
        h += self.z_proj(z)  # (x + xpp) + z_proj(z), as the release, without a third buffer
        x = self.resnet(h)
        return x, z, qm, qv, pm, pv

    def forward(self, xs, activations, get_latents=False, get_dists=False, gelu_cache=None):
        """Posterior pass.  xs: {res: state}.  Returns xs and a dict with the per-element
        ``kl`` (B,zdim,R,R), plus ``z`` (get_latents) and q/p parameters (get_dists).
        ``gelu_cache``: a dict shared by the blocks of one pass, {res: GELU(activations[res])}."""
        acts = activations[self.base]
        gelu_cache = {} if gelu_cache is None else gelu_cache
        if self.base not in gelu_cache:
            gelu_cache[self.base] = F.gelu(acts)
        x = xs[self.base] if self.base in xs else torch.zeros_like(acts)
        if acts.shape[0] != x.shape[0]:
            x = x.repeat(acts.shape[0], 1, 1, 1)  # a learned bias (1,w,R,R)
        x = self._mix(xs, x)
        # one standard-normal draw per block, top-down, as the release; drawn outside the
        # (optionally checkpointed) step so that recomputation sees the same noise
        eps = self._noise(x.shape[0], x.device)
        x, z, qm, qv, pm, pv = _maybe_checkpoint(self.grad_checkpoint, self._step, x, gelu_cache[self.base], eps)
        xs[self.base] = x
        # in float32 also under autocast (a no-op in fp32): the KL subtracts log-stds of similar size
        stats = dict(kl=gaussian_analytical_kl(qm.float(), pm.float(), qv.float(), pv.float()))
        if get_latents:
            stats['z'] = z.detach()
        if get_dists:
            stats.update(qm=qm, qv=qv, pm=pm, pv=pv, z=z)
        return xs, stats

    def _noise(self, n, device):
        """Standard normal (n,zdim,R,R).  Keyed by (image, layer, element) when a KeyedNormal
        is set (evaluation), else from the device's RNG; with a noise slice (rank, world) that
        draw is for the global batch of world*n images and this rank keeps its rows (see
        --rank_invariant_noise)."""
        if self.noise is not None:
            if len(self.noise) != n:
                raise ValueError(f"keyed noise for {len(self.noise)} rows, batch of {n}")
            return self.noise.normal(self.index, (self.zdim, self.base, self.base), device)
        rank, world = self.noise_slice or (0, 1)
        eps = torch.empty((n * world, self.zdim, self.base, self.base), device=device).normal_(0., 1.)
        return eps if world == 1 else eps[rank * n:(rank + 1) * n]

    def forward_uncond(self, xs, t=None, lvs=None):
        """Prior pass: z ~ p(z | state) at temperature t (log t added to the log-std),
        or z = lvs when a latent is given."""
        if self.base in xs:
            x = xs[self.base]
        else:
            ref = next(iter(xs.values()))
            x = torch.zeros((ref.shape[0], self.widths[self.base], self.base, self.base),
                            dtype=ref.dtype, device=ref.device)
        x = self._mix(xs, x)
        pm, pv, xpp = self._prior(x)
        x = x + xpp
        if lvs is not None:
            z = lvs
        else:
            if t is not None:
                pv = pv + math.log(t)
            z = draw_gaussian_diag_samples(pm, pv)
        xs[self.base] = self.resnet(x + self.z_proj(z))
        return xs


class Decoder(nn.Module):
    """Top-down pass: activations -> final state (B,width,H,W) and per-block stats."""

    def __init__(self, H):
        super().__init__()
        self.H = H
        self.widths = get_width_settings(H.width, H.custom_width_str)
        blocks = parse_layer_string(H.dec_blocks)
        self.dec_blocks = nn.ModuleList([DecBlock(H, res, mixin, n_blocks=len(blocks)) for res, mixin in blocks])
        for i, block in enumerate(self.dec_blocks):
            block.index = i
        self.resolutions = sorted({res for res, _ in blocks})
        self.bias_xs = nn.ParameterList([nn.Parameter(torch.zeros(1, self.widths[res], res, res))
                                         for res in self.resolutions if res <= H.no_bias_above])
        self.out_net = DmolNet(H)
        self.gain = nn.Parameter(torch.ones(1, H.width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, H.width, 1, 1))

    def final_fn(self, x):
        return x * self.gain + self.bias

    def _initial_states(self, n=None):
        """{res: learned bias}, repeated to batch size n when given."""
        return {b.shape[2]: (b if n is None else b.repeat(n, 1, 1, 1)) for b in self.bias_xs}

    def forward(self, activations, get_latents=False, get_dists=False):
        stats = []
        xs = self._initial_states()
        gelu_cache = {}  # GELU of each encoder activation, computed once for all blocks at its resolution
        for block in self.dec_blocks:
            xs, block_stats = block(xs, activations, get_latents=get_latents, get_dists=get_dists,
                                    gelu_cache=gelu_cache)
            stats.append(block_stats)
        return self.final_fn(xs[self.H.image_size]), stats

    def forward_uncond(self, n, t=None, y=None):
        xs = self._initial_states(n)
        for idx, block in enumerate(self.dec_blocks):
            temp = t[idx] if isinstance(t, (list, tuple)) else t
            xs = block.forward_uncond(xs, temp)
        return self.final_fn(xs[self.H.image_size])

    def forward_manual_latents(self, n, latents, t=None):
        """Blocks with a given latent use it; the rest sample from the prior at t."""
        xs = self._initial_states(n)
        for block, lvs in itertools.zip_longest(self.dec_blocks, latents):
            xs = block.forward_uncond(xs, t, lvs=lvs)
        return self.final_fn(xs[self.H.image_size])


class VAE(nn.Module):
    """Encoder + decoder.  Inputs are NHWC floats: ``x`` normalised for the encoder,
    ``x_target`` in [-1, 1] for the likelihood (see data.preprocess)."""

    def __init__(self, H):
        super().__init__()
        check_hparams(H)
        self.H = H
        self.encoder = Encoder(H)
        self.decoder = Decoder(H)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def set_grad_checkpoint(self, enabled):
        """Recompute block activations in backward (less memory, ~1/3 more compute)."""
        self.encoder.grad_checkpoint = enabled
        for block in self.decoder.dec_blocks:
            block.grad_checkpoint = enabled

    def set_noise_slice(self, rank, world_size):
        """Make posterior noise independent of how the batch is split over processes."""
        for block in self.decoder.dec_blocks:
            block.noise_slice = (rank, world_size)

    @contextlib.contextmanager
    def keyed_noise(self, noise):
        """Inside, every decoder block draws its posterior noise from ``noise`` (a
        vae_helpers.KeyedNormal with one row per image of the batch) instead of the RNG, so
        an image's ELBO depends on the weights, the seed and its position in the split only,
        not on batch size, process count or device.  Evaluation uses this; training keeps
        the device's RNG.  ``noise`` is told the draws a pass makes (KeyedNormal.expect), so
        that it makes those of one shape together."""
        blocks = self.decoder.dec_blocks
        noise.expect([(block.index, (block.zdim, block.base, block.base)) for block in blocks])
        for block in blocks:
            block.noise = noise
        try:
            yield self
        finally:
            for block in self.decoder.dec_blocks:
                block.noise = None

    def compile_blocks(self, **compile_kwargs):
        """torch.compile every residual ``Block`` (the encoder's, and each decoder block's
        ``enc``, ``prior`` and ``resnet``) and the DMoL loss one by one, instead of the whole
        model.  Blocks of the same shape share one compiled graph, so a deep preset builds
        in a fraction of whole-model compile time, and every random draw (posterior noise,
        prior samples, the DMoL sampler) stays in eager code: the same seed gives the same
        noise as the plain model.  ``compile_kwargs`` go to ``torch.compile`` (e.g.
        ``mode='max-autotune-no-cudagraphs'``, ``dynamic=False``).  Parameter names and the
        state dict are unchanged.  Returns self."""
        import torch._dynamo
        blocks = [m for m in self.modules() if isinstance(m, Block)]
        # one cache entry per distinct block configuration; allow them all
        limit = len(blocks) + 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                               4 * limit)
        for b in blocks:
            b.compile(**compile_kwargs)
        self.decoder.out_net.loss_fn = torch.compile(discretized_mix_logistic_loss, **compile_kwargs)
        return self

    def set_channels_last(self, enabled):
        """Run the convolutions in NHWC memory layout (faster on tensor cores)."""
        self.encoder.channels_last = enabled
        if enabled:
            self.to(memory_format=torch.channels_last)
        else:
            self.to(memory_format=torch.contiguous_format)

    def forward_per_image(self, x, x_target):
        """Per-image losses in nats/dim: ``distortion``, ``rate``, ``elbo`` (B,) and
        ``kl_per_block`` (B, n_dec_blocks) (nats, summed over c,h,w, not divided)."""
        activations = self.encoder(x)
        px_z, stats = self.decoder(activations)
        distortion = self.decoder.out_net.nll(px_z, x_target)
        ndims = math.prod(x.shape[1:])
        kl_sums = [s['kl'].float().sum(dim=(1, 2, 3)) for s in stats]  # (B,) nats per block, summed once
        kl_per_block = torch.stack(kl_sums, dim=1)
        rate = torch.zeros_like(distortion)
        for k in kl_sums:  # accumulate block by block, in the release's order
            rate += k
        rate /= ndims
        return dict(elbo=distortion + rate, distortion=distortion, rate=rate, kl_per_block=kl_per_block)

    def forward_with_dists(self, x, x_target):
        """One posterior pass exposing everything an evaluation needs: per-image
        ``distortion`` (B,) in nats/dim and, per decoder block, a dict with ``z``, the
        posterior ``qm``/``qv`` and prior ``pm``/``pv`` means and log-stds, and ``kl``
        (all (B,zdim,R,R))."""
        px_z, stats = self.decoder(self.encoder(x), get_dists=True)
        return self.decoder.out_net.nll(px_z, x_target), stats

    def forward(self, x, x_target):
        """The release's API: batch means of elbo, distortion and rate (nats/dim)."""
        out = self.forward_per_image(x, x_target)
        return dict(elbo=out['elbo'].mean(), distortion=out['distortion'].mean(), rate=out['rate'].mean())

    def forward_get_latents(self, x):
        """Per decoder block: dict(z, kl) for posterior samples z ~ q(z | x)."""
        _, stats = self.decoder(self.encoder(x), get_latents=True)
        return stats

    def forward_uncond_samples(self, n_batch, t=None):
        """uint8 samples (n,H,W,C); t a number or a list with one entry per decoder block."""
        return self.decoder.out_net.sample(self.decoder.forward_uncond(n_batch, t=t))

    def forward_samples_set_latents(self, n_batch, latents, t=None):
        """uint8 samples with the first len(latents) blocks' latents fixed."""
        return self.decoder.out_net.sample(self.decoder.forward_manual_latents(n_batch, latents, t=t))


def check_hparams(H):
    """Refuse, with one line naming the flag, the token and the rule, every configuration the
    architecture cannot build or run (layer strings, widths, encoder and decoder).
    Cheap (no tensors): train.py calls it before reading any data."""
    widths = get_width_settings(H.width, H.custom_width_str)
    if widths[H.image_size] != H.width:
        raise UserError(f"width at the image resolution {H.image_size} is {widths[H.image_size]} "
                        f"(custom_width_str={H.custom_width_str!r}) but --width is {H.width}; in_conv, gain/bias "
                        "and the output head use --width, so the two must be equal")
    enc_res, enc_blocks = _check_encoder(H, widths)
    dec_res = _check_decoder(H, enc_res)
    for res in sorted(set(enc_blocks) | set(dec_res)):
        if int(widths[res] * H.bottleneck_multiple) < 1:
            raise UserError(f"--bottleneck_multiple {H.bottleneck_multiple}: the blocks at resolution {res} (width "
                            f"{widths[res]}) get a bottleneck of int({widths[res]} x {H.bottleneck_multiple}) = 0 "
                            f"channels; a bottleneck needs >= 1, so raise --bottleneck_multiple to at least "
                            f"{1 / widths[res]:g} (or the width)")


def _check_encoder(H, widths):
    """The encoder starts at the image resolution and moves only with RdK.  Returns the
    resolutions it provides, in order (the image resolution, from in_conv, first), and
    those of its blocks."""
    flag, s = '--enc_blocks', H.enc_blocks
    res, provided, blocks = H.image_size, [H.image_size], []
    for tok, r, kind, k in layer_tokens(s, flag):
        where = f"{flag} {s!r}: token {tok!r}"
        if kind == 'm':
            raise UserError(f"{where} is a decoder mixin (RmS); the encoder takes RxN, RdK and R")
        if r != res:
            raise UserError(f"{where} is at resolution {r}, but the encoder is at resolution {res} there: it starts "
                            f"at the image size {H.image_size} and only an RdK token changes the resolution")
        blocks.append(r)
        if kind == 'd':
            if r % k:
                raise UserError(f"{where} pools resolution {r} by {k}, which does not divide it: the down rate K of "
                                "RdK must divide R")
            res = r // k
            if widths[res] < widths[r]:
                raise UserError(f"{where} goes from width {widths[r]} at resolution {r} to {widths[res]} at {res} "
                                f"(--custom_width_str {H.custom_width_str!r}): the encoder zero-pads channels on the "
                                "way down and cannot drop any, so a lower resolution needs at least the width of a "
                                "higher one")
            if res not in provided:
                provided.append(res)
    return provided, blocks


def _check_decoder(H, enc_res):
    """Top-down: resolutions never decrease, every block is at a resolution the encoder
    provides, a mixin RmS brings in a lower resolution S that an earlier block produced,
    and the last block is at the image resolution.  Returns the decoder's resolutions, in
    order.  A mixin's upsampling factor R/S is then a whole number and S has at least
    width[R] channels: R and S are both encoder resolutions, and each of those divides the
    ones above it and is at least as wide (_check_encoder)."""
    flag, s = '--dec_blocks', H.dec_blocks
    produced = []
    for tok, r, kind, n in layer_tokens(s, flag):
        where = f"{flag} {s!r}: token {tok!r}"
        if kind == 'd':
            raise UserError(f"{where} is an encoder down-sampling (RdK); the decoder takes RxN, RmS and R")
        if r not in enc_res:
            raise UserError(f"{where} is a block at resolution {r}, but the encoder provides only {sorted(enc_res)} "
                            f"(--enc_blocks {H.enc_blocks!r})")
        if produced and r < produced[-1]:
            raise UserError(f"{where} goes back down from resolution {produced[-1]} to {r}: the decoder runs from "
                            "low resolution to high, so its resolutions must never decrease")
        if kind == 'm':
            if n >= r:
                raise UserError(f"{where} mixes resolution {n} into resolution {r}: a mixin upsamples a lower "
                                "resolution, so S must be below R")
            if n not in produced:
                raise UserError(f"{where} mixes in resolution {n}, which no earlier decoder block has produced "
                                f"(so far: {sorted(set(produced)) or 'none'}); put a block at {n} before it")
        produced.append(r)
    if produced[-1] != H.image_size:
        raise UserError(f"{flag} {s!r} ends at resolution {produced[-1]}; it must end at the image resolution "
                        f"{H.image_size}, which the output head reads")
    return produced
