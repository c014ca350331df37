"""Your own images -> a dataset the loaders read (dataset ``images``); setup_images.sh runs this.

    python images_to_npy.py prepare SRC DATA_ROOT --size 64 [--channels 3|1] [--bits 8|5]
                            [--storage auto|npy|png] [--upscale] [--overwrite] [--workers N]
    python images_to_npy.py export-fashion-mnist DATA_ROOT OUT   # Fashion-MNIST as PNGs, in train/ valid/ test/

``prepare`` reads every file under SRC (recursively) that Pillow decodes (PNG, JPEG, WebP, BMP,
TIFF, GIF's first frame, ...) and writes DATA_ROOT/images/: train, valid and test as uint8
(N, S, S, C) .npy files (or folders of PNGs for large images) and, last, manifest.json.  The rule,
one for every image: EXIF orientation applied (as an image viewer shows the photo); palette, 16-bit,
CMYK and other modes converted to RGB or L (grayscale, --channels 1), transparency composited on
white; the centred square whose side is the short side, resized to S x S with Pillow's Lanczos
filter.  Images whose short side is below S are skipped (--upscale resizes them up instead).
Files that are not images, cannot be decoded or repeat another file's bytes are skipped.  Every
skip is counted, listed in the manifest and named in the summary line.

The split is by content: the sha256 of a file's bytes, read as a number u in [0, 1), puts it in
train (u < 0.9), valid (u < 0.95) or test; adding images moves no old one.  A split the hash leaves
empty (a folder of a few images) takes the image of largest u from the biggest split.  A SRC with
train/, valid/ and test/ folders keeps them.  The train split's pixel mean and std (exact, from
integer sums) are the inputs' normalisation.  Decoding runs on every core; memory does not grow with
the number of images (rows stream to disk).  Everything is written to DATA_ROOT/images.tmp-PID and
renamed into place when complete, so an interrupted run leaves no dataset that looks whole; a run
over an unchanged SRC with the same options does nothing, and one with other options refuses unless
--overwrite.  docs/data.md, "Your own images", has the manifest's fields.
"""
import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data import IMAGES_FOLDER, MANIFEST, MANIFEST_FORMAT, SPLIT_NAMES, read_manifest, split_indices, _read_idx_images
from files_to_npy import NpyWriter
from hps import UserError
from utils import _pid_alive, atomic_write, check_writable, cpu_cores, progress_bar

# Content split: u = first 8 bytes of the sha256 / 2**64; train below 0.9, valid below 0.95, test above.
SPLIT_BOUNDS = (('train', 0.90), ('valid', 0.95), ('test', 1.0))
PNG_FROM_SIZE = 512  # --storage auto: PNG folders from this size up, .npy below (docs/data.md, storage rule)
FILTER = Image.Resampling.LANCZOS
SIXTEEN_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')  # grayscale modes Pillow gives 16-bit PNG and TIFF files


# ----------------------------------------------------------------------------- one image

def convert(im, channels):
    """A decoded image as Pillow mode L (channels 1) or RGB (3): 16-bit grayscale scaled to 8 bits
    (x / 257, rounded), transparency (alpha, or a palette's or a single transparent colour)
    composited on white, every other mode through Pillow's own conversion (CMYK, YCbCr, LAB, 1, F)."""
    if im.mode in SIXTEEN_BIT:
        im = Image.fromarray(np.clip(np.rint(np.asarray(im, dtype=np.float64) / 257.), 0, 255).astype(np.uint8), 'L')
    if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info:
        im = Image.alpha_composite(Image.new('RGBA', im.size, (255, 255, 255, 255)), im.convert('RGBA'))
    target = 'L' if channels == 1 else 'RGB'
    return im if im.mode == target else im.convert(target)


def resize_square(im, size):
    """The centred square whose side is the short side (fractional offsets kept), resized to
    size x size with Lanczos: resizing the short side to ``size`` and cropping the centre, without
    rounding the long side first.  An image already size x size is returned as it is."""
    w, h = im.size
    s = min(w, h)
    return im.resize((size, size), FILTER, box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))


