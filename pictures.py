"""Pictures and plots of a VDVAE: the release's sample grid, the one reconstruction path
that train.py's grid, sample.py and evaluate.py share, interpolations, tiling, the loss
and KL plots, and the one image writer.

The reconstruction rule (docs/evaluation.md, "Reconstructions: one rule"): the image at
position j of the input images is encoded with posterior noise keyed by (--seed, j, layer,
element) (vae_helpers.KeyedNormal); the first k posterior latents are kept and the rest
drawn from the prior at the rest temperature (0.1, as the release's grid), from the RNG
seeded per picture by (--seed, j, k).  A reconstruction so depends on the weights, the
seed, the image, its position and k only: not on the batch, the other images, the process
count or the RNG state of the caller, which is left as it was.

    im = sample_grid(H, ema, valid_images, device)   # uint8 (rows*H, cols*W, C)
    write_image(im, 'samples-100.png')
"""
import numpy as np
import torch
from PIL import Image

import data
from evaluation import LN2
from utils import atomic_write, gather_objects, read_log
from vae_helpers import KeyedNormal

REST_TEMPERATURE = 0.1  # prior temperature of the latents a reconstruction does not keep (the release's grid)
# The prior draws of one picture come from a torch seed that numpy's SeedSequence makes of
# (--seed, stream, key...) (picture_seed).  The stream word keeps reconstructions (key: image
# position, k) and interpolations (key: L) from ever sharing a seed; the values are arbitrary
# but fixed, since they decide which pictures a seed draws.
RECONSTRUCTION_STREAM, INTERPOLATION_STREAM = 4, 5


# ----------------------------------------------------------------------------- writing

def tile(batches):
    """(rows, cols, H, W, C) uint8 -> one (rows*H, cols*W, C) image."""
    r, c, h, w, ch = batches.shape
    return batches.transpose(0, 2, 1, 3, 4).reshape(r * h, c * w, ch)


def write_image(im, path, format='PNG'):
    """Write a uint8 (H, W, C) array (C = 1: grayscale) in Pillow's ``format``, atomically."""
    im = im[..., 0] if im.shape[-1] == 1 else im
    with atomic_write(path) as f:
        Image.fromarray(im).save(f, format=format)


def save_figure(fig, path):
    """A matplotlib figure as PNG at ``path``, atomically; the figure is closed."""
    import matplotlib.pyplot as plt
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format='png')
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- reconstructions

def picture_seed(seed, stream, *key):
    """A torch seed for the prior draws of one picture (see RECONSTRUCTION_STREAM)."""
    return int(np.random.SeedSequence([seed % 2 ** 32, stream, *map(int, key)]).generate_state(1, np.uint64)[0])


@torch.no_grad()
def posterior_latents(H, model, image, position, device):
    """z of every decoder block for one uint8 (H, W, C) image, its posterior noise keyed by
    ``position`` (its place among the input images)."""
    x_in, _ = data.preprocess(H, torch.from_numpy(image[None]).to(device))
    with model.keyed_noise(KeyedNormal(H.seed, torch.full((1,), int(position), device=device))):
        return [s['z'] for s in model.forward_get_latents(x_in)]


@torch.no_grad()
def reconstruct(H, model, image, position, ks, device, t=REST_TEMPERATURE):
    """uint8 (len(ks), H, W, C): ``image`` (at ``position`` among the input images)
    reconstructed keeping its first k posterior latents, for each k, the rest from the prior
    at temperature ``t`` (the module's rule).  Changes the RNG state (see reconstructions)."""
    zs = posterior_latents(H, model, image, position, device)
    cells = []
    for k in ks:
        torch.manual_seed(picture_seed(H.seed, RECONSTRUCTION_STREAM, position, k))
        cells.append(model.forward_samples_set_latents(1, zs[:k], t=t)[0])
    return np.stack(cells)


def rng_kept(device):
    """A context that restores the RNG of the CPU (and of ``device``, a GPU) on leaving."""
    return torch.random.fork_rng(devices=[device] if torch.device(device).type == 'cuda' else [])


@torch.no_grad()
def reconstructions(H, model, images, ks, device, t=REST_TEMPERATURE):
    """uint8 (1 + len(ks), n, H, W, C): the n ``images`` (uint8 (n, H, W, C)), then one row
    per k of their reconstructions (``reconstruct``; image j at position j).  The caller's
    RNG state is kept."""
    with rng_kept(device):
        rows = np.stack([reconstruct(H, model, im, j, ks, device, t) for j, im in enumerate(images)], 1)
    return np.concatenate([images[None], rows])


