"""Evaluation of a VDVAE: the ELBO of a split with its standard error (validation during
training, --test_eval), the sharded evaluation loader and the image positions that key
the posterior noise, and the analyses of evaluate.py: the importance-weighted bound, the
KL per decoder block and the streamed latent export.

Every image of a split is evaluated exactly once over the processes (each takes a
contiguous shard), and the posterior noise of sample k of image i (its position in the
split) is keyed by (--seed, i, k, layer, element) (vae_helpers.KeyedNormal), so every
figure is the same for any batch size, process count and device.

    stats = evaluate(H, dist_info, ema, splits.test)   # {'elbo', 'elbo_se', 'elbo_bpd', ...}
"""
import contextlib
import json
import math
import os
import shutil
import zipfile

import numpy as np
import torch

import data
from hps import UserError
from utils import allreduce, atomic_write, barrier, gather_objects, ieee_fp32, progress_bar, write_text
from vae import parse_layer_string
from vae_helpers import KeyedNormal, gaussian_log_density

LN2 = math.log(2)  # nats per bit: bits/dim = nats/dim / LN2


# ----------------------------------------------------------------------------- the ELBO of a split

@torch.no_grad()
def evaluate(H, dist_info, ema, source, desc='eval'):
    """Exact per-image averages over every image of ``source`` (each visited once across
    ranks), in IEEE fp32 (no TF32, see utils.ieee_fp32).  The posterior noise of image i
    is keyed by (--seed, i, layer, element) (vae_helpers.KeyedNormal), so a checkpoint gets
    the same number for any --n_batch_eval, process count and device, and the training
    RNG stream is not touched.  ``kl_per_block``: the mean KL of each decoder block (nats
    per image), summed in the same all-reduce: run_kl_stats's kl_nats for the same images."""
    ema.eval()
    # n, elbo, distortion, rate, n_finite, finite elbo, elbo^2 (for the standard error), then the KL per
    # decoder block (nats per image; the KL that --kl_stats reports, from this same pass)
    sums = torch.zeros(7 + len(ema.decoder.dec_blocks), dtype=torch.float64, device=dist_info.device)
    passes = keyed_passes(H, dist_info, ema, source)
    with ieee_fp32():
        for _, out in progress_bar(passes, is_main=dist_info.is_main, off=H.no_progress, desc=desc, leave=False):
            elbo = out['elbo'].double()
            finite = torch.isfinite(elbo)
            sums += torch.cat([torch.stack([torch.full_like(elbo[0], len(elbo)), elbo.sum(),
                                            out['distortion'].double().sum(), out['rate'].double().sum(),
                                            finite.double().sum(), torch.where(finite, elbo, 0.).sum(),
                                            elbo.square().sum()]),
                               out['kl_per_block'].double().sum(0)])
    n, elbo, distortion, rate, n_finite, finite_elbo, elbo_sq, *kl = allreduce(sums).tolist()
    if n == 0:
        raise UserError(f"the evaluation split ({getattr(source, 'path', source)}) is empty")
    se = standard_error(n, elbo, elbo_sq)
    return dict(n_images=int(n), elbo=elbo / n, elbo_se=se, distortion=distortion / n, rate=rate / n,
                elbo_bpd=elbo / n / LN2, elbo_bpd_se=se / LN2, filtered_elbo=finite_elbo / max(n_finite, 1),
                n_nonfinite=int(n - n_finite), kl_per_block=[v / n for v in kl])


def eval_batches(H, dist_info, source):
    """(positions in the split as an int64 tensor on dist_info.device, uint8 batch) over this rank's
    contiguous shard of ``source``, --n_batch_eval images at a time (default 4 x --n_batch),
    prefetched by one worker (spawned under mpiexec, see data.worker_start_method)."""
    b = H.n_batch_eval or 4 * H.n_batch
    shard = data.eval_shard(len(source), dist_info.rank, dist_info.world_size)
    loader = data.eval_loader(source, b, rank=dist_info.rank, world_size=dist_info.world_size,
                              num_workers=min(H.num_workers, 1), pin_memory=dist_info.device.type == 'cuda',
                              mp_context=data.worker_start_method(dist_info.launcher))
    for i, x in enumerate(loader):
        yield positions_on(shard[i * b:(i + 1) * b], dist_info.device), x


