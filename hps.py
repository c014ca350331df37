"""Hyperparameters: argparse defaults of the VDVAE release plus named presets.

Resolution order: argparse defaults < presets (``--hps a,b``, applied left to
right) < explicit command-line flags.  Every value ends up in one strict
``Hyperparams`` object; looking up a key that does not exist is an error.

    python -c "from hps import *; H = get_hparams(['--hps', 'cifar10']); print(H.width)"
"""
import argparse
import math
import re

HPARAMS_REGISTRY = {}
DEFAULT_PRESET = 'fashion_mnist'


class UserError(Exception):
    """Bad input from the user (flags, files, data).  Entry points print it as one
    line and exit with status 2 instead of showing a traceback."""


class Hyperparams(dict):
    """A dict with attribute access.  Unlike the release, an unknown key raises
    AttributeError instead of silently answering None."""

    def __getattr__(self, attr):
        try:
            return self[attr]
        except KeyError:
            raise AttributeError(f"Hyperparams has no key {attr!r}; known keys: {', '.join(sorted(self))}") from None

    def __setattr__(self, attr, value):
        self[attr] = value

    def __getstate__(self):
        return dict(self)

    def __setstate__(self, state):
        self.update(state)


# Input normalisation per dataset: x_in = (x + shift) * scale on uint8 pixels
# (ffhq_1024: on [0, 1] floats).  The release's constants; fashion_mnist's were
# computed on its 60000 training images (pixel mean 72.94035223, std 90.02118235).
NORMALIZATION = {
    'cifar10': (-120.63838, 1. / 64.16736),
    'imagenet32': (-116.2373, 1. / 69.37404),
    'imagenet64': (-115.92961967, 1. / 69.37404),
    'ffhq_256': (-112.8666757481, 1. / 69.84780273),
    'ffhq_1024': (-0.4387, 1. / 0.2743),
    'fashion_mnist': (-72.94035223, 1. / 90.02118235),
}
# (image_size, image_channels) per dataset, as the release's data.py sets them.
IMAGE_SHAPE = {
    'cifar10': (32, 3), 'imagenet32': (32, 3), 'imagenet64': (64, 3),
    'ffhq_256': (256, 3), 'ffhq_1024': (1024, 3), 'fashion_mnist': (28, 1),
}


def _preset(name, parent=None, **kw):
    hps = Hyperparams()
    if parent is not None:
        hps.update(HPARAMS_REGISTRY[parent])
    hps.update(kw)
    if kw.get('dataset') in IMAGE_SHAPE:  # (dataset images: the shape is its manifest's, see fit_images_dataset)
        hps.image_size, hps.image_channels = IMAGE_SHAPE[kw['dataset']]
    HPARAMS_REGISTRY[name] = hps
    return hps


# --- The release's presets (each starts from the previous one). ---
_preset('cifar10', dataset='cifar10', width=384, lr=0.0002, zdim=16, wd=0.01, warmup_iters=100,
        n_batch=16, ema_rate=0.9999,
        enc_blocks="32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
        dec_blocks="1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21")
_preset('imagenet32', 'cifar10', dataset='imagenet32', ema_rate=0.999, width=512, n_batch=8,
        lr=0.00015, grad_clip=200., skip_threshold=300., epochs_per_eval=1, epochs_per_eval_save=1,
        enc_blocks="32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6",
        dec_blocks="1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40")
_preset('imagenet64', 'imagenet32', dataset='imagenet64', n_batch=4, grad_clip=220., skip_threshold=380.,
        enc_blocks="64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5",
        dec_blocks="1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12")
_preset('ffhq256', 'imagenet64', dataset='ffhq_256', n_batch=1, lr=0.00015, epochs_per_eval=1,
        epochs_per_eval_save=1, num_images_visualize=2, num_variables_visualize=3,
        num_temperatures_visualize=1, no_bias_above=64, grad_clip=130., skip_threshold=180.,
        enc_blocks="256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4",
        dec_blocks="1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128")
