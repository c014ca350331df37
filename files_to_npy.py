"""Dataset preparation: turning downloads or a folder of images into the files data.py
reads (the release kept this in files_to_npy.py).  The setup_*.sh scripts call it:

    python files_to_npy.py check --hps cifar10 [--data_root DIR]     # split sizes and files
    python files_to_npy.py convert-imagenet --split train --size 32 OUT.npy ZIP [ZIP ...]
    python files_to_npy.py pngs-to-npy --size 256 [--expect 70000] FOLDER OUT.npy
    python files_to_npy.py check-npy --dataset ffhq_256 FILE.npy
    python files_to_npy.py link-ffhq1024 [--partial] IMAGES_FOLDER DATA_ROOT

Every output appears whole or not at all (a temporary name, renamed on success).  Like
data.py it needs numpy and Pillow only, not torch.
"""
import argparse
import io
import os
import re
import shutil
import sys
import zipfile

import numpy as np

from data import (FFHQ1024_TRAIN, PngFolderSource, chw_rows_to_nhwc, load_data, load_pickled_batch, open_npy,
                  read_image)
from hps import IMAGE_SHAPE, UserError


# ----------------------------------------------------------------------------- the release's .npy layout

class NpyWriter:
    """Streams uint8 rows of one shape into a .npy file whose row count is known only
    at the end.  Writes to PATH.tmp-PID and renames it to PATH on success, so a failed
    or interrupted run never leaves a half-written PATH behind."""
    HEADER_BYTES = 128  # a 4-D uint8 header, padded to 64-byte alignment, always fits

    def __init__(self, path, row_shape, chunk=4096):
        self.path, self.row_shape, self.chunk, self.n = path, tuple(row_shape), chunk, 0
        self.tmp = f"{path}.tmp-{os.getpid()}"
        self.f = open(self.tmp, 'wb')
        self.f.seek(self.HEADER_BYTES)

    def write(self, rows):
        assert rows.dtype == np.uint8 and rows.shape[1:] == self.row_shape, (rows.dtype, rows.shape)
        for i in range(0, len(rows), self.chunk):
            self.f.write(np.ascontiguousarray(rows[i:i + self.chunk]).data)
        self.n += len(rows)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {'descr': '|u1', 'fortran_order': False, 'shape': (self.n,) + self.row_shape})
            assert len(header.getvalue()) == self.HEADER_BYTES, len(header.getvalue())
            self.f.seek(0)
            self.f.write(header.getvalue())
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        else:
            self.f.close()
            os.remove(self.tmp)


def convert_imagenet(zip_paths, out_path, split, size):
    """Downsampled ImageNet zips (Imagenet{32,64}_train*.zip / _val.zip from the
    image-net.org download page) -> the release's .npy layout (N, size, size, 3) uint8.

    The zips hold pickled batches `train_data_batch_1..10` (imagenet64: 1-5 in
    _part1.zip, 6-10 in _part2.zip) or `val_data`, each a dict whose 'data' is
    (N, 3*size*size) flattened CHW uint8.  Batches are written in numeric order
    (1, 2, ..., 10), rows in their stored order.  Returns the number of images.
    """
    pattern = re.compile(r'train_data_batch_(\d+)' if split == 'train' else r'val_data')
    members = []  # (batch number, zip, member name)
    for zip_path in zip_paths:
        if not os.path.isfile(zip_path):
            raise UserError(f"{zip_path} not found")
        try:
            with zipfile.ZipFile(zip_path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"{zip_path}: not a readable zip file ({e})") from None
        for name in names:
            match = pattern.fullmatch(name.rsplit('/', 1)[-1])
            if match:
                members.append((int(match.group(1)) if split == 'train' else 0, zip_path, name))
    members.sort()
    numbers = [m[0] for m in members]
    wanted = 'train_data_batch_N' if split == 'train' else 'val_data'
    if not members:
        raise UserError(f"no {wanted} in {', '.join(zip_paths)}; expected the Imagenet{size}_"
                        f"{'train' if split == 'train' else 'val'} zip(s) of Downsampled ImageNet")
    if numbers != (list(range(1, 11)) if split == 'train' else [0]):
        raise UserError(f"{', '.join(zip_paths)}: expected {'train_data_batch_1..10' if split == 'train' else wanted} "
                        f"once each, found {[m[2].rsplit('/', 1)[-1] for m in members]} "
                        f"(imagenet64: pass both _part1.zip and _part2.zip)")
    with NpyWriter(out_path, (size, size, 3)) as writer:
        for number, zip_path, name in members:
            with zipfile.ZipFile(zip_path) as zf, zf.open(name) as f:
                data = load_pickled_batch(f, f"{zip_path}:{name}", 3 * size * size)
            writer.write(chw_rows_to_nhwc(data, size))
            print(f"{zip_path}:{name}: {len(data)} images", flush=True)
    print(f"wrote {out_path}: {writer.n} images of {size}x{size}x3", flush=True)
    return writer.n


