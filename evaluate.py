"""Evaluate a trained VDVAE beyond the ELBO: importance-weighted NLL, per-layer KL,
latent export, reconstructions and interpolations.  One mode per run:

    python evaluate.py --hps cifar10 --restore_ema_path cifar10-seed1-iter-1050000-model-ema.th --n_importance 1000
    python evaluate.py --hps cifar10 --restore_ema_path FILE --kl_stats [--inactive_threshold 0.01]
    python evaluate.py --hps cifar10 --restore_ema_path FILE --encode [--encode_what both] [--encode_blocks 0-9]
    python evaluate.py --hps cifar10 --restore_ema_path FILE --reconstruct --indices 0 1 2 3 [--keep 0 4 10 43]
    python evaluate.py --hps cifar10 --restore_ema_path FILE --interpolate --images a.png b.png [--interp_layers 4 10]
    torchrun --nproc_per_node 8 evaluate.py ...      # or mpiexec: each rank a shard, rank 0 writes

Dataset modes read --split (test|valid|train) of the preset's data under --data_root,
optionally only its first --n_images images.  Weights: --restore_ema_path (a released or
our -model-ema.th), --restore_path, or else the newest checkpoint of {save_dir}/{desc}.  A
run's saved configuration (the 'H' of its -state.th, also beside an explicit weights file) is
the default for every setting: flags given on the command line win, everything else
(architecture, data_root, ...) comes from the run.  List flags take values separated by
spaces or commas.  Outputs go to --out_dir (default {save_dir}/{desc}), next to a log
evaluate.jsonl/.txt; nothing else is written, except that --n_importance and --kl_stats of a
checkpoint of the run folder also add their summary figures to the run's TensorBoard events
(tensorboard_log.py), at the checkpoint's step (not with --no_tensorboard).  Evaluation runs in IEEE float32.
Posterior sample k of image i (its position in the split) uses noise keyed by (--seed, i, k,
layer, element) (vae_helpers.KeyedNormal), the same as train.py's --test_eval: every
figure is the same for any --n_batch_eval, --iw_batch, process count and device.  The
prior draws of the picture modes come from the RNG, seeded per picture from --seed.
"""
import argparse
import json
import os

import numpy as np

import data
from checkpoints import resolve_weights, restore_params, saved_state
from hps import (UserError, add_vae_arguments, at_least, check_in_range, check_ranges, explicit_flags,
                 Hyperparams, int_list, parse_args_and_update_hparams)
from evaluation import block_resolutions, run_encode, run_iwae, run_kl_stats
from pictures import REST_TEMPERATURE, run_interpolate, run_reconstruct, tile, write_image, write_kl_plot
from tensorboard_log import event_folder, open_board
from utils import (atomic_write, barrier, check_writable, cleanup_distributed, configure_device, ieee_fp32, is_writable,
                   logger, progress_bar, run_main, setup_distributed, write_text)
from vae import VAE, check_hparams, parse_layer_string

MODES = ('n_importance', 'kl_stats', 'encode', 'reconstruct', 'interpolate')
RANGES = {'n_importance': (at_least(1), '>= 1'), 'n_images': (at_least(0), '>= 0 (0: all)'),
          'iw_batch': (at_least(0), '>= 0'), 'inactive_threshold': (at_least(0), '>= 0'),
          'rest_temperature': (at_least(0), '>= 0'), 'interp_steps': (at_least(2), '>= 2 (end points included)')}


# ----------------------------------------------------------------------------- flags