_preset('ffhq1024', 'ffhq256', dataset='ffhq_1024', data_root='./ffhq_images1024x1024', epochs_per_eval=1,
        epochs_per_eval_save=1, num_images_visualize=1, iters_per_images=25000, num_variables_visualize=0,
        num_temperatures_visualize=4, grad_clip=360., skip_threshold=500., num_mixtures=2, width=16,
        lr=0.00007,
        enc_blocks="1024x1,1024d2,512x3,512d2,256x5,256d2,128x7,128d2,64x10,64d2,32x14,32d2,16x7,16d2,"
                   "8x5,8d2,4x5,4d4,1x4",
        dec_blocks="1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x20,64m32,64x14,128m64,128x7,256m128,256x2,"
                   "512m256,1024m512",
        custom_width_str='512:32,256:64,128:512,64:512,32:512,16:512,8:512,4:512,1:512')

# --- Fashion-MNIST, 28x28x1 at native resolution: 28 -> 14 -> 7 -> 1. ---
# Full size, meant for a GPU (cifar10-sized network).
_preset('fashion_mnist', dataset='fashion_mnist', width=384, zdim=16, lr=0.0002, wd=0.01, warmup_iters=100,
        n_batch=32, ema_rate=0.9999, num_mixtures=10, grad_clip=200., skip_threshold=400.,
        epochs_per_eval=1, epochs_per_eval_save=1,
        enc_blocks="28x11,28d2,14x6,14d2,7x6,7d7,1x3",
        dec_blocks="1x1,7m1,7x6,14m7,14x10,28m14,28x21")
# Small, for a laptop CPU: learns a clearly-better-than-uniform model in minutes
# (widths and depths chosen by measurement, see README).
_preset('fashion_mnist_quick', 'fashion_mnist', width=32, zdim=8, lr=0.001, n_batch=32, ema_rate=0.99,
        warmup_iters=50, num_mixtures=5, grad_clip=200., skip_threshold=2000.,
        iters_per_print=100, iters_per_save=500, iters_per_ckpt=100000, iters_per_images=1000,
        epochs_per_eval=1, num_images_visualize=8, num_variables_visualize=4, num_temperatures_visualize=3,
        enc_blocks="28d2,14x2,14d2,7x3,7d7,1x1",
        dec_blocks="1x1,7m1,7x3,14m7,14x3,28m14",
        max_iters=2000)


# --- Your own images (setup_images.sh): dataset 'images', its shape read from the dataset's manifest. ---
# The architecture depends on the images' size, so these two presets are completed by a function of
# the size (SIZED_PRESETS) when --hps names them: 'images' takes the release's network of that
# resolution (images_preset), 'images_quick' a CPU-sized one (images_quick_preset).
_preset('images', dataset='images')
_preset('images_quick', 'fashion_mnist_quick', dataset='images')

# Blocks per resolution of the release's networks: {image size: (preset, encoder, decoder)}, each
# {resolution: blocks there}.  Encoder: the RxN blocks plus the RdK block that leaves R; decoder:
# the RmS block that enters R plus the RxN blocks after it (block_strings writes the strings).
RELEASE_BLOCKS = {
    32: ('cifar10', {32: 12, 16: 7, 8: 7, 4: 4, 1: 3}, {1: 1, 4: 3, 8: 6, 16: 11, 32: 22}),
    64: ('imagenet64', {64: 12, 32: 21, 16: 10, 8: 9, 4: 8, 1: 5}, {1: 2, 4: 4, 8: 8, 16: 16, 32: 32, 64: 13}),
    256: ('ffhq256', {256: 4, 128: 9, 64: 13, 32: 18, 16: 8, 8: 6, 4: 6, 1: 4},
          {1: 2, 4: 4, 8: 5, 16: 10, 32: 22, 64: 14, 128: 8, 256: 1}),
    1024: ('ffhq1024', {1024: 2, 512: 4, 256: 6, 128: 8, 64: 11, 32: 15, 16: 8, 8: 6, 4: 6, 1: 4},
           {1: 2, 4: 4, 8: 5, 16: 10, 32: 21, 64: 15, 128: 8, 256: 3, 512: 1, 1024: 1}),
}