def load_one(task):
    """Pool worker: (path, size, channels, upscale, png) -> dict(sha256, and either the image as
    uint8 (size, size, channels) bytes (PNG-encoded when ``png``) with its pixel sum and sum of
    squares, or why it is skipped)."""
    path, size, channels, upscale, png = task
    with open(path, 'rb') as f:
        raw = f.read()
    out = dict(sha256=hashlib.sha256(raw).hexdigest())
    try:
        with Image.open(io.BytesIO(raw)) as im:  # GIF and other multi-frame files: the first frame
            out.update(format=im.format, mode=im.mode, source_size=list(im.size))
            im = convert(ImageOps.exif_transpose(im), channels)  # exif_transpose loads: decode errors land here
    except UnidentifiedImageError:
        return dict(out, skip='not an image')
    except Exception as e:  # truncated, corrupt, unsupported: Pillow raises OSError, ValueError, SyntaxError, ...
        return dict(out, skip=f'unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})')
    if min(im.size) < size and not upscale:
        return dict(out, skip=f'smaller than --size {size} (short side {min(im.size)})')
    out['upscaled'] = min(im.size) < size
    pixels = np.asarray(resize_square(im, size), dtype=np.uint8).reshape(size, size, channels)
    wide = pixels.astype(np.int64)
    out.update(sum=int(wide.sum()), sum_sq=int((wide * wide).sum()))
    if png:
        buf = io.BytesIO()
        Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(buf, format='PNG')
        out['png'] = buf.getvalue()
    else:
        out['pixels'] = pixels.tobytes()
    return out


def content_split(sha256):
    """train, valid or test from the file's sha256 (SPLIT_BOUNDS); and u."""
    u = int(sha256[:16], 16) / 2 ** 64
    return next(name for name, bound in SPLIT_BOUNDS if u < bound), u


# ----------------------------------------------------------------------------- the source folder

def list_source(src):
    """[(relative path, bytes, mtime_ns)] of every file under src, sorted by path ('/'-separated)."""
    if not os.path.isdir(src):
        raise UserError(f"{src}: no such folder; pass the folder that holds your images as SRC")
    files = []
    for root, dirs, names in os.walk(src):
        dirs.sort()
        for name in names:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                st = os.stat(path)
                files.append((os.path.relpath(path, src).replace(os.sep, '/'), st.st_size, st.st_mtime_ns))
    return sorted(files)


def presplit(src):
    """Whether src has train/, valid/ and test/ folders (kept as the split); a UserError when only
    some of them are there."""
    have = [s for s in SPLIT_NAMES if os.path.isdir(os.path.join(src, s))]
    if have and len(have) < 3:
        missing = [s for s in SPLIT_NAMES if s not in have]
        raise UserError(f"{src} has {' and '.join(h + '/' for h in have)} but no "
                        f"{' or '.join(m + '/' for m in missing)}: "
                        "give all three folders (they are kept as the split), or none (the split is made from each "
                        "file's content)")
    return bool(have)


# ----------------------------------------------------------------------------- preparation

def options_of(args):
    storage = args.storage if args.storage != 'auto' else 'png' if args.size >= PNG_FROM_SIZE else 'npy'
    return dict(source=os.path.abspath(args.src), size=args.size, channels=args.channels, bits=args.bits,
                storage=storage, upscale=args.upscale)


def _flags(o):
    return (f"--size {o['size']} --channels {o['channels']} --bits {o['bits']} --storage {o['storage']}"
            + (' --upscale' if o['upscale'] else '') + f" from {o['source']}")


def existing(out, options, listing, overwrite):
    """True when out already holds this preparation of this source (nothing to do); a UserError
    when it holds another one (other options or source) and --overwrite was not given."""
    if not os.path.exists(out):
        return False
    if not os.path.isfile(os.path.join(out, MANIFEST)):
        if overwrite:
            return False
        raise UserError(f"{out} exists but holds no {MANIFEST}, so it is no prepared dataset: move it away, pass "
                        "another DATA_ROOT, or --overwrite to replace it")
    try:
        m = read_manifest(os.path.dirname(out))
    except UserError:
        if overwrite:
            return False
        raise
    if m['options'] != options:
        if overwrite:
            return False
        raise UserError(f"{out} was prepared with {_flags(m['options'])}, and this run asks for {_flags(options)}: "
                        "pass another DATA_ROOT, or --overwrite to replace it (a run on the old data then refuses to "
                        "resume unless --allow_changes)")
    seen = sorted([(f['path'], f['bytes'], f['mtime_ns']) for f in m['files'] + m['skipped']])
    return seen == [tuple(x) for x in listing]