def grid_keeps(n_blocks, n_rows):
    """The release's k values of the sample grid: n_rows values spread evenly over the blocks."""
    return np.floor(np.linspace(0, 1, n_rows + 2) * n_blocks).astype(int)[1:-1].tolist()


@torch.no_grad()
def sample_grid(H, ema, x_uint8, device):
    """The release's sample grid as a uint8 array (rows*H, cols*W, C): originals;
    reconstructions keeping the first k posterior latents (rest from the prior at t=0.1)
    for num_variables_visualize values of k; unconditional samples at t = 1.0, 0.9, ...
    The unconditional rows come from the caller's RNG."""
    ema.eval()
    ks = grid_keeps(len(ema.decoder.dec_blocks), H.num_variables_visualize)
    rows = list(reconstructions(H, ema, x_uint8.numpy(), ks, device))
    for t in [1.0, 0.9, 0.8, 0.7][:H.num_temperatures_visualize]:
        rows.append(ema.forward_uncond_samples(x_uint8.shape[0], t=t))
    return tile(np.stack(rows))


def visualization_batch(H, source):
    """The first --num_images_visualize images of ``source``: the originals of the grid."""
    n = min(H.num_images_visualize, len(source))
    return torch.from_numpy(source[np.arange(n)])


def write_sample_grid(H, ema, images, device, path):
    """samples-N.png: the grid of ``images``, drawn from its own RNG stream seeded by --seed
    (the caller's, training's, is untouched).  Returns the grid (uint8 (rows*H, cols*W, C))."""
    with rng_kept(device):
        torch.manual_seed(H.seed)
        im = sample_grid(H, ema, images, device)
    write_image(im, path)
    return im


# ----------------------------------------------------------------------------- evaluate.py's picture modes

@torch.no_grad()
def run_reconstruct(H, dist_info, model, images, bar):
    """Rows: originals, then per k in H.keep_list the reconstructions (``reconstruct``, at
    --rest_temperature), each process a shard of the images; the grid on rank 0, else None."""
    cells = {}
    for j in data.eval_shard(len(images), dist_info.rank, dist_info.world_size):
        cells[int(j)] = reconstruct(H, model, images[j], j, H.keep_list, dist_info.device, H.rest_temperature)
        bar.update(1)
    gathered = {k: v for part in gather_objects(cells) for k, v in part.items()}
    if not dist_info.is_main:
        return None
    recon = np.stack([gathered[j] for j in range(len(images))], 1)  # (n_k, n_images, H, W, C)
    return np.concatenate([images[None], recon])


@torch.no_grad()
def run_interpolate(H, dist_info, model, images, bar):
    """Rows: one per L; columns: image a, --interp_steps points z = (1-a) z_a + a z_b on the
    top L blocks' posterior latents (the rest from the prior at --rest_temperature, with
    the same noise along a row), image b."""
    za, zb = (posterior_latents(H, model, images[j], j, dist_info.device) for j in (0, 1))
    alphas = np.linspace(0, 1, H.interp_steps)
    jobs = [(r, c) for r in range(len(H.interp_list)) for c in range(len(alphas))]
    cells = {}
    for j in data.eval_shard(len(jobs), dist_info.rank, dist_info.world_size):
        r, c = jobs[j]
        n_top, a = H.interp_list[r], float(alphas[c])
        zs = [(1 - a) * za[i] + a * zb[i] for i in range(n_top)]
        torch.manual_seed(picture_seed(H.seed, INTERPOLATION_STREAM, n_top))
        cells[r, c] = model.forward_samples_set_latents(1, zs, t=H.rest_temperature)[0]
        bar.update(1)
    gathered = {k: v for part in gather_objects(cells) for k, v in part.items()}
    if not dist_info.is_main:
        return None, alphas
    rows = [np.stack([images[0]] + [gathered[r, c] for c in range(len(alphas))] + [images[1]])
            for r in range(len(H.interp_list))]
    return np.stack(rows), alphas


# ----------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def log_series(records, kind, field, unit=1.0):
    """[(step, value / unit)] of ``field`` in the run-log records of type ``kind``, sorted
    by step.  A step logged more than once (a print and a save at the same step, or steps
    trained again after a resume) keeps its last record."""
    points = {}
    for z in records:
        if z.get('type') == kind and 'step' in z and field in z:
            points[z['step']] = z[field] / unit
    return sorted(points.items())


def loss_curves(records):
    """(train, valid) lists of (step, bits/dim) from run-log records, sorted by step.
    train: every train_loss record, the per-print ones and those written with each
    checkpoint (the run's last point); valid: eval_loss records (see log_series)."""
    return [log_series(records, kind, 'elbo', LN2) for kind in ('train_loss', 'eval_loss')]