def block_strings(enc, dec):
    """Layer strings from blocks per resolution ({resolution: count}), the way the release writes
    them: the encoder from the top resolution down, each resolution's RxN blocks then one RdK down to
    the next resolution (K = R / next), the lowest resolution RxN only; the decoder from the lowest
    up, each resolution entered by an RmS block from the one below, then RxN.
    block_strings({32: 12, 16: 7, 8: 7, 4: 4, 1: 3}, {1: 1, 4: 3, ...}) -> ('32x11,32d2,...,1x3', '1x1,4m1,4x2,...')."""
    res = sorted(enc, reverse=True)
    e = []
    for r, nxt in zip(res, res[1:] + [None]):
        n = enc[r] - (nxt is not None)
        e += [f'{r}x{n}'] * (n > 0) + ([f'{r}d{r // nxt}'] if nxt else [])
    res = sorted(dec)
    d = [f'{res[0]}x{dec[res[0]]}']
    for below, r in zip(res, res[1:]):
        d += [f'{r}m{below}'] + [f'{r}x{dec[r] - 1}'] * (dec[r] > 1)
    return ','.join(e), ','.join(d)


def images_blocks(size):
    """The rule of --hps images: (release preset, encoder string, decoder string) for a power of two
    16..1024.  At 32, 64, 256 and 1024 the release's own network (cifar10, imagenet64, ffhq256,
    ffhq1024); at 16, 128 and 512 that of the next larger release resolution, cut at ``size``: its
    blocks at resolutions <= size, with the same counts (the encoder starts and the decoder ends at
    ``size``).  Anything else is a UserError saying what to do."""
    fits = [s for s in sorted(RELEASE_BLOCKS) if s >= size]
    if size < 16 or size > 1024 or size & (size - 1):
        raise UserError(f"--hps images takes the release's architectures, made for image sizes that are powers of "
                        f"two from 16 to 1024, but these images are {size}x{size}: prepare them again at --size "
                        f"{min(max(16, 1 << (size - 1).bit_length()), 1024)} (./setup_images.sh SRC DATA_ROOT "
                        "--size N into a new DATA_ROOT), or train --hps images_quick (any size divisible by 4)")
    name, enc, dec = RELEASE_BLOCKS[fits[0]]
    cut = lambda counts: {r: n for r, n in counts.items() if r <= size}  # noqa: E731
    return (name,) + block_strings(cut(enc), cut(dec))


def images_preset(size):
    """--hps images at this image size: every value of the release preset images_blocks picks
    (learning rate, batch, clipping, EMA, widths, ...), except its dataset and data_root, with the
    layer strings of images_blocks; custom widths (ffhq1024's) keep the resolutions <= size, and
    --width is the width at the image resolution (SPEC section 8)."""
    name, enc, dec = images_blocks(size)
    values = {k: v for k, v in HPARAMS_REGISTRY[name].items()
              if k not in ('dataset', 'data_root', 'image_size', 'image_channels')}
    values.update(enc_blocks=enc, dec_blocks=dec)
    if values.get('custom_width_str'):
        widths = dict(tuple(map(int, x.split(':'))) for x in values['custom_width_str'].split(','))
        widths = {r: w for r, w in widths.items() if r <= size}
        values['custom_width_str'] = ','.join(f'{r}:{w}' for r, w in widths.items())
        values['width'] = widths.get(size, values['width'])
    return values


