"""Draw pictures from a trained VDVAE without touching its training state.

    # the sample grid of SPEC §10 (originals, reconstructions, samples) of a run
    python sample.py --hps fashion_mnist_quick --desc quickstart --mode grid
    # 16 unconditional samples at each of three temperatures (one row per temperature)
    python sample.py --hps cifar10 --restore_ema_path cifar10-seed1-iter-1050000-model-ema.th \
        --mode uncond --n 16 --temperatures 1.0,0.9,0.8
    # reconstructions of given images (files or valid-set indices) keeping the first k latents
    python sample.py --hps cifar10 --restore_ema_path ... --mode recon --images a.png b.png --k 1,5,20

Weights come from --restore_ema_path / --restore_path or, by default, the newest
checkpoint of {save_dir}/{desc}; a run's architecture is taken from the config saved in
its checkpoint.  Output: a PNG (default {save_dir}/{desc}/{mode}.png).
"""
import argparse
import os

import numpy as np
import torch
from PIL import Image

import data
from hps import UserError, add_vae_arguments, Hyperparams, parse_args_and_update_hparams
from train import find_checkpoint, tile, write_png, sample_grid
from utils import ieee_fp32, restore_params, run_main, setup_distributed
from vae import VAE

ARCH_KEYS = ['dataset', 'image_size', 'image_channels', 'width', 'zdim', 'enc_blocks', 'dec_blocks',
             'custom_width_str', 'bottleneck_multiple', 'no_bias_above', 'num_mixtures']


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--mode', choices=['grid', 'uncond', 'recon'], default='grid', help='what to draw')
    parser.add_argument('--n', type=int, default=8, help='uncond: samples per temperature')
    parser.add_argument('--temperatures', type=str, default=None,
                        help='uncond: comma-separated temperatures (default: --temperature)')
    parser.add_argument('--images', nargs='*', default=[], help='recon: image files (PNG, the preset\'s size)')
    parser.add_argument('--indices', type=str, default='', help='recon: comma-separated indices into --split')
    parser.add_argument('--split', choices=['train', 'valid', 'test'], default='valid', help='recon/grid: data split')
    parser.add_argument('--k', type=str, default='', help='recon: comma-separated numbers of posterior latents kept '
                                                          '(default: 6 values spread over the decoder)')
    parser.add_argument('--out', type=str, default=None, help='output PNG')
    add_vae_arguments(parser)
    H = parse_args_and_update_hparams(Hyperparams(), parser, argv)
    H.run_dir = os.path.join(H.save_dir, H.desc)
    return H


def load_model(H, device):
    """The EMA (or given) weights; a run folder's saved config decides the architecture."""
    path = H.restore_ema_path or H.restore_path
    if not path:
        prefix, state = find_checkpoint(H.run_dir)
        if prefix is None:
            raise UserError(f"no weights: pass --restore_ema_path FILE, or the --save_dir/--desc of a run with "
                            f"checkpoints ({H.run_dir} has none)")
        H.update({k: state['H'][k] for k in ARCH_KEYS if k in state['H']})
        path = prefix + '-model-ema.th'
    with torch.device('meta'):
        VAE(H)  # check the configuration before allocating anything
    model = VAE(H)
    restore_params(model, path, H)
    print(f'loaded {path}', flush=True)
    return model.to(device).eval()


def read_image(path, H):
    if not os.path.isfile(path):
        raise UserError(f"--images: {path} does not exist")
    try:
        im = np.asarray(Image.open(path).convert('L' if H.image_channels == 1 else 'RGB'))
    except OSError as e:
        raise UserError(f"--images: cannot read {path} as an image ({e})") from None
    im = im.reshape(im.shape[0], im.shape[1], H.image_channels)
    if im.shape[:2] != (H.image_size, H.image_size):
        raise UserError(f"--images: {path} is {im.shape[1]}x{im.shape[0]}, the model takes "
                        f"{H.image_size}x{H.image_size}")
    return im


def input_images(H):
    """uint8 (B,H,W,C) from --images files and/or --indices into --split."""
    ims = [read_image(p, H) for p in H.images]
    if H.indices:
        source = getattr(data.load_data(H), H.split)
        try:
            idx = np.array([int(i) for i in H.indices.split(',')])
        except ValueError:
            raise UserError(f"--indices {H.indices!r}: expected comma-separated integers") from None
        if idx.min() < 0 or idx.max() >= len(source):
            raise UserError(f"--indices: the {H.split} split has {len(source)} images (0..{len(source) - 1})")
        ims += list(source[idx])
    if not ims:
        raise UserError("--mode recon needs --images FILE... or --indices I,J,...")
    return torch.from_numpy(np.stack(ims))


@torch.no_grad()
def reconstructions(H, model, x, ks, device):
    """Rows: originals, then reconstructions keeping the first k posterior latents
    (the rest from the prior at t=0.1) for each k."""
    x_in, _ = data.preprocess(H, x.to(device))
    zs = [s['z'] for s in model.forward_get_latents(x_in)]
    bad = [k for k in ks if not 0 <= k <= len(zs)]
    if bad:
        raise UserError(f"--k {bad}: the decoder has {len(zs)} latent layers, so k must be in 0..{len(zs)}")
    rows = [x.numpy()] + [model.forward_samples_set_latents(len(x), zs[:k], t=0.1) for k in ks]
    return tile(np.stack(rows))


@torch.no_grad()
def unconditional(H, model, n, temperatures):
    return tile(np.stack([model.forward_uncond_samples(n, t=t) for t in temperatures]))


def main(argv=None):
    H = parse(argv)
    d = setup_distributed(device=None if H.device == 'auto' else H.device)
    if d.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms once
    with ieee_fp32():  # the release's numbers on any GPU: no TF32 convolutions
        return draw(H, d)


def draw(H, d):
    model = load_model(H, d.device)
    torch.manual_seed(H.seed)
    out = H.out or os.path.join(H.run_dir, f'{H.mode}.png')
    if H.mode == 'uncond':
        try:
            temps = [float(t) for t in H.temperatures.split(',')] if H.temperatures else [H.temperature]
        except ValueError:
            raise UserError(f"--temperatures {H.temperatures!r}: expected comma-separated numbers") from None
        if any(t <= 0 for t in temps):
            raise UserError("--temperatures must be positive")
        im = unconditional(H, model, H.n, temps)
    elif H.mode == 'recon':
        n_blocks = len(model.decoder.dec_blocks)
        try:
            ks = [int(k) for k in H.k.split(',')] if H.k else \
                list(np.floor(np.linspace(0, 1, 8) * n_blocks).astype(int)[1:-1])
        except ValueError:
            raise UserError(f"--k {H.k!r}: expected comma-separated integers") from None
        im = reconstructions(H, model, input_images(H), ks, d.device)
    else:
        source = getattr(data.load_data(H), H.split)
        x = torch.from_numpy(source[np.arange(min(H.num_images_visualize, len(source)))])
        im = sample_grid(H, model, x, d.device)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_png(im, out)
    print(f'wrote {out} ({im.shape[1]}x{im.shape[0]})', flush=True)
    return out


if __name__ == '__main__':
    run_main(main)