def add_eval_arguments(parser):
    g = parser.add_argument_group('evaluation modes (exactly one)')
    a = g.add_argument
    a('--n_importance', type=int, default=None, metavar='K',
      help='importance-weighted NLL bound with K posterior samples per image (K=1: the ELBO)')
    a('--kl_stats', action='store_true', help='average KL per decoder block and per resolution (JSON + PNG)')
    a('--encode', action='store_true', help='export per-block latents of a split to a compressed .npz')
    a('--reconstruct', action='store_true', help='reconstructions keeping the first k latent layers (PNG grid)')
    a('--interpolate', action='store_true', help='interpolate two images in the latents of the top layers')
    g = parser.add_argument_group('evaluation options')
    a = g.add_argument
    a('--split', choices=['test', 'valid', 'train'], default='test', help='dataset split to read')
    a('--n_images', type=int, default=0,
      help='use only the first N images of the split (0: all; more than the split holds is refused)')
    a('--out_dir', type=str, default=None, help='output folder (default {save_dir}/{desc})')
    a('--iw_batch', type=int, default=0,
      help='posterior samples per decoder pass for --n_importance (0: --n_batch_eval, else 4 x n_batch); '
           'K is streamed in chunks of this size, several images share a pass when K is smaller')
    a('--inactive_threshold', type=float, default=0.01,
      help='--kl_stats: a block whose average KL is below this many nats per image is flagged inactive')
    a('--encode_what', choices=['dist', 'sample', 'both'], default='dist',
      help='--encode: posterior means and log-stds (dist), posterior samples z (sample), or all three')
    a('--encode_blocks', nargs='+', default=None, help='--encode: decoder blocks to export, e.g. 0-9 12 (default: all)')
    a('--images', type=str, nargs='+', default=None, help='image files for --reconstruct/--interpolate')
    a('--indices', nargs='+', default=None,
      help='positions in --split for --reconstruct/--interpolate (instead of --images), e.g. 0 1 2 3')
    a('--keep', '--k', nargs='+', default=None, dest='keep',
      help='--reconstruct: k values, each a row keeping the first k posterior latents, e.g. 0 4 10 '
           '(default: num_variables_visualize values spread over the blocks, then all of them)')
    a('--rest_temperature', type=float, default=REST_TEMPERATURE,
      help='prior temperature of the latents not kept (--reconstruct) or not interpolated (--interpolate)')
    a('--interp_layers', nargs='+', default=None,
      help='--interpolate: L values, each a row interpolating the top L blocks '
           '(default: a quarter, half and all of the blocks)')
    a('--interp_steps', type=int, default=8, help='--interpolate: interpolation points, end points included')
    return parser


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Evaluate a VDVAE: IW bound, KL per layer, latents, pictures')
    add_eval_arguments(parser)
    add_vae_arguments(parser)
    H = parse_args_and_update_hparams(Hyperparams(), parser, argv)
    check_ranges(H, RANGES)
    H.explicit = sorted(explicit_flags(parser, argv))
    for name in ('indices', 'keep', 'interp_layers'):
        H[name] = int_list(H[name], f'--{name}')
    H.encode_blocks = None if H.encode_blocks in (None, ['all']) else int_list(H.encode_blocks, '--encode_blocks')
    return H


def _flag(name):
    return f'--{name}' if name != 'n_importance' else '--n_importance K'


def check_args(H):
    """Errors that need neither the model nor the data, as one-line UserErrors."""
    modes = [m for m in MODES if (H[m] is not None if m == 'n_importance' else H[m])]
    if len(modes) != 1:
        got = f"got {' and '.join('--' + m for m in modes)}" if modes else 'got none'
        raise UserError(f"choose exactly one mode: --n_importance K, --kl_stats, --encode, --reconstruct or "
                        f"--interpolate ({got}); run them one after the other")
    H.mode = modes[0]  # numbers were range-checked by parse_args (RANGES)
    pictures = H.mode in ('reconstruct', 'interpolate')
    if H.images is not None and H.indices is not None:
        raise UserError("pass either --images or --indices, not both")
    if not pictures:
        for name in ('images', 'indices', 'keep', 'interp_layers'):
            if H[name] is not None:
                raise UserError(f"--{name} applies to --reconstruct/--interpolate, not to {_flag(H.mode)}")
    else:
        if H.images is None and H.indices is None:
            raise UserError(f"--{H.mode} needs input images: --images FILE ... or --indices I ... (positions in "
                            f"--split {H.split})")
        n = len(H.images if H.images is not None else H.indices)
        other = {'reconstruct': 'interp_layers', 'interpolate': 'keep'}[H.mode]
        if H[other] is not None:
            raise UserError(f"--{other} applies to --{'reconstruct' if other == 'keep' else 'interpolate'}, "
                            f"not to --{H.mode}")
        if H.mode == 'interpolate' and n != 2:
            raise UserError(f"--interpolate needs exactly two images, got {n}")
        for i in H.indices or []:
            if i < 0:
                raise UserError(f"--indices must be >= 0 (got {i})")
    for flag in ('restore_ema_path', 'restore_path'):
        if H[flag] and not os.path.isfile(H[flag]):
            raise UserError(f"--{flag} {H[flag]}: no such file")