def images_quick_preset(size):
    """--hps images_quick at this image size: fashion_mnist_quick's small network, for a CPU, at
    any size divisible by 4 (S -> S/2 -> S/4 -> 1):
    encoder 'Sd2,S/2x2,S/2d2,S/4x3,S/4dS/4,1x1', decoder '1x1,S/4m1,S/4x3,S/2mS/4,S/2x3,SmS/2'
    (at 28 exactly fashion_mnist_quick's)."""
    if size % 4 or size < 8:
        raise UserError(f"--hps images_quick halves the image size twice, so it takes sizes divisible by 4 (8 or "
                        f"more), but these images are {size}x{size}: prepare them again at --size "
                        f"{max(8, size // 4 * 4)} (./setup_images.sh SRC DATA_ROOT --size N into a new DATA_ROOT)")
    a, b = size // 2, size // 4
    return dict(enc_blocks=f'{size}d2,{a}x2,{a}d2,{b}x3,{b}d{b},1x1',
                dec_blocks=f'1x1,{b}m1,{b}x3,{a}m{b},{a}x3,{size}m{a}')


SIZED_PRESETS = {'images': images_preset, 'images_quick': images_quick_preset}


def low_bit_targets(H):
    """Whether targets and the DMoL's bins are 5-bit: ffhq256 (the release), and a folder of images
    prepared with --bits 5."""
    return H.dataset == 'ffhq_256' or (H.dataset == 'images' and H.image_bits == 5)


def fit_images_dataset(H, explicit):
    """Dataset images: its shape, bits and normalisation come from the manifest of --data_root
    (data.read_manifest).  Refuses, in one line saying what to do, an architecture given on the
    command line (or by a preset of another dataset) that starts at another size than the images'."""
    from data import read_manifest  # the data module reads the dataset; it imports this one
    m = read_manifest(H.data_root)
    size, _, channels = m['image_shape']
    H.update(image_size=size, image_channels=channels, image_bits=m['bits'],
             image_mean=m['normalization']['mean'], image_std=m['normalization']['std'])
    top = re.match(r'\s*(\d*)', H.enc_blocks or '').group(1)  # the encoder starts at the image resolution
    if top and int(top) != size:
        given = '--enc_blocks' if 'enc_blocks' in explicit else f"--hps {H.hparam_sets}"
        raise UserError(f"{H.data_root} holds {size}x{size} images (its manifest, images/manifest.json), but the "
                        f"architecture of {given} starts at {top}x{top}: prepare the images again at --size {top} "
                        "(./setup_images.sh SRC DATA_ROOT --size N into a new DATA_ROOT), or train --hps images or "
                        "images_quick, which fit the architecture to the data")