def remove_stale(data_root):
    """Remove images.tmp-PID / images.old-PID folders of preparations that were killed."""
    for name in os.listdir(data_root):
        m = re.fullmatch(re.escape(IMAGES_FOLDER) + r'\.(tmp|old)-(\d+)', name)
        if m and not _pid_alive(int(m.group(2))):
            shutil.rmtree(os.path.join(data_root, name), ignore_errors=True)


def assign_splits(kept, by_folder):
    """Set each kept record's 'split': its folder's (by_folder) or its content's (content_split);
    a split the hash left empty takes the image of largest u from the biggest split."""
    for r in kept:
        r['split'], r['u'] = content_split(r['sha256'])
        r['split_rule'] = 'hash'
        if by_folder:
            r['split'], r['split_rule'] = r['path'].split('/', 1)[0], 'folder'
    if by_folder:
        return
    for name in SPLIT_NAMES:
        counts = {s: sum(r['split'] == s for r in kept) for s in SPLIT_NAMES}
        if counts[name] == 0:
            donor = max(SPLIT_NAMES, key=lambda s: counts[s])
            r = max((r for r in kept if r['split'] == donor), key=lambda r: r['u'])
            r['split'], r['split_rule'] = name, 'fallback (the hash left this split empty)'


def prepare(args):
    """The command: see the module's docstring.  Returns the manifest (None when nothing was done)."""
    src, data_root = args.src, args.data_root
    if args.size < 1:
        raise UserError(f"--size {args.size}: must be >= 1")
    listing = list_source(src)
    by_folder = presplit(src)
    options = options_of(args)
    out = os.path.join(data_root, IMAGES_FOLDER)
    check_writable(data_root, 'pass a DATA_ROOT you can write to')
    if existing(out, options, listing, args.overwrite):
        m = read_manifest(data_root)
        print(f"{out} already holds these {m['counts']['kept']} images of {src} with these options; nothing to do")
        return None
    created = not os.path.exists(data_root)
    os.makedirs(data_root, exist_ok=True)
    remove_stale(data_root)
    tmp = f"{out}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        manifest = _build(args, src, listing, by_folder, options, tmp)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not os.listdir(data_root):
            os.rmdir(data_root)  # a refused or interrupted first preparation leaves nothing behind
        raise
    print(summary(manifest, out), flush=True)
    return manifest


def _build(args, src, listing, by_folder, options, tmp):
    size, channels, png = args.size, args.channels, options['storage'] == 'png'
    kept, skipped, first_of = [], [], {}
    pool_dir = os.path.join(tmp, 'pool')
    os.makedirs(pool_dir)
    tasks = [(os.path.join(src, p), size, channels, args.upscale, png) for p, _, _ in listing]
    workers = args.workers or cpu_cores()
    ctx = multiprocessing.get_context('fork')  # workers need only Pillow and numpy, inherited
    rows = contextlib.nullcontext() if png else NpyWriter(os.path.join(tmp, 'pool.npy'), (size, size, channels))
    with ctx.Pool(workers) as pool, rows as writer:
        results = pool.imap(load_one, tasks, chunksize=4)  # in order; rows stream to disk as they come
        for (path, nbytes, mtime), r in zip(listing, progress_bar(results, total=len(tasks), desc='images',
                                                                   unit='img', off=args.no_progress)):
            entry = dict(path=path, bytes=nbytes, mtime_ns=mtime, sha256=r['sha256'])
            top = path.split('/', 1)[0]
            if 'skip' not in r and by_folder and (top not in SPLIT_NAMES or '/' not in path):
                r['skip'] = 'outside the train/, valid/ and test/ folders'
            if 'skip' not in r and r['sha256'] in first_of:
                r['skip'] = f"duplicate of {first_of[r['sha256']]} (same bytes; kept once)"
            if 'skip' in r:
                skipped.append(dict(entry, reason=r['skip']))
                continue
            first_of[r['sha256']] = path
            entry.update(format=r['format'], mode=r['mode'], source_size=r['source_size'], upscaled=r['upscaled'],
                         pool=len(kept), sums=(r['sum'], r['sum_sq']))
            if png:
                with atomic_write(os.path.join(pool_dir, f'{len(kept):08d}.png')) as f:
                    f.write(r['png'])
            else:
                writer.write(np.frombuffer(r['pixels'], np.uint8).reshape(1, size, size, channels))
            kept.append(entry)
    if len(kept) < 3 or (by_folder and {r['path'].split('/', 1)[0] for r in kept} != set(SPLIT_NAMES)):
        raise UserError(no_usable(src, kept, skipped, by_folder))
    assign_splits(kept, by_folder)
    return _write_splits(tmp, kept, skipped, options, png)