def keyed_passes(H, dist_info, model, source, forward='forward_per_image'):
    """(images in the batch, ``model.<forward>(x_in, x_target)``) for each batch of eval_batches,
    the posterior noise keyed by (--seed, the images' positions) (vae_helpers.KeyedNormal): the
    one pass of the ELBO, --kl_stats and --encode."""
    for positions, x in eval_batches(H, dist_info, source):
        x_in, x_target = data.preprocess(H, x.to(dist_info.device, non_blocking=True))
        with model.keyed_noise(KeyedNormal(H.seed, positions)):
            out = getattr(model, forward)(x_in, x_target)
        yield len(x), out


def positions_on(idx, device):
    """Positions in the split (a contiguous numpy block) as an int64 tensor made on ``device``
    (no copy from the host, which from pageable memory would wait for the device)."""
    first = int(idx[0]) if len(idx) else 0
    return first + torch.arange(len(idx), device=device)


def standard_error(n, total, total_sq):
    """Standard error of the mean of n values from their sum and sum of squares:
    sqrt(sample variance / n), with the unbiased (n - 1) variance; nan for n < 2."""
    if n < 2:
        return float('nan')
    var = max(total_sq - total * total / n, 0.0) / (n - 1)
    return math.sqrt(var / n)


# ----------------------------------------------------------------------------- importance-weighted bound

def _log_ratio_hook(module, inputs, output):
    """Forward hook on a DecBlock: replace the block's stats (z, q and p parameters, all
    (N, zdim, R, R)) by their per-sample log-densities, so K samples never hold every
    layer's parameters at once.  Densities in float64 (cheap next to the convolutions)."""
    xs, block_stats = output
    z = block_stats['z'].double()
    log_q = gaussian_log_density(z, block_stats['qm'].double(), block_stats['qv'].double()).sum(dim=(1, 2, 3))
    log_p = gaussian_log_density(z, block_stats['pm'].double(), block_stats['pv'].double()).sum(dim=(1, 2, 3))
    return xs, dict(log_q=log_q, log_p=log_p)


def _repeat(t, n):
    """t repeated n times along the batch, in t's memory layout (the encoder's activations
    are channels-last views; a layout change would change the convolutions' rounding)."""
    fmt = torch.channels_last if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    return t.repeat(n, 1, 1, 1).contiguous(memory_format=fmt)


@torch.no_grad()
def log_weights(model, activations, x_target, n_samples, noise=None):
    """log w = log p(x|z) + log p(z) - log q(z|x) in nats, float64 (n_samples, B).

    activations: the encoder's output for B images; z ~ q(z|x) is drawn top-down from the
    hierarchical posterior (one decoder pass with every image repeated n_samples times,
    row k*B + i = sample k of image i), p(z) = prod_i p(z_i | z_<i) and q(z|x) = prod_i
    q(z_i | z_<i, x) are the Gaussian densities of every element of every block, and
    log p(x|z) = -DMoL NLL.  With n_samples = 1 this is the single-sample ELBO of the
    same noise that ``model.forward_with_dists`` would draw.  ``noise``: a KeyedNormal with
    one row per image (rows sample-major, see KeyedNormal.repeat), else the RNG's noise.
    """
    b = x_target.shape[0]
    if n_samples > 1:
        activations = {res: _repeat(a, n_samples) for res, a in activations.items()}
        x_target = x_target.repeat(n_samples, 1, 1, 1)
    hooks = [blk.register_forward_hook(_log_ratio_hook) for blk in model.decoder.dec_blocks]
    try:
        with model.keyed_noise(noise) if noise is not None else contextlib.nullcontext():
            px_z, stats = model.decoder(activations, get_dists=True)
    finally:
        for h in hooks:
            h.remove()
    ndims = x_target[0].numel()
    lw = -model.decoder.out_net.nll(px_z, x_target).double() * ndims
    for s in stats:
        lw = lw + (s['log_p'] - s['log_q'])
    return lw.view(n_samples, b)


