"""Draw pictures from a trained VDVAE without touching its training state.

    # the release's sample grid of a run (originals, reconstructions, samples)
    python sample.py --desc quickstart --mode grid
    # 16 unconditional samples at each of three temperatures (one row per temperature; more than 16
    # per temperature wrap into a near-square block of rows of max(16, ceil(sqrt(n))) images)
    python sample.py --hps cifar10 --restore_ema_path cifar10-seed1-iter-1050000-model-ema.th \
        --mode uncond --n 16 --temperatures 1.0 0.9 0.8
    # reconstructions of given images (files or test-set indices) keeping the first k latents, by the
    # one rule of pictures.py that the training grid and evaluate.py --reconstruct share (docs/evaluation.md)
    python sample.py --hps cifar10 --restore_ema_path ... --mode recon --images a.png b.png --keep 1 5 20

Weights come from --restore_ema_path / --restore_path or, by default, the newest
checkpoint of {save_dir}/{desc}.  A run's saved configuration (the 'H' of its -state.th,
also beside an explicit weights file) is the default for every setting: flags given on
the command line win, everything else (architecture, data_root, grid size) comes from
the run.  List flags take values separated by spaces or commas.  Output: an image in
the format its suffix names (default {out_dir}/{mode}.png, --out_dir defaulting to the
run folder).
"""
import argparse
import math
import os

import numpy as np
import torch
from PIL import Image

import data
from checkpoints import resolve_weights, restore_params
from hps import (UserError, add_vae_arguments, at_least, check_in_range, check_ranges, explicit_flags,
                 float_list, Hyperparams, int_list, parse_args_and_update_hparams)
from pictures import grid_keeps, reconstructions, sample_grid, tile, visualization_batch, write_image
from utils import check_writable, ieee_fp32, run_main, setup_distributed
from vae import VAE

RANGES = {'n': (at_least(1), '>= 1')}


def add_sample_arguments(parser):
    a = parser.add_argument
    a('--mode', choices=['grid', 'uncond', 'recon'], default='grid', help='what to draw')
    a('--n', type=int, default=8, help='uncond: samples per temperature (one row each up to 16; more wrap into '
                                       'rows of max(16, ceil(sqrt(n))) images: a near-square block per temperature)')
    a('--temperatures', nargs='+', default=None, help='uncond: temperatures, one row each (default: --temperature)')
    a('--images', nargs='+', default=None, help='recon: image files (the model\'s size and channels)')
    a('--indices', nargs='+', default=None, help='recon: positions in --split, e.g. 0 1 2 3 (or 0,1,2,3)')
    a('--split', choices=['test', 'valid', 'train'], default='test',
      help='recon/grid: data split (valid: the images of the training-time samples-N.png grids)')
    a('--keep', '--k', nargs='+', default=None, dest='keep',
      help='recon: numbers k of posterior latents kept, one row each, e.g. 1 5 20 (default: 6 values spread '
           'over the decoder)')
    a('--out', type=str, default=None, help='output image file; its suffix names the format (.png, .jpg, ...)')
    a('--out_dir', type=str, default=None, help='folder of the output {mode}.png when --out is not given '
                                               '(default {save_dir}/{desc})')
    return parser


def output_path(H):
    """The output file, checked to have an image suffix Pillow writes and a writable folder."""
    out = H.out or os.path.join(H.out_dir or H.run_dir, f'{H.mode}.png')
    ext = os.path.splitext(out)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise UserError(f"--out {out}: {ext or 'no suffix'} is not an image format Pillow writes; end the name "
                        "with .png (lossless), .jpg, .webp, .tif or .bmp")
    folder = os.path.dirname(os.path.abspath(out))
    check_writable(folder, 'pass --out FILE or --out_dir DIR somewhere writable')
    return out, fmt


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sample_arguments(parser)
    add_vae_arguments(parser)
    H = parse_args_and_update_hparams(Hyperparams(), parser, argv)
    check_ranges(H, RANGES)
    H.explicit = sorted(explicit_flags(parser, argv))
    H.run_dir = os.path.join(H.save_dir, H.desc)
    H.indices, H.keep = int_list(H.indices, '--indices'), int_list(H.keep, '--keep')
    H.temperatures = float_list(H.temperatures, '--temperatures')
    if H.temperatures and not all(t > 0 for t in H.temperatures):
        raise UserError(f"--temperatures {H.temperatures}: every temperature must be > 0")
    if H.indices and min(H.indices) < 0:
        raise UserError(f"--indices {min(H.indices)}: positions are >= 0")
    H.out_path, H.out_format = output_path(H)
    return H