def add_vae_arguments(parser):
    """Every flag of the release (dead ones removed or made to work) plus ours."""
    a = parser.add_argument
    a('--seed', type=int, default=0, help='random seed (offset by rank for data and sampling noise; with each '
                                          'image\'s position in the split, the key of the evaluation\'s posterior noise)')
    a('--port', type=int, default=29500,
      help='rendezvous port for mpiexec and srun launches (MASTER_PORT wins when set)')
    a('--dist_timeout', type=float, default=600,
      help='seconds a process waits in a collective for the others (all-reduce, barrier) before it ends the run: '
           'the bound on a hang when another process died or hangs; it must exceed the longest rank-0-only work '
           '(a checkpoint save, the sample grid)')
    a('--save_dir', type=str, default='./saved_models', help='root folder of all runs')
    a('--data_root', type=str, default='./', help='folder that holds the dataset files')
    a('--desc', type=str, default='test', help='run name: outputs go to {save_dir}/{desc}/')
    a('--hparam_sets', '--hps', type=str, default=None,
      help=f'comma-separated presets applied in order (default: {DEFAULT_PRESET}); one of: '
           + ', '.join(HPARAMS_REGISTRY))
    a('--restore_path', type=str, default=None, help='model state dict (-model.th) to start from')
    a('--restore_ema_path', type=str, default=None, help='EMA model state dict (-model-ema.th)')
    a('--restore_log_path', type=str, default=None, help='run log (-log.jsonl): resumes step and epoch')
    a('--restore_optimizer_path', type=str, default=None, help='optimizer state (-opt.th; apex or torch format)')
    a('--resume', action='store_true', help='continue from the newest complete checkpoint in {save_dir}/{desc}')
    a('--restart', action='store_true',
      help='begin {save_dir}/{desc} afresh at step 0; its earlier files are moved to a before-restart-* folder in it')
    a('--allow_changes', action='store_true',
      help='resume even though the global batch (n_batch x processes), seed, architecture or training data '
           'differ from the checkpoint\'s')
    a('--dataset', type=str, default='fashion_mnist', help='dataset name (set by the presets)')
    a('--image_size', type=int, default=28, help='image height and width (set by the presets)')
    a('--image_channels', type=int, default=1, help='1 (grayscale) or 3 (RGB) (set by the presets)')
    a('--image_bits', type=int, default=8,
      help='dataset images: 8- or 5-bit targets (set from the dataset\'s manifest, as setup_images.sh --bits made it)')
    a('--image_mean', type=float, default=None,
      help='dataset images: pixel mean of its train split; inputs are (x - mean) / std (set from the manifest)')
    a('--image_std', type=float, default=None, help='dataset images: pixel standard deviation of its train split '
                                                    '(set from the manifest)')
    a('--ema_rate', type=float, default=0.999, help='EMA decay of the evaluation model')
    a('--enc_blocks', type=str, default=None, help='encoder layer string, e.g. 32x11,32d2,...')
    a('--dec_blocks', type=str, default=None, help='decoder layer string, e.g. 1x1,4m1,...')
    a('--zdim', type=int, default=16, help='latent channels per decoder block')
    a('--width', type=int, default=512, help='channels at every resolution unless custom_width_str says otherwise')
    a('--custom_width_str', type=str, default='', help='per-resolution widths, e.g. "512:32,256:64"')
    a('--bottleneck_multiple', type=float, default=0.25, help='bottleneck width of a block = width * this')
    a('--no_bias_above', type=int, default=64, help='learned decoder state biases only up to this resolution')
    a('--test_eval', action='store_true', help='evaluate the EMA model on the test split and exit')
    a('--warmup_iters', type=float, default=0, help='linear lr warm-up length (0 = no warm-up)')
    a('--num_mixtures', type=int, default=10, help='logistic mixture components of the output head')
    a('--grad_clip', type=float, default=200.0,
      help='clip the total gradient norm to this (-1: never clip; the norm is still measured and logged)')
    a('--skip_threshold', type=float, default=400.0, help='skip updates whose grad norm reaches this (-1: never)')
    a('--lr', type=float, default=0.00015, help='peak learning rate')
    a('--wd', type=float, default=0.0, help='decoupled (AdamW) weight decay')
    a('--num_epochs', type=int, default=10000, help='epochs to train')
    a('--max_iters', type=int, default=0, help='stop when the iteration counter reaches this (0 = no limit)')
    a('--n_batch', type=int, default=32, help='batch size per process')
    a('--valid_images', type=int, default=0,
      help='evaluate on only the first N validation images during training (0: all); --test_eval always uses all')
    a('--n_batch_eval', type=int, default=0, help='evaluation batch size per process (0: 4 x n_batch)')
    a('--adam_beta1', type=float, default=0.9, help='Adam beta1')
    a('--adam_beta2', type=float, default=0.9, help='Adam beta2')
    a('--temperature', type=float, default=1.0, help='prior temperature for unconditional samples')
    a('--iters_per_ckpt', type=int, default=25000, help='write iter-N checkpoints this often')
    a('--iters_per_print', type=int, default=1000, help='log averaged training stats this often')
    a('--iters_per_save', type=int, default=10000, help='write the latest checkpoint this often')
    a('--iters_per_images', type=int, default=10000, help='write the sample grid this often')
    a('--epochs_per_eval', type=int, default=10, help='evaluate the EMA model on valid every this many epochs')
    a('--epochs_per_eval_save', type=int, default=20, help='also write the latest checkpoint every this many epochs')
    a('--num_images_visualize', type=int, default=8, help='columns of the sample grid')
    a('--num_variables_visualize', type=int, default=6, help='reconstruction rows of the sample grid')
    a('--num_temperatures_visualize', type=int, default=3, help='unconditional sample rows of the sample grid')
    # --- beyond the release: speed, precision, launch and robustness options ---
    a('--device', type=str, default='auto', choices=['auto', 'cpu', 'cuda'], help='auto: CUDA when available')
    a('--precision', type=str, default='fp32', choices=['fp32', 'bf16', 'fp16'],
      help='training precision: fp32 (as released), bf16 autocast, or fp16 autocast with a gradient scaler; '
           'evaluation always runs in fp32')
    a('--compile', action='store_true', help='torch.compile the training model (faster steps after a build)')
    a('--compile_scope', choices=['model', 'blocks'], default='model',
      help='with --compile: "model" = the whole training model; "blocks" = every residual block and the DMoL '
           'loss on its own (VAE.compile_blocks: a much shorter build on the deep presets)')
    a('--compile_mode', type=str, default=None, help='with --compile: torch.compile mode, e.g. max-autotune')
    a('--cuda_graphs', action='store_true',
      help='capture the whole training step (forward, backward, clip, fused AdamW, EMA, skip decision) in one '
           'CUDA graph and replay it: no per-kernel launch cost (one GPU, fp32 or bf16)')
    a('--channels_last', action='store_true', help='NHWC memory layout for the convolutions (tensor cores)')
    a('--grad_checkpoint', action='store_true', help='recompute block activations in backward to save memory')
    a('--num_workers', type=int, default=2, help='data-loading worker processes per rank')
    a('--threads', type=int, default=0,
      help='CPU threads per process (0: cores / local processes; more than that is capped to it, with a note)')
    a('--rank_invariant_noise', action='store_true',
      help='draw posterior noise for the global batch on every rank and keep this rank\'s slice, so that N '
           'processes compute exactly what one process does with the combined batch')
    a('--warn_skipped', type=int, default=50,
      help='warn when this many consecutive updates were skipped (grad norm >= skip_threshold)')
    a('--no_progress', action='store_true', help='no progress bars')
    a('--no_tensorboard', action='store_true',
      help='write no TensorBoard event files (by default training writes them to {save_dir}/{desc}/tensorboard/)')
    return parser