@torch.no_grad()
def importance_weighted_bound(model, x_in, x_target, K, chunk, noise=None):
    """Per image: the IWAE bound log (1/K) sum_k w_k in nats (float64, (B,)), the mean of
    log w_k (a K-sample estimate of the ELBO) and the effective sample size
    (sum w)^2 / sum w^2.  The K samples are drawn ``chunk`` at a time with a running
    logsumexp, so memory does not grow with K.  ``noise``: a KeyedNormal for the B images
    (sample k of every image keyed by k, whatever the chunking), else the RNG's noise."""
    acts = model.encoder(x_in)
    b = x_in.shape[0]
    lse = torch.full((b,), -math.inf, dtype=torch.float64, device=x_in.device)
    lse2, total = lse.clone(), torch.zeros_like(lse)
    for c0 in range(0, K, chunk):
        n = min(chunk, K - c0)
        lw = log_weights(model, acts, x_target, n, noise=None if noise is None else noise.repeat(c0, n))
        lse = torch.logaddexp(lse, torch.logsumexp(lw, 0))
        lse2 = torch.logaddexp(lse2, torch.logsumexp(2 * lw, 0))
        total += lw.sum(0)
    return lse - math.log(K), total / K, torch.exp(2 * lse - lse2)


def run_iwae(H, dist_info, model, source, bar):
    K = H.n_importance
    budget = H.iw_batch or H.n_batch_eval or 4 * H.n_batch
    chunk = min(K, budget)
    per_pass = max(1, budget // chunk)  # images sharing a pass when K is small
    ndims = H.image_size ** 2 * H.image_channels
    shard = data.eval_shard(len(source), dist_info.rank, dist_info.world_size)
    rows = []  # (B, 3) per pass on the device: bound, elbo, ess fraction; copied to the host once
    for s in range(0, len(shard), per_pass):
        idx = shard[s:s + per_pass]
        x_in, x_target = data.preprocess(H, torch.from_numpy(source[idx]).to(dist_info.device))
        bound, elbo, ess = importance_weighted_bound(model, x_in, x_target, K, chunk,
                                                     noise=KeyedNormal(H.seed, positions_on(idx, dist_info.device)))
        rows.append(torch.stack([-bound / ndims, -elbo / ndims, ess / K], 1))
        bar.update(len(idx))
    values = torch.cat(rows).cpu().numpy() if rows else np.zeros((0, 3))
    mine = np.concatenate([shard[:, None].astype(np.float64), values], 1)
    every = np.concatenate(gather_objects(mine))  # contiguous shards: rank order = split order
    if not dist_info.is_main:
        return None
    index, nll, elbo, ess = every.T
    ok = np.isfinite(nll) & np.isfinite(elbo)
    n = int(ok.sum())
    if n == 0:
        raise UserError('every image gave a non-finite bound; is the checkpoint broken?')

    def mean_se(v):
        v = v[ok]
        return float(v.mean()), float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else float('nan')

    (m, se), (me, see), (mg, seg) = mean_se(nll), mean_se(elbo), mean_se(elbo - nll)
    summary = dict(mode='iwae', split=H.split, dataset=H.dataset, n_images=n, n_nonfinite=int(len(nll) - n),
                   n_importance=K, ndims=ndims, seed=H.seed,
                   iw_nll_nats_per_dim=m, iw_nll_nats_per_dim_stderr=se,
                   iw_nll_bits_per_dim=m / LN2, iw_nll_bits_per_dim_stderr=se / LN2,
                   elbo_nats_per_dim=me, elbo_nats_per_dim_stderr=see,
                   elbo_bits_per_dim=me / LN2, elbo_bits_per_dim_stderr=see / LN2,
                   iw_gain_nats_per_dim=mg, iw_gain_nats_per_dim_stderr=seg,
                   mean_ess_fraction=float(ess[ok].mean()))
    per_image = dict(image_index=index.astype(np.int64), iw_nll_nats_per_dim=nll, elbo_nats_per_dim=elbo,
                     ess_fraction=ess)
    return summary, per_image


# ----------------------------------------------------------------------------- KL per decoder block

def block_resolutions(H):
    return [res for res, _ in parse_layer_string(H.dec_blocks)]


@torch.no_grad()
def run_kl_stats(H, dist_info, model, source, bar):
    res = block_resolutions(H)
    nb = len(res)
    ndims = H.image_size ** 2 * H.image_channels
    # n, distortion, rate, elbo, elbo^2, then kl and kl^2 per block: per-image sums
    sums = torch.zeros(5 + 2 * nb, dtype=torch.float64, device=dist_info.device)
    for n_images, out in keyed_passes(H, dist_info, model, source):
        kl = out['kl_per_block'].double()
        elbo = out['elbo'].double()
        sums += torch.cat([torch.stack([torch.full_like(elbo[0], n_images), out['distortion'].double().sum(),
                                        out['rate'].double().sum(), elbo.sum(), elbo.square().sum()]),
                           kl.sum(0), (kl ** 2).sum(0)])
        bar.update(n_images)
    sums = allreduce(sums).cpu().numpy()
    if not dist_info.is_main:
        return None
    n = sums[0]
    kl_mean = sums[5:5 + nb] / n
    kl_std = np.sqrt(np.maximum(sums[5 + nb:] / n - kl_mean ** 2, 0))
    elbo_se = standard_error(n, sums[3], sums[4])
    rate = sums[2] / n
    blocks = []
    for i, r in enumerate(res):
        latent_dims = H.zdim * r * r
        blocks.append(dict(index=i, resolution=r, latent_dims=latent_dims, kl_nats=float(kl_mean[i]),
                           kl_nats_std=float(kl_std[i]), kl_nats_per_dim=float(kl_mean[i] / ndims),
                           kl_nats_per_latent_dim=float(kl_mean[i] / latent_dims),
                           share_of_rate=float(kl_mean[i] / ndims / rate) if rate > 0 else float('nan'),
                           inactive=bool(kl_mean[i] < H.inactive_threshold)))
    resolutions = []
    for r in sorted(set(res)):
        sel = [b for b in blocks if b['resolution'] == r]
        kl_r = sum(b['kl_nats'] for b in sel)
        resolutions.append(dict(resolution=r, n_blocks=len(sel), kl_nats=kl_r, kl_nats_per_dim=kl_r / ndims,
                                share_of_rate=kl_r / ndims / rate if rate > 0 else float('nan'),
                                inactive_blocks=sum(b['inactive'] for b in sel)))
    return dict(mode='kl_stats', split=H.split, dataset=H.dataset, n_images=int(n), ndims=ndims, seed=H.seed,
                elbo_nats_per_dim=sums[3] / n, elbo_nats_per_dim_stderr=elbo_se,
                distortion_nats_per_dim=sums[1] / n, rate_nats_per_dim=rate, elbo_bits_per_dim=sums[3] / n / LN2,
                elbo_bits_per_dim_stderr=elbo_se / LN2, inactive_threshold_nats=H.inactive_threshold,
                inactive_blocks=[b['index'] for b in blocks if b['inactive']], blocks=blocks,
                resolutions=resolutions)


# ----------------------------------------------------------------------------- latent export

NPZ_NAMES = {'dist': ('qm', 'qlogstd'), 'sample': ('z',), 'both': ('z', 'qm', 'qlogstd')}
_STAT_KEY = {'z': 'z', 'qm': 'qm', 'qlogstd': 'qv'}


@torch.no_grad()
def run_encode(H, dist_info, model, source, path, bar):
    """Stream per-block latents of ``source`` into ``path`` (.npz).

    Each rank appends its rows, batch by batch, to one raw float32 file per exported array
    in a temporary folder next to ``path`` (which must be on a filesystem all ranks share);
    rank 0 then copies them, 16 MiB at a time, into the entries of one ZIP_DEFLATED .npz
    (npz entries cannot be appended to, hence the two steps).  Memory holds one batch and
    one copy buffer, never the split."""
    res = block_resolutions(H)
    kinds = NPZ_NAMES[H.encode_what]
    shard = data.eval_shard(len(source), dist_info.rank, dist_info.world_size)
    tmp = f'{path}.parts'
    rank_dir = os.path.join(tmp, f'rank{dist_info.rank}')
    if dist_info.is_main and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    barrier()
    os.makedirs(rank_dir, exist_ok=True)
    files = {(kind, i): open(os.path.join(rank_dir, f'{kind}_{i}.f32'), 'wb') for i in H.encode_list for kind in kinds}
    per_image = []  # (B, 2 + blocks) on the device per batch: distortion, rate, kl per block
    ndims = H.image_size ** 2 * H.image_channels
    try:
        for n_images, (distortion, stats) in keyed_passes(H, dist_info, model, source, 'forward_with_dists'):
            for (kind, i), f in files.items():  # rows of (zdim, R, R), C order; streamed to disk
                f.write(stats[i][_STAT_KEY[kind]].float().contiguous().cpu().numpy().tobytes())
            kl = torch.stack([s['kl'].float().sum(dim=(1, 2, 3)) for s in stats], 1)
            per_image.append(torch.cat([distortion.float()[:, None], (kl.sum(1) / ndims)[:, None], kl], 1))
            bar.update(n_images)
    finally:
        for f in files.values():
            f.close()
    write_text(os.path.join(rank_dir, 'done.json'), json.dumps(dict(rows=len(shard))))
    per_image = torch.cat(per_image).cpu().numpy() if per_image else np.zeros((0, 2 + len(res)), np.float32)
    small = dict(image_index=shard, distortion=per_image[:, 0], rate=per_image[:, 1], kl_per_block=per_image[:, 2:])
    everything = gather_objects(small)  # small per-image arrays only; also a barrier
    if dist_info.is_main:
        try:
            _pack_npz(H, path, tmp, dist_info.world_size, kinds, res, everything)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    return dict(mode='encode', split=H.split, dataset=H.dataset, n_images=len(source), path=path,
                encode_what=H.encode_what, blocks=H.encode_list, seed=H.seed) if dist_info.is_main else None


def _pack_npz(H, path, tmp, world, kinds, res, everything):
    """The ranks' raw parts -> one .npz (utils.atomic_write)."""
    rank_dirs = [os.path.join(tmp, f'rank{r}') for r in range(world)]
    for r, rd in enumerate(rank_dirs):
        if not os.path.exists(os.path.join(rd, 'done.json')):
            raise UserError(f"--encode: rank {r}'s part ({rd}) is not visible on rank 0; --out_dir must be on a "
                            "filesystem that every process shares")
    n = sum(json.load(open(os.path.join(rd, 'done.json')))['rows'] for rd in rank_dirs)
    descr = np.lib.format.dtype_to_descr(np.dtype(np.float32))
    with atomic_write(path) as part:
        with zipfile.ZipFile(part, 'w', compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
            for i in H.encode_list:
                for kind in kinds:
                    with zf.open(f'{kind}_{i}.npy', 'w', force_zip64=True) as f:
                        np.lib.format.write_array_header_1_0(
                            f, dict(descr=descr, fortran_order=False, shape=(n, H.zdim, res[i], res[i])))
                        for rd in rank_dirs:
                            with open(os.path.join(rd, f'{kind}_{i}.f32'), 'rb') as src:
                                shutil.copyfileobj(src, f, 16 << 20)
            meta = {k: np.concatenate([e[k] for e in everything]) for k in everything[0]}
            meta['image_index'] = meta['image_index'].astype(np.int64)
            meta.update(block_index=np.array(H.encode_list, dtype=np.int64),
                        block_resolution=np.array([res[i] for i in H.encode_list], dtype=np.int64),
                        split=np.array(H.split), dataset=np.array(H.dataset), encode_what=np.array(H.encode_what))
            for k, v in meta.items():
                with zf.open(f'{k}.npy', 'w', force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(v), allow_pickle=False)