def load_model(H, device):
    """The EMA (or given) weights.  The run's saved config becomes the default of H
    (explicit flags win), so the architecture, data and grid are the run's."""
    path, notes = resolve_weights(H)
    for note in notes:
        print(note, flush=True)
    with torch.device('meta'):
        VAE(H)  # check the configuration before allocating anything
    model = VAE(H)
    restore_params(model, path, H)
    print(f'loaded {path}', flush=True)
    return model.to(device).eval()


def input_images(H):
    """uint8 (B,H,W,C) from --images files and/or --indices into --split."""
    shape, wants = (H.image_size, H.image_size, H.image_channels), f'the model ({H.dataset})'
    ims = [data.read_image(p, shape, wants=wants) for p in H.images or []]
    if H.indices:
        source = getattr(data.load_data(H), H.split)
        idx = np.array(H.indices)
        if idx.max() >= len(source):
            raise UserError(f"--indices {idx.max()}: the {H.split} split has {len(source)} images "
                            f"(0..{len(source) - 1})")
        ims += list(source[idx])
    if not ims:
        raise UserError("--mode recon needs --images FILE ... or --indices I ...")
    return np.stack(ims)


def grid_columns(n):
    """Images per row for n samples of one temperature: all n up to 16, else max(16, ceil(sqrt(n))),
    so that many samples make a near-square block instead of one very long row."""
    return min(n, max(16, math.isqrt(n - 1) + 1))


def wrap(batch, cols):
    """(n, H, W, C) -> (ceil(n / cols), cols, H, W, C); the last row's empty places are black."""
    rows = -(-len(batch) // cols)
    pad = np.zeros((rows * cols - len(batch),) + batch.shape[1:], batch.dtype)
    return np.concatenate([batch, pad]).reshape(rows, cols, *batch.shape[1:])


@torch.no_grad()
def unconditional(H, model, n, temperatures):
    """n samples per temperature: one row each up to 16, else rows of grid_columns(n), each
    temperature's block below the previous one."""
    cols = grid_columns(n)
    return tile(np.concatenate([wrap(model.forward_uncond_samples(n, t=t), cols) for t in temperatures]))


def main(argv=None):
    H = parse(argv)
    dist_info = setup_distributed(H.port, device=None if H.device == 'auto' else H.device, timeout=H.dist_timeout)
    if dist_info.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms once
    with ieee_fp32():  # the release's numbers on any GPU: no TF32 convolutions
        return draw(H, dist_info)


def draw(H, dist_info):
    model = load_model(H, dist_info.device)
    torch.manual_seed(H.seed)
    out = H.out_path
    if H.mode == 'uncond':
        im = unconditional(H, model, H.n, H.temperatures or [H.temperature])
    elif H.mode == 'recon':
        n_blocks = len(model.decoder.dec_blocks)
        ks = H.keep or grid_keeps(n_blocks, 6)
        check_in_range(ks, '--keep', 0, n_blocks,
                       f'the decoder has {n_blocks} latent layers, so k must be in 0..{n_blocks}')
        im = tile(reconstructions(H, model, input_images(H), ks, dist_info.device))  # the rule of pictures.py
    else:
        source = getattr(data.load_data(H), H.split)
        im = sample_grid(H, model, visualization_batch(H, source), dist_info.device)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_image(im, out, format=H.out_format)
    print(f'wrote {out} ({im.shape[1]}x{im.shape[0]})', flush=True)
    return out


if __name__ == '__main__':
    run_main(main)