# ----------------------------------------------------------------------------- value checks

def _positive(v):
    return math.isfinite(v) and v > 0


def _off_or_positive(v):
    return v == -1 or _positive(v)


def at_least(lo):
    return lambda v: v >= lo


# flag -> (test, allowed values in words).  Every numeric flag of add_vae_arguments.
RANGES = {
    'seed': (at_least(0), '>= 0'),
    'port': (lambda v: 1 <= v <= 65535, 'in 1..65535'),
    'dist_timeout': (_positive, '> 0 (seconds)'),
    'image_size': (at_least(1), '>= 1'),
    'image_channels': (lambda v: v in (1, 3), '1 (grayscale) or 3 (RGB)'),
    'image_bits': (lambda v: v in (8, 5), '8 or 5'),
    'image_mean': (math.isfinite, 'a finite number'),
    'image_std': (_positive, '> 0'),
    'ema_rate': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'zdim': (at_least(1), '>= 1'),
    'width': (at_least(1), '>= 1'),
    'bottleneck_multiple': (_positive, '> 0'),
    'no_bias_above': (at_least(0), '>= 0'),
    'warmup_iters': (lambda v: math.isfinite(v) and v >= 0, '>= 0 (0: no warm-up)'),
    'num_mixtures': (at_least(1), '>= 1'),
    'grad_clip': (_off_or_positive, '> 0, or -1 for no clipping'),
    'skip_threshold': (_off_or_positive, '> 0, or -1 for never skipping'),
    'lr': (_positive, '> 0'),
    'wd': (lambda v: math.isfinite(v) and v >= 0, '>= 0'),
    'num_epochs': (at_least(1), '>= 1'),
    'max_iters': (at_least(0), '>= 0 (0: no limit)'),
    'n_batch': (at_least(1), '>= 1'),
    'valid_images': (at_least(0), '>= 0 (0: all)'),
    'n_batch_eval': (at_least(0), '>= 0 (0: 4 x n_batch)'),
    'adam_beta1': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'adam_beta2': (lambda v: 0 <= v < 1, 'in [0, 1)'),
    'temperature': (_positive, '> 0'),
    'iters_per_ckpt': (at_least(1), '>= 1'),
    'iters_per_print': (at_least(1), '>= 1'),
    'iters_per_save': (at_least(1), '>= 1'),
    'iters_per_images': (at_least(1), '>= 1'),
    'epochs_per_eval': (at_least(1), '>= 1'),
    'epochs_per_eval_save': (at_least(1), '>= 1'),
    'num_images_visualize': (at_least(1), '>= 1'),
    'num_variables_visualize': (at_least(0), '>= 0'),
    'num_temperatures_visualize': (lambda v: 0 <= v <= 4, 'in 0..4 (rows at t = 1.0, 0.9, 0.8, 0.7)'),
    'num_workers': (at_least(0), '>= 0'),
    'threads': (at_least(0), '>= 0 (0: cores / local processes)'),
    'warn_skipped': (at_least(1), '>= 1'),
}