def write_loss_plot(log_path, png_path):
    """Four panels against step, from the run log: train and valid bits/dim; the train
    distortion and rate (bits/dim); the largest pre-clip gradient norm of each print window,
    with --skip_threshold; the skipped updates since the start."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    records = read_log(log_path)
    tr, va = loss_curves(records)
    grad_norms = log_series(records, 'train_loss', 'grad_norm')
    skipped = log_series(records, 'train_loss', 'total_skipped')
    fig, ((loss, parts), (grad, skips)) = plt.subplots(2, 2, figsize=(9, 6), dpi=100, sharex=True)
    for ax, points, style, label in [
            (loss, tr, '-', 'train (batch average)'), (loss, va, 'o-', 'valid (EMA model)'),
            (parts, log_series(records, 'train_loss', 'distortion', LN2), '-', 'distortion'),
            (parts, log_series(records, 'train_loss', 'rate', LN2), '-', 'rate (KL)'),
            (grad, grad_norms, '-', 'largest of the print window'),
            (skips, skipped, '-', 'since the start')]:
        if points:
            ax.plot(*zip(*points), style, label=label, lw=1)
    threshold = [z['value'] for z in records if z.get('type') == 'hparam' and z.get('key') == 'skip_threshold']
    if threshold and threshold[-1] != -1:
        grad.axhline(threshold[-1], color='gray', ls='--', lw=1, label='--skip_threshold')
    if grad_norms and min(v for _, v in grad_norms) > 0:
        grad.set_yscale('log')  # norms span orders of magnitude early in training
    for ax, ylabel in [(loss, 'negative ELBO (bits/dim)'), (parts, 'bits/dim'), (grad, 'gradient norm (pre-clip)'),
                       (skips, 'skipped updates')]:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    top = max([1] + [1.1 * v for _, v in skipped])
    skips.set_ylim(-0.03 * top, top)  # a count: from 0 (the line at 0 visible), whole numbers
    skips.yaxis.set_major_locator(MaxNLocator(integer=True))
    grad.set_xlabel('step')
    skips.set_xlabel('step')
    fig.tight_layout()
    save_figure(fig, png_path)


def write_kl_plot(stats, path):
    """evaluate.py --kl_stats' bar charts: KL per block (log scale, coloured by resolution,
    inactive ones hatched) and the share of the rate per resolution."""
    plt = _pyplot()
    blocks, resolutions = stats['blocks'], stats['resolutions']
    colours = {r['resolution']: plt.cm.viridis(i / max(1, len(resolutions) - 1)) for i, r in enumerate(resolutions)}
    floor = max(min([b['kl_nats'] for b in blocks if b['kl_nats'] > 0] + [stats['inactive_threshold_nats']]) / 10,
                1e-6)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(6.0, 0.14 * len(blocks)) + 3.5, 3.6), dpi=100,
                                  gridspec_kw=dict(width_ratios=[max(6.0, 0.14 * len(blocks)), 3.5]))
    for b in blocks:
        ax.bar(b['index'], max(b['kl_nats'], floor), color=colours[b['resolution']], edgecolor='k',
               linewidth=0.3, hatch='///' if b['inactive'] else None, alpha=0.45 if b['inactive'] else 1.0)
    if stats['inactive_threshold_nats'] > 0:
        ax.axhline(stats['inactive_threshold_nats'], ls='--', color='r', lw=1,
                   label=f'inactive below {stats["inactive_threshold_nats"]:g} nats')
        ax.legend(fontsize=8, loc='upper left')
    ax.set_yscale('log')
    ax.set_xticks([b['index'] for b in blocks][::max(1, len(blocks) // 20)])
    ax.set_xlabel('decoder block (top-down)')
    ax.set_ylabel('KL (nats per image)')
    ax.set_title(f'{stats["dataset"]} {stats["split"]}, {stats["n_images"]} images: rate '
                 f'{stats["rate_nats_per_dim"]:.4g} nats/dim, {len(stats["inactive_blocks"])} inactive blocks',
                 fontsize=9)
    ax.grid(alpha=0.3, axis='y')
    xs = np.arange(len(resolutions))
    ax2.bar(xs, [100 * r['share_of_rate'] for r in resolutions], color=[colours[r['resolution']] for r in resolutions],
            edgecolor='k', linewidth=0.3)
    ax2.set_xticks(xs, [f'{r["resolution"]}\n({r["n_blocks"]})' for r in resolutions], fontsize=8)
    ax2.set_xlabel('resolution (blocks)')
    ax2.set_ylabel('share of the rate (%)')
    ax2.grid(alpha=0.3, axis='y')
    fig.tight_layout()
    save_figure(fig, path)