def no_usable(src, kept, skipped, by_folder):
    why = f"; skipped {describe_skips(skipped)}" if skipped else ''
    if by_folder and len(kept) >= 3:
        empty = [s for s in SPLIT_NAMES if not any(r['path'].startswith(s + '/') for r in kept)]
        return f"{src}/{empty[0]}/ holds no usable image{why}"
    return (f"{src} holds {len(kept)} usable image{'s' * (len(kept) != 1)}, and a dataset needs at least 3 (one "
            f"per split){why}")


def _write_splits(tmp, kept, skipped, options, png):
    size, channels = options['size'], options['channels']
    splits, total = {}, [0, 0]
    pool = None if png else np.load(os.path.join(tmp, 'pool.npy'), mmap_mode='r')
    for name in SPLIT_NAMES:
        rows = sorted((r for r in kept if r['split'] == name), key=lambda r: r['path'])
        for i, r in enumerate(rows):
            r['row'] = i
        if png:
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            for r in rows:
                os.rename(os.path.join(tmp, 'pool', f"{r['pool']:08d}.png"),
                          os.path.join(folder, f"{r['row']:07d}.png"))
            splits[name] = dict(n=len(rows), file=name)
        else:
            with NpyWriter(os.path.join(tmp, f'{name}.npy'), (size, size, channels)) as writer:
                for i in range(0, len(rows), 256):
                    writer.write(np.asarray(pool[[r['pool'] for r in rows[i:i + 256]]]))
            splits[name] = dict(n=len(rows), file=f'{name}.npy')
        if name == 'train':
            total = [sum(r['sums'][0] for r in rows), sum(r['sums'][1] for r in rows)]
    del pool
    shutil.rmtree(os.path.join(tmp, 'pool'))
    if not png:
        os.remove(os.path.join(tmp, 'pool.npy'))
    n_values = splits['train']['n'] * size * size * channels
    mean = total[0] / n_values
    std = max(total[1] / n_values - mean * mean, 0.) ** 0.5
    files = [{k: v for k, v in r.items() if k not in ('pool', 'sums', 'u')} for r in kept]
    manifest = dict(
        format=MANIFEST_FORMAT, created=time.strftime('%Y-%m-%d %H:%M:%S %Z'), options=options,
        image_shape=[size, size, channels], bits=options['bits'], storage=options['storage'], splits=splits,
        split_rule='folders' if any(r['split_rule'] == 'folder' for r in kept) else
        f"sha256 of the file's bytes -> u in [0, 1): train u < {SPLIT_BOUNDS[0][1]}, valid u < {SPLIT_BOUNDS[1][1]}, "
        "test otherwise",
        # std 0 (every pixel alike) would divide by zero: such inputs are left unscaled
        normalization=dict(mean=mean, std=std or 1.0, pixels=n_values, split='train'),
        counts=dict(files=len(kept) + len(skipped), kept=len(kept), skipped=len(skipped),
                    upscaled=sum(r['upscaled'] for r in kept)),
        files=files, skipped=skipped)
    with atomic_write(os.path.join(tmp, MANIFEST)) as f:  # last: a folder without it is no dataset
        f.write(json.dumps(manifest, indent=1).encode())
    return manifest


def _swap(tmp, out):
    """Rename the finished tmp folder to out; an older dataset there is renamed aside first and then
    removed (a kill between the two renames leaves no out: run the command again)."""
    old = None
    if os.path.exists(out):
        old = f"{out[:-len(IMAGES_FOLDER)]}{IMAGES_FOLDER}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old)


def describe_skips(skipped, names=3):
    """'not an image: 2 (notes.txt, x.doc), unreadable: 1 (bad.jpg)': each reason's count and first names."""
    groups = {}
    for s in skipped:
        kind = s['reason'].split(' (')[0].split(' of ')[0]
        groups.setdefault(kind, []).append(s['path'])
    more = lambda p: f', and {len(p) - names} more' if len(p) > names else ''  # noqa: E731
    return ', '.join(f"{kind}: {len(p)} ({', '.join(p[:names])}{more(p)})" for kind, p in groups.items())