def check_ranges(H, ranges=None):
    """Refuse out-of-range numbers with one line naming the flag and what it allows.
    ``ranges``: {flag: (test, words)}, RANGES by default; a value of None (flag unset) passes."""
    for name, (ok, words) in (RANGES if ranges is None else ranges).items():
        v = H.get(name)
        if v is not None and not (isinstance(v, (int, float)) and ok(v)):
            raise UserError(f"--{name} {v}: must be {words}")


def _list_flag(tokens, flag, parse, what, expected):
    """Values of a list flag (nargs='+'): tokens separated by spaces and/or commas, each
    turned into a list by ``parse``; a UserError naming the flag and what it ``expected``
    when one does not parse or none is given.  None (flag unset) stays None."""
    if tokens is None:
        return None
    given = ' '.join(tokens)
    out = []
    for tok in given.replace(' ', ',').split(','):
        if tok.strip():
            try:
                out += parse(tok.strip())
            except ValueError:
                raise UserError(f"{flag} {given}: expected {expected}") from None
    if not out:
        raise UserError(f"{flag}: give at least one {what}")
    return out


def _int_range(tok):
    a, b = tok.split('-', 1) if '-' in tok[1:] else (tok, tok)
    return list(range(int(a), int(b) + 1))


def int_list(tokens, flag):
    """Integers from a list flag, with ranges a-b: ['0,1', '3', '5-7'] -> [0, 1, 3, 5, 6, 7]."""
    return _list_flag(tokens, flag, _int_range, 'integer',
                      'comma-separated integers or ranges like 2-5 (spaces separate them as well)')


def float_list(tokens, flag):
    """Numbers from a list flag: ['1.0,0.9', '0.8'] -> [1.0, 0.9, 0.8]."""
    return _list_flag(tokens, flag, lambda tok: [float(tok)], 'number', 'numbers separated by spaces or commas')


def check_in_range(values, flag, lo, hi, why):
    """Refuse a list flag whose values (int_list) are not all in [lo, hi]: one line naming
    the flag, the first value outside and ``why`` the range is what it is."""
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise UserError(f"{flag} {' '.join(map(str, values))}: {bad[0]} is out of range [{lo}, {hi}] ({why})")