def check_model_args(H, n_blocks):
    """Checks that need the number of decoder blocks; fills H.keep_list, H.interp_list and
    H.encode_list (each value once, in the order given)."""
    blocks = f'the model has {n_blocks} decoder blocks'
    if H.mode == 'reconstruct':
        if H.keep is None:
            spread = np.floor(np.linspace(0, 1, H.num_variables_visualize + 2) * n_blocks).astype(int)[1:-1]
            H.keep_list = sorted(set(spread.tolist()) | {n_blocks})
        else:
            check_in_range(H.keep, '--keep', 0, n_blocks,
                           f'the decoder has {n_blocks} latent layers, so k must be in 0..{n_blocks}')
            H.keep_list = list(dict.fromkeys(H.keep))
    if H.mode == 'interpolate':
        if H.interp_layers is None:
            H.interp_list = sorted({max(1, n_blocks // 4), max(1, n_blocks // 2), n_blocks})
        else:
            check_in_range(H.interp_layers, '--interp_layers', 1, n_blocks, blocks)
            H.interp_list = list(dict.fromkeys(H.interp_layers))
    if H.mode == 'encode':
        if H.encode_blocks is not None:
            check_in_range(H.encode_blocks, '--encode_blocks', 0, n_blocks - 1, blocks)
        H.encode_list = list(range(n_blocks)) if H.encode_blocks is None else sorted(set(H.encode_blocks))


# ----------------------------------------------------------------------------- model

def build_model(H, dist_info, path):
    model = VAE(H)
    restore_params(model, path, H)
    model.requires_grad_(False)
    model.eval()
    model.to(dist_info.device)
    if H.channels_last:
        model.set_channels_last(True)
    return model


# ----------------------------------------------------------------------------- pictures

def input_images(H):
    """uint8 (n, H, W, C) and a name per image, from --images or --indices."""
    if H.images is not None:
        shape, wants = (H.image_size, H.image_size, H.image_channels), f'the model ({H.dataset})'
        return np.stack([data.read_image(p, shape, wants=wants) for p in H.images]), list(H.images)
    source = getattr(data.load_data(H), H.split)
    bad = [i for i in H.indices if i >= len(source)]
    if bad:
        raise UserError(f"--indices {bad[0]} is out of range: --split {H.split} has {len(source)} images")
    return source[np.array(H.indices)], [f'{H.split}[{i}]' for i in H.indices]


# ----------------------------------------------------------------------------- driver

def add_to_run_events(H, dist_info, weights, values):
    """{tag: number} into the run's TensorBoard events at the step of ``weights``, when they
    are a checkpoint of the run folder (not weights from elsewhere) and the event folder can
    be written (evaluation only reads the run: a read-only one gets nothing).  Rank 0."""
    state = saved_state(weights) if os.path.abspath(os.path.dirname(weights)) == os.path.abspath(H.run_dir) else None
    if state is None or 'step' not in state or not is_writable(event_folder(H)):
        return
    board = open_board(H, dist_info, state['step'], training=False)
    board.scalars(values, state['step'])
    board.close()


def _write_json(obj, path):
    write_text(path, json.dumps(obj, indent=1))


def main(argv=None):
    """Run one evaluation mode; returns its summary (a dict) on rank 0, None elsewhere."""
    H = parse_args(argv)
    check_args(H)
    H.run_dir = os.path.join(H.save_dir, H.desc)
    weights, notes = resolve_weights(H)
    check_hparams(H)  # the architecture (perhaps the run's), before any data is read
    check_model_args(H, len(parse_layer_string(H.dec_blocks)))
    H.out_dir = H.out_dir or H.run_dir
    check_writable(H.out_dir, 'pass --out_dir DIR somewhere writable (evaluation only reads the run)')
    dist_info = setup_distributed(H.port, device=None if H.device == 'auto' else H.device, timeout=H.dist_timeout)
    configure_device(dist_info.device, H.threads, is_main=dist_info.is_main)  # as train.py: CPU threads, cuDNN autotuner
    try:
        with ieee_fp32():
            return _run(H, dist_info, weights, notes)
    finally:
        cleanup_distributed()


def _run(H, dist_info, weights, notes):
    source = images = names = None
    if H.mode in ('n_importance', 'kl_stats', 'encode'):
        source = getattr(data.load_data(H), H.split)
        if H.n_images > len(source):  # every rank alike, before any collective
            raise UserError(f"--n_images {H.n_images}: the {H.split} split of {H.dataset} has {len(source)} images; "
                            f"pass at most {len(source)}, or 0 for all of them")
        if H.n_images and H.n_images < len(source):
            source = source.view(np.arange(H.n_images))
        if len(source) == 0:
            raise UserError(f"--split {H.split} of {H.dataset} holds no images")
        todo = len(data.eval_shard(len(source), dist_info.rank, dist_info.world_size))
    else:
        images, names = input_images(H)
        todo = len(images) if H.mode == 'reconstruct' else H.interp_steps * len(H.interp_list)
    model = build_model(H, dist_info, weights)
    if dist_info.is_main:
        os.makedirs(H.out_dir, exist_ok=True)
    barrier()
    log = logger(os.path.join(H.out_dir, 'evaluate'), is_main=dist_info.is_main)
    for note in notes:
        log(note)
    log(f'{H.mode}: {model.num_params():,} parameters | {dist_info.world_size} process(es) via {dist_info.launcher} | '
        f'device {dist_info.device} | outputs in {H.out_dir}')
    bar = progress_bar(is_main=dist_info.is_main, off=H.no_progress, total=todo, desc=H.mode, unit='img',
                       dynamic_ncols=True)
    try:
        return _dispatch(H, dist_info, model, source, images, names, weights, bar, log)
    finally:
        bar.close()


def _dispatch(H, dist_info, model, source, images, names, weights, bar, log):
    out = H.out_dir
    if H.mode == 'n_importance':
        res = run_iwae(H, dist_info, model, source, bar)
        if res is None:
            return None
        summary, per_image = res
        stem = os.path.join(out, f'iwae-{H.split}-k{H.n_importance}')
        summary.update(weights=weights, json=stem + '.json', per_image=stem + '.npz')
        _write_json(summary, stem + '.json')
        with atomic_write(stem + '.npz') as f:
            np.savez(f, **per_image)
        log(type='iwae', **{k: v for k, v in summary.items() if k != 'mode'})
        add_to_run_events(H, dist_info, weights, {f'iw_{H.split}/k{H.n_importance}/{k}': summary[k] for k in (
            'iw_nll_bits_per_dim', 'iw_nll_bits_per_dim_stderr', 'elbo_bits_per_dim', 'iw_gain_nats_per_dim',
            'mean_ess_fraction')})
        log(f'{H.split}: IW bound (K={H.n_importance}) {summary["iw_nll_nats_per_dim"]:.5f} '
            f'+- {summary["iw_nll_nats_per_dim_stderr"]:.5f} nats/dim = {summary["iw_nll_bits_per_dim"]:.5f} '
            f'+- {summary["iw_nll_bits_per_dim_stderr"]:.5f} bits/dim over {summary["n_images"]} images '
            f'(ELBO {summary["elbo_bits_per_dim"]:.5f} bits/dim)')
        return summary
    if H.mode == 'kl_stats':
        stats = run_kl_stats(H, dist_info, model, source, bar)
        if stats is None:
            return None
        stem = os.path.join(out, f'kl-{H.split}')
        stats.update(weights=weights, json=stem + '.json', png=stem + '.png')
        _write_json(stats, stem + '.json')
        write_kl_plot(stats, stem + '.png')
        log(type='kl_stats', split=H.split, n_images=stats['n_images'], rate=stats['rate_nats_per_dim'],
            inactive_blocks=stats['inactive_blocks'], json=stats['json'])
        add_to_run_events(H, dist_info, weights, {f'kl_stats_{H.split}/rate': stats['rate_nats_per_dim'],
                                                  f'kl_stats_{H.split}/inactive_blocks': len(stats['inactive_blocks']),
                                                  **{f'kl_stats_{H.split}/block_{b["index"]:02d}': b['kl_nats']
                                                     for b in stats['blocks']}})
        log(f'{H.split}: rate {stats["rate_nats_per_dim"]:.5f} nats/dim over {stats["n_images"]} images; '
            f'{len(stats["inactive_blocks"])} of {len(stats["blocks"])} blocks below '
            f'{H.inactive_threshold:g} nats: {stats["inactive_blocks"]}')
        return stats
    if H.mode == 'encode':
        summary = run_encode(H, dist_info, model, source, os.path.join(out, f'latents-{H.split}.npz'), bar)
        if summary is not None:
            summary['weights'] = weights
            log(type='encode', **{k: v for k, v in summary.items() if k != 'mode'})
        return summary
    if H.mode == 'reconstruct':
        grid = run_reconstruct(H, dist_info, model, images, bar)
        if grid is None:
            return None
        stem = os.path.join(out, 'reconstructions')
        write_image(tile(grid), stem + '.png')
        summary = dict(mode='reconstruct', rows=['original'] + [f'k={k}' for k in H.keep_list], keep=H.keep_list,
                       n_blocks=len(block_resolutions(H)), columns=names, rest_temperature=H.rest_temperature,
                       seed=H.seed, weights=weights, png=stem + '.png')
        _write_json(summary, stem + '.json')
        log(f'reconstructions of {len(names)} images keeping k = {H.keep_list} latent layers -> {stem}.png')
        return summary
    grid, alphas = run_interpolate(H, dist_info, model, images, bar)
    if grid is None:
        return None
    stem = os.path.join(out, 'interpolation')
    write_image(tile(grid), stem + '.png')
    summary = dict(mode='interpolate', rows=[f'top {n} blocks' for n in H.interp_list], interp_layers=H.interp_list,
                   columns=[names[0]] + [f'alpha={a:.3f}' for a in alphas] + [names[1]],
                   n_blocks=len(block_resolutions(H)), rest_temperature=H.rest_temperature, seed=H.seed,
                   weights=weights, png=stem + '.png')
    _write_json(summary, stem + '.json')
    log(f'interpolation {names[0]} -> {names[1]} over the top {H.interp_list} blocks -> {stem}.png')
    return summary


if __name__ == '__main__':
    run_main(main)