def pngs_to_npy(folder, out_path, size, expect=None):
    """All *.png under `folder` (recursively), sorted by relative path, -> one .npy of
    (N, size, size, 3) uint8.  Every file must decode as a size x size RGB PNG."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder} not found (a folder of .png images)")
    files = sorted(os.path.relpath(os.path.join(root, x), folder)
                   for root, _, names in os.walk(folder, followlinks=True) for x in names if x.lower().endswith('.png'))
    if not files or (expect is not None and len(files) != expect):
        raise UserError(f"{folder}: expected {expect or 'some'} .png images, found {len(files)}")
    with NpyWriter(out_path, (size, size, 3)) as writer:
        for i, name in enumerate(files):
            writer.write(read_image(os.path.join(folder, name), (size, size, 3), png=True)[None])
            if (i + 1) % 10000 == 0:
                print(f"{i + 1} / {len(files)} images", flush=True)
    print(f"wrote {out_path}: {writer.n} images of {size}x{size}x3 from {folder} (sorted by file name)", flush=True)
    return writer.n


def link_ffhq1024(images_folder, data_root, partial=False):
    """Link FFHQ's 1024x1024 images (NNNNN.png, anywhere under images_folder, e.g. in
    its 00000/, 01000/, ... subfolders) into the release's layout:
    data_root/ffhq1024/train/0/00000..64999.png and valid/0/65000..69999.png.
    Builds the tree under a temporary name and renames it into place."""
    out = os.path.join(data_root, 'ffhq1024')
    if os.path.isdir(out):
        counts = [len(os.listdir(os.path.join(out, s, '0'))) for s in ('train', 'valid')]
        print(f"{out} already exists ({counts[0]} train, {counts[1]} valid images); nothing to do")
        return
    if not os.path.isdir(images_folder):
        raise UserError(f"{images_folder} not found; pass the folder of FFHQ's images1024x1024")
    found, ignored = {}, 0
    for root, dirs, names in os.walk(images_folder):
        dirs[:] = sorted(d for d in dirs if d != 'ffhq1024')
        for name in sorted(names):
            match = re.fullmatch(r'(\d{5})\.png', name)
            if not match:
                ignored += 1
                continue
            number = int(match.group(1))
            if number in found:
                raise UserError(f"{name} found twice: {found[number]} and {os.path.join(root, name)}")
            found[number] = os.path.abspath(os.path.join(root, name))
    missing = sorted(set(range(70000)) - set(found))
    extra = sorted(set(found) - set(range(70000)))
    if extra or (missing and not partial) or not found:
        raise UserError(f"{images_folder}: expected FFHQ's 70000 images 00000.png..69999.png, found {len(found)}"
                        f" ({len(missing)} missing{f', first {missing[0]:05d}.png' if missing else ''}"
                        f"{f'; unexpected {extra[0]:05d}.png' if extra else ''})")
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        for split in ('train', 'valid'):
            os.makedirs(os.path.join(tmp, split, '0'))
        for number, path in sorted(found.items()):
            split = 'train' if number < FFHQ1024_TRAIN else 'valid'
            os.symlink(path, os.path.join(tmp, split, '0', f'{number:05d}.png'))
        PngFolderSource(os.path.join(tmp, 'train' if min(found) < FFHQ1024_TRAIN else 'valid', '0'),
                        (1024, 1024, 3), '')
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_train = sum(k < FFHQ1024_TRAIN for k in found)
    print(f"linked {n_train} train and {len(found) - n_train} valid images into {out}"
          f"{f' (ignored {ignored} files not named NNNNN.png)' if ignored else ''}")


# ----------------------------------------------------------------------------- command line

def _check(args):
    from hps import get_hparams
    H = get_hparams(['--hps', args.hps] + (['--data_root', args.data_root] if args.data_root else []))
    splits = load_data(H)
    for name, source in splits._asdict().items():
        print(f"{H.dataset} {name:5s} {len(source):8d} images {source.shape[1:]} from {source.path}")


def _check_npy(args):
    source = open_npy(args.file, args.dataset)
    print(f"{args.file}: {len(source)} {args.dataset} images of {source.shape[1:]} uint8, complete")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('check', help='load a preset\'s data and print its split sizes')
    p.add_argument('--hps', default='fashion_mnist', help='preset name')
    p.add_argument('--data_root', default=None, help='data folder (default: the preset\'s)')
    p.set_defaults(run=_check)
    p = sub.add_parser('check-npy', help='check that a .npy file holds complete images of a dataset')
    p.add_argument('--dataset', required=True, choices=sorted(IMAGE_SHAPE))
    p.add_argument('file')
    p.set_defaults(run=_check_npy)
    p = sub.add_parser('convert-imagenet', help='Downsampled ImageNet zips -> the release\'s .npy layout')
    p.add_argument('--split', required=True, choices=['train', 'val'])
    p.add_argument('--size', required=True, type=int, choices=[32, 64])
    p.add_argument('out')
    p.add_argument('zips', nargs='+')
    p.set_defaults(run=lambda a: convert_imagenet(a.zips, a.out, a.split, a.size))
    p = sub.add_parser('pngs-to-npy', help='a folder of PNGs (sorted by name) -> one .npy')
    p.add_argument('--size', required=True, type=int)
    p.add_argument('--expect', type=int, default=None, help='required number of images')
    p.add_argument('folder')
    p.add_argument('out')
    p.set_defaults(run=lambda a: pngs_to_npy(a.folder, a.out, a.size, a.expect))
    p = sub.add_parser('link-ffhq1024', help='link FFHQ 1024 images into DATA_ROOT/ffhq1024/{train,valid}/0')
    p.add_argument('--partial', action='store_true', help='allow a subset of the 70000 images')
    p.add_argument('images_folder')
    p.add_argument('data_root')
    p.set_defaults(run=lambda a: link_ffhq1024(a.images_folder, a.data_root, a.partial))
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