def explicit_flags(parser, s=None):
    """Names (dests) of the flags given on the command line ``s``, as opposed to those
    that keep a default or a preset's value."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    ns = parser.parse_args(s, ns)  # argparse fills defaults only where the namespace has nothing
    return {k for k, v in vars(ns).items() if v is not unset}


def parse_args_and_update_hparams(H, parser, s=None):
    """Parse ``s`` (default sys.argv) into H: defaults < presets < explicit flags.
    Numbers outside their range (RANGES) are refused with one line."""
    args = parser.parse_args(s)
    valid_args = set(vars(args))
    names = [x for x in (args.hparam_sets or DEFAULT_PRESET).split(',') if x]
    for name in names:
        if name not in HPARAMS_REGISTRY:
            raise UserError(f"unknown preset {name!r} in --hps; valid presets: {', '.join(HPARAMS_REGISTRY)}")
        unknown = [k for k in HPARAMS_REGISTRY[name] if k not in valid_args]
        if unknown:
            raise UserError(f"preset {name!r} sets {unknown}, which are not arguments; "
                         f"valid keys: {', '.join(sorted(valid_args))}")
        values = HPARAMS_REGISTRY[name]
        if name in SIZED_PRESETS:  # its architecture fits the size of the images under --data_root
            from data import read_manifest
            size = read_manifest(parser.parse_args(s).data_root)['image_shape'][0]
            values = dict(values, **SIZED_PRESETS[name](size))
        parser.set_defaults(**values)
    H.update(vars(parser.parse_args(s)))
    H.hparam_sets = ','.join(names)
    if H.dataset == 'images':
        fit_images_dataset(H, explicit_flags(parser, s))
    check_ranges(H)
    return H


# Keys that are never part of a run: where it lives, how its processes are launched and shown,
# what they restore.  Resuming with other values is no change of the run (checkpoints.changed_hparams),
# and the tools that read a run never take them from its saved configuration (apply_run_config).
NOT_RUN_KEYS = ('desc', 'save_dir', 'run_dir', 'resume', 'restart', 'allow_changes', 'test_eval', 'restore_path',
                'restore_ema_path', 'restore_log_path', 'restore_optimizer_path', 'port', 'dist_timeout',
                'num_workers', 'threads', 'no_progress', 'no_tensorboard')
# How a process trains (device, precision, speed options) and the presets its own --hps named.  Part
# of a run: a resume with other values logs them as changes (the numbers move).  But the tools that
# read a run keep their own (evaluation and sampling run the EMA model eagerly, in IEEE fp32).
TRAINING_ONLY_KEYS = ('device', 'precision', 'compile', 'compile_scope', 'compile_mode', 'cuda_graphs',
                      'channels_last', 'grad_checkpoint', 'rank_invariant_noise', 'hparam_sets')


def apply_run_config(H, saved, explicit):
    """Make a run's saved configuration (the 'H' of its -state.th) the default of H: every
    key of ``saved`` that H has, that the command line did not give (``explicit``) and that
    is neither in NOT_RUN_KEYS nor in TRAINING_ONLY_KEYS, takes the run's value.  Returns
    {key: value} changed."""
    changed = {k: v for k, v in (saved or {}).items()
               if k in H and k not in explicit and k not in NOT_RUN_KEYS + TRAINING_ONLY_KEYS and H[k] != v}
    H.update(changed)
    check_ranges(H)
    return changed


def get_hparams(s=None, parser=None):
    """Build the resolved Hyperparams from a list of flags (sys.argv when None)."""
    parser = parser or argparse.ArgumentParser(description='VDVAE')
    add_vae_arguments(parser)
    return parse_args_and_update_hparams(Hyperparams(), parser, s)


def preset(name, **overrides):
    """Hyperparams of one preset without touching the command line, e.g. ``VAE(preset('cifar10'))``."""
    return get_hparams(['--hps', name] + [f'--{k}={v}' for k, v in overrides.items()])