def summary(m, out):
    """The one line a preparation ends with."""
    s, c, (size, _, ch) = m['splits'], m['counts'], m['image_shape']
    line = (f"prepared {out}: {c['kept']} images of {size}x{size}x{ch} ({m['bits']}-bit targets, {m['storage']}): "
            f"train {s['train']['n']}, valid {s['valid']['n']}, test {s['test']['n']}")
    if c['upscaled']:
        line += f"; {c['upscaled']} smaller than {size} upscaled (--upscale)"
    line += f"; skipped {describe_skips(m['skipped'])}" if m['skipped'] else '; nothing skipped'
    if not m['options']['upscale'] and any(x['reason'].startswith('smaller') for x in m['skipped']):
        line += ' (--upscale resizes the smaller images up instead)'
    return line + f"; every file is listed in {os.path.join(out, MANIFEST)}"


# ----------------------------------------------------------------------------- Fashion-MNIST as PNGs

def export_fashion_mnist(data_root, out):
    """The Fashion-MNIST images under data_root (setup_fashion_mnist.sh) as 28x28 grayscale PNGs in
    out/train/, out/valid/ (the fashion_mnist presets' split) and out/test/ (t10k), named by their
    position in the idx file.  A folder of pictures for trying setup_images.sh; prepared unchanged
    (--size 28 --channels 1), its splits and pixels are the fashion_mnist preset's."""
    folder = os.path.join(data_root, 'fashion_mnist')
    hint = f"run `./setup_fashion_mnist.sh {data_root}` first"
    train = _read_idx_images(os.path.join(folder, 'train-images-idx3-ubyte.gz'), hint)
    test = _read_idx_images(os.path.join(folder, 't10k-images-idx3-ubyte.gz'), hint)
    tr, va = split_indices('fashion_mnist', len(train))
    check_writable(out, 'pass an OUT folder you can write to')
    n = 0
    for name, images, idx in (('train', train, tr), ('valid', train, va), ('test', test, np.arange(len(test)))):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for i in progress_bar(idx, desc=name, unit='img'):
            path = os.path.join(out, name, f'{i:05d}.png')
            if not os.path.exists(path):  # a second run completes an interrupted one
                buf = io.BytesIO()
                Image.fromarray(images[i, :, :, 0]).save(buf, format='PNG')
                with atomic_write(path) as f:
                    f.write(buf.getvalue())
            n += 1
    print(f"wrote {n} Fashion-MNIST PNGs to {out}/train, valid and test; prepare them with "
          f"./setup_images.sh {out} DATA_ROOT --size 28 --channels 1")


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('prepare', help='a folder of images -> DATA_ROOT/images (train/valid/test, manifest.json)')
    p.add_argument('src', help='folder of images (read recursively)')
    p.add_argument('data_root', help='--data_root of the runs; the dataset goes to DATA_ROOT/images')
    p.add_argument('--size', type=int, required=True, help='image height and width S')
    p.add_argument('--channels', type=int, choices=[1, 3], default=3, help='3: RGB, 1: grayscale')
    p.add_argument('--bits', type=int, choices=[8, 5], default=8,
                   help='targets of the likelihood: 8 bits, or 5 as the release\'s ffhq256 (the input keeps 8)')
    p.add_argument('--storage', choices=['auto', 'npy', 'png'], default='auto',
                   help=f'auto: PNG folders from --size {PNG_FROM_SIZE} up, one .npy per split below')
    p.add_argument('--upscale', action='store_true',
                   help='resize images smaller than --size up instead of skipping them')
    p.add_argument('--overwrite', action='store_true', help='replace a dataset prepared with other options or source')
    p.add_argument('--workers', type=int, default=0, help='decoding processes (0: one per core)')
    p.add_argument('--no_progress', action='store_true', help='no progress bar')
    p.set_defaults(run=prepare)
    p = sub.add_parser('export-fashion-mnist', help='Fashion-MNIST (setup_fashion_mnist.sh) as PNG folders')
    p.add_argument('data_root')
    p.add_argument('out')
    p.set_defaults(run=lambda a: export_fashion_mnist(a.data_root, a.out))
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a write the file system refuses (full, read-only) mid-way: the tmp folder is gone
        print(f"error: {e.filename or 'a file'}: {e.strerror}; nothing was written to DATA_ROOT", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
