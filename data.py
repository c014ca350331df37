"""Data of the VDVAE presets: loaders, split rules, preprocessing and batching.

Each dataset reads the files its ``setup_*.sh`` script puts under ``H.data_root``
(README, "Data"):

    cifar10        cifar-10-batches-py/data_batch_1..5, test_batch         ./setup_cifar10.sh
    imagenet32     imagenet32-train.npy, imagenet32-valid.npy              ./setup_imagenet.sh imagenet32
    imagenet64     imagenet64-train.npy, imagenet64-valid.npy              ./setup_imagenet.sh imagenet64
    ffhq_256       ffhq-256.npy                                            ./setup_ffhq256.sh
    ffhq_1024      ffhq1024/train/0/*.png, ffhq1024/valid/0/*.png          ./setup_ffhq1024.sh PATH
    fashion_mnist  fashion_mnist/train-images-idx3-ubyte.gz, t10k-...     ./setup_fashion_mnist.sh
    images         images/manifest.json, train/valid/test .npy or folders   ./setup_images.sh SRC DATA_ROOT

Splits follow the release exactly (``split_indices``).  Unlike the release, which
copies the permuted training set into RAM, ``.npy`` files stay memory-mapped and
every batch is gathered with one indexing operation, so a process holds a few
batches, never the data set.  Nothing here seeds a global RNG or moves data to a
device; torch is imported where it is used, so the setup scripts' conversions
(files_to_npy.py, which turns downloads into these files) run without it.  Typical use
(train.py):

    splits = load_data(H)                                   # Splits(train, valid, test)
    for x in train_loader(splits.train, H.n_batch, seed=H.seed, epoch=epoch, rank=r, world_size=w,
                          num_workers=2, pin_memory=True):
        x_in, x_target = preprocess(H, x.to(device, non_blocking=True))
"""
import atexit
import collections
import functools
import gzip
import mmap
import os
import pickle
import struct
import weakref
import zlib

import numpy as np

from hps import HPARAMS_REGISTRY, IMAGE_SHAPE, NORMALIZATION, UserError, low_bit_targets

# --- Split rules (the release's data.py). ---
# Datasets whose validation set is the last `holdout` entries of
# np.random.RandomState(seed).permutation(n) over the training file's rows (the
# release wrote np.random.seed(seed); np.random.permutation(n): the same stream).
# fashion_mnist is ours: last 5000 of a RandomState(0) permutation of its 60000
# training images; its test set is the 10000 t10k images.
PERMUTATION_SPLITS = {'imagenet32': (42, 5000), 'imagenet64': (42, 5000), 'ffhq_256': (5, 7000),
                      'fashion_mnist': (0, 5000)}
# cifar10: sklearn.model_selection.train_test_split(trX, test_size=5000, random_state=11172018).
CIFAR10_HOLDOUT, CIFAR10_SPLIT_SEED = 5000, 11172018
# Targets: (x + SHIFT_LOSS) * SCALE_LOSS, in [-1, 1]; ffhq_1024 works on [0, 1] floats.
LOSS_NORMALIZATION = {'ffhq_1024': (-0.5, 2.0)}
DEFAULT_LOSS_NORMALIZATION = (-127.5, 1. / 127.5)
FFHQ1024_TRAIN = 65000  # images 00000..64999.png train, 65000..69999.png valid (release)

Splits = collections.namedtuple('Splits', 'train valid test')
Splits.__doc__ = """ImageSources of one dataset; `test` is `valid` where the release evaluates on valid."""


def dataset_name(preset_or_dataset):
    """'cifar10', 'ffhq256', 'fashion_mnist_quick', ... -> the dataset name ('ffhq_256', ...)."""
    if preset_or_dataset in IMAGE_SHAPE:
        return preset_or_dataset
    if preset_or_dataset in HPARAMS_REGISTRY and 'dataset' in HPARAMS_REGISTRY[preset_or_dataset]:
        return HPARAMS_REGISTRY[preset_or_dataset]['dataset']
    raise UserError(f"unknown dataset {preset_or_dataset!r}; known: {', '.join(IMAGE_SHAPE)}")


def split_indices(preset_or_dataset, n):
    """The release's train/valid split of a training file with n rows.

    Returns (train_idx, valid_idx): int64 index arrays into the file's rows, in the
    order the release's split returns them (that order is the order of the valid set,
    whose first images the sample grid shows).  ffhq_1024 has no split inside a
    folder (its valid images are a folder of their own): all rows train, none valid.
    """
    dataset = dataset_name(preset_or_dataset)
    if dataset == 'ffhq_1024':
        return np.arange(n, dtype=np.int64), np.arange(0, dtype=np.int64)
    holdout = CIFAR10_HOLDOUT if dataset == 'cifar10' else PERMUTATION_SPLITS[dataset][1]
    if n <= holdout:
        raise UserError(f"{dataset}: the training file has {n} images, but its split holds out {holdout} "
                        f"for validation, so it needs more than {holdout}")
    if dataset == 'cifar10':
        from sklearn.model_selection import train_test_split
        train, valid = train_test_split(np.arange(n, dtype=np.int64), test_size=CIFAR10_HOLDOUT,
                                        random_state=CIFAR10_SPLIT_SEED)
        return train, valid
    perm = np.random.RandomState(PERMUTATION_SPLITS[dataset][0]).permutation(n).astype(np.int64)
    return perm[:-holdout], perm[-holdout:]


# --- Image sources. ---

class ImageSource:
    """N images of one shape, read a batch at a time.

    len(src) = N; src.shape = (N, H, W, C); src.path names the file or folder (for
    messages).  src[idx] with idx a 1-D integer array of positions in [0, N) returns
    uint8 (len(idx), H, W, C) in the order of idx.  A source may be a view of rows
    `rows` of a file (the release's train/valid split of one file).
    """

    origin = None  # what identifies the data beyond its pixels (dataset images: its manifest's sha256)

    def __init__(self, path, image_shape, n_rows, rows=None):
        self.path, self.image_shape, self.n_rows, self.rows = path, tuple(image_shape), n_rows, rows

    def __len__(self):
        return self.n_rows if self.rows is None else len(self.rows)

    @property
    def shape(self):
        return (len(self),) + self.image_shape

    def view(self, rows):
        """The images at positions `rows` of this source, as a source of their own."""
        rows = np.asarray(rows, dtype=np.int64)
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.rows = rows if self.rows is None else self.rows[rows]
        return clone

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in 'iu'):
            raise TypeError(f"index an ImageSource with a 1-D integer array, not {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range [0, {len(self)}) for {self.path}")
        rows = idx.astype(np.int64) if self.rows is None else self.rows[idx]
        return self._gather(rows)

    def _gather(self, rows):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, shape={self.shape})"


# Linux maps up to this many bytes of already-cached neighbouring pages on each page
# fault ("fault-around"), so pages are released in windows of this size.
FAULT_AROUND_BYTES = 65536


class ArraySource(ImageSource):
    """Images in a uint8 NHWC array: a read-only memory map of a .npy file, or an array
    in RAM (cifar10, fashion_mnist, which are small)."""

    def __init__(self, array, path, mm=None, offset=0, rows=None):
        super().__init__(path, array.shape[1:], array.shape[0], rows)
        self.array, self.mm, self.offset = array, mm, offset  # offset: bytes before row 0 in the file

    def _gather(self, rows):
        if self.mm is None:
            return self.array[rows]
        # Sort for locality, gather with one fancy-index op, then restore the order.
        order = np.argsort(rows, kind='stable')
        srt = rows[order]
        out = np.empty((len(rows),) + self.image_shape, np.uint8)
        out[order] = self.array[srt]
        self._release(srt)
        return out

    def _release(self, sorted_rows):
        """Unmap the pages just read (MADV_DONTNEED): they stay in the page cache, but
        not in this process's resident set, which would otherwise grow towards the
        file's size over an epoch."""
        if not len(sorted_rows) or not hasattr(mmap, 'MADV_DONTNEED'):
            return
        row_bytes, page = int(np.prod(self.image_shape)), max(mmap.PAGESIZE, FAULT_AROUND_BYTES)
        start = self.offset + sorted_rows * row_bytes
        starts, ends = start // page * page, -(-(start + row_bytes) // page) * page
        new_run = np.flatnonzero(starts[1:] > ends[:-1]) + 1  # merge touching ranges
        for a, b in zip(np.r_[0, new_run], np.r_[new_run, len(starts)]):
            self.mm.madvise(mmap.MADV_DONTNEED, int(starts[a]), int(ends[b - 1] - starts[a]))

    def __getstate__(self):  # for spawned DataLoader workers: reopen the map, don't copy it
        state = dict(self.__dict__)
        if self.mm is not None:
            state['array'] = state['mm'] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.array is None:
            self.array, self.mm, self.offset = _map_npy(self.path)


class PngFolderSource(ImageSource):
    """The .png files of one folder, in sorted file-name order, decoded with Pillow
    on each read (ffhq_1024; the release read them with torchvision's ImageFolder)."""

    def __init__(self, folder, image_shape, hint, rows=None, wants='the data set'):
        if not os.path.isdir(folder):
            raise UserError(f"{folder} not found (a folder of .png images); {hint}")
        names = sorted(os.listdir(folder))
        others = [x for x in names if not (x.lower().endswith('.png') and os.path.isfile(os.path.join(folder, x)))]
        if others:
            raise UserError(f"{folder} must hold only .png image files, but {others[0]!r}"
                            f"{f' and {len(others) - 1} more entries' if len(others) > 1 else ''} is not one")
        if not names:
            raise UserError(f"{folder} holds no .png images; {hint}")
        super().__init__(folder, image_shape, len(names), rows)
        self.files, self.wants = [os.path.join(folder, x) for x in names], wants
        read_image(self.files[0], self.image_shape, png=True, wants=wants, header_only=True)

    def _gather(self, rows):
        return np.stack([read_image(self.files[r], self.image_shape, png=True, wants=self.wants) for r in rows])


def read_image(path, image_shape, png=False, wants='the data set', header_only=False):
    """The one image reader (data folders, setup conversions, the tools' --images): one file
    as uint8 (H, W, C) of ``image_shape``, decoded by Pillow.  The file must have exactly that
    size and channel count (L for 1 channel, RGB for 3): nothing is resized or converted.
    ``png``: it must also be a PNG (the data sets' image folders).  Anything else is a
    UserError naming the file, what it is and who ``wants`` that shape."""
    from PIL import Image
    h, w, c = image_shape
    mode, kind = {1: 'L', 3: 'RGB'}[c], 'PNG' if png else 'image'
    try:
        with Image.open(path) as im:
            if im.mode != mode or im.size != (w, h) or (png and im.format != 'PNG'):
                raise UserError(f"{path}: {wants} takes {w}x{h} {mode} {kind}s, this one is a {im.size[0]}x"
                                f"{im.size[1]} {im.mode} {im.format}; resize or convert it first")
            return None if header_only else np.asarray(im, dtype=np.uint8).reshape(h, w, c)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (it does not exist)") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        raise UserError(f"{path}: cannot decode it: Pillow cannot read it as an image ({type(e).__name__}: {e})") \
            from None


# --- Readers of the on-disk formats. ---

def _map_npy(path):
    """Memory-map a .npy file read-only: (array, mmap, data offset)."""
    with open(path, 'rb') as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except Exception as e:
            raise UserError(f"{path}: not a readable .npy file ({e})") from None
        offset = f.tell()
        size = os.fstat(f.fileno()).st_size
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if dtype != np.uint8 or fortran or len(shape) != 4:
            raise UserError(f"{path}: expected a uint8 array of shape (N, H, W, C) in C order, "
                            f"found {dtype} {shape}{' (Fortran order)' if fortran else ''}")
        if size != offset + nbytes:
            raise UserError(f"{path}: the header says {shape} ({offset + nbytes} bytes) but the file has "
                            f"{size} bytes ({'truncated' if size < offset + nbytes else 'trailing data'})")
        if nbytes == 0:
            raise UserError(f"{path}: holds no images (shape {shape})")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.ndarray(shape, np.uint8, buffer=mm, offset=offset), mm, offset


def open_npy(path, dataset, hint='see README, "Data"'):
    """A .npy file of `dataset` images (N, H, W, C) uint8 as a memory-mapped ArraySource."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; {hint}")
    array, mm, offset = _map_npy(path)
    size, channels = IMAGE_SHAPE[dataset]
    if array.shape[1:] != (size, size, channels):
        raise UserError(f"{path}: expected {dataset} images of shape (N, {size}, {size}, {channels}), "
                        f"found {array.shape}")
    return ArraySource(array, path, mm, offset)


# Pickles hold numpy arrays, lists, dicts and strings; anything else is refused, so a
# tampered download cannot run code while it is loaded.
def _numpy_pickle_globals():
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    found = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype}
    for module in ('numpy.core', 'numpy._core'):
        found[module + '.multiarray', '_reconstruct'] = multiarray._reconstruct
        found[module + '.multiarray', 'scalar'] = multiarray.scalar
        found[module + '.numeric', '_frombuffer'] = numeric._frombuffer
    import _codecs
    found['_codecs', 'encode'] = _codecs.encode  # bytes in protocol-2 pickles
    return found


class _ArrayUnpickler(pickle.Unpickler):
    allowed = None

    def find_class(self, module, name):
        if _ArrayUnpickler.allowed is None:
            _ArrayUnpickler.allowed = _numpy_pickle_globals()
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return self.allowed[module, name]


def load_pickled_batch(f, where, columns):
    """One pickled batch (CIFAR-10 or downsampled ImageNet): a dict whose 'data' is
    (N, columns) uint8, rows = flattened CHW images.  Returns that array."""
    try:
        # latin1 reads Python 2 pickles (CIFAR-10's) as well as Python 3 ones.
        batch = _ArrayUnpickler(f, encoding='latin1').load()
    except Exception as e:
        raise UserError(f"{where}: not a readable pickled batch ({type(e).__name__}: {e})") from None
    if isinstance(batch, dict):
        batch = {k.decode('latin1') if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = batch.get('data') if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == columns):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{where}: expected a dict whose 'data' is uint8 (N, {columns}) (flattened CHW images), "
                        f"found {found if isinstance(batch, dict) else type(batch).__name__}")
    return data


def chw_rows_to_nhwc(data, size):
    return data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)


def _read_idx_images(path, hint):
    """An idx3-ubyte(.gz) image file (MNIST format) as uint8 (N, 28, 28, 1)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; {hint}")
    try:
        with gzip.open(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: not a readable gzip file ({e}); {hint}") from None
    magic, n, h, w = struct.unpack('>4i', raw[:16]) if len(raw) >= 16 else (None,) * 4
    if magic != 0x803 or (h, w) != (28, 28):
        raise UserError(f"{path}: expected an idx3-ubyte file of 28x28 images (magic 2051), "
                        f"found magic {magic} and image size {h}x{w}")
    if len(raw) != 16 + n * h * w:
        raise UserError(f"{path}: the header says {n} images ({16 + n * h * w} bytes) but it holds {len(raw)} bytes")
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w, 1)


# --- Loaders, one per dataset. ---

def _hint(dataset, data_root):
    script = {'cifar10': './setup_cifar10.sh', 'imagenet32': './setup_imagenet.sh imagenet32',
              'imagenet64': './setup_imagenet.sh imagenet64', 'ffhq_256': './setup_ffhq256.sh',
              'ffhq_1024': './setup_ffhq1024.sh /path/to/images1024x1024',
              'fashion_mnist': './setup_fashion_mnist.sh', 'images': './setup_images.sh SRC'}[dataset]
    return f"run `{script} {data_root}` first (README, \"Data\")"


def _split_file(source, dataset):
    train, valid = split_indices(dataset, len(source))
    return source.view(train), source.view(valid)


def load_cifar10(data_root):
    folder = os.path.join(data_root, 'cifar-10-batches-py')
    hint = _hint('cifar10', data_root)

    def batch(name):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise UserError(f"{path} not found; {hint}")
        with open(path, 'rb') as f:
            return chw_rows_to_nhwc(load_pickled_batch(f, path, 3 * 32 * 32), 32)

    train = ArraySource(np.concatenate([batch(f'data_batch_{i}') for i in range(1, 6)]), folder)
    test = ArraySource(np.ascontiguousarray(batch('test_batch')), os.path.join(folder, 'test_batch'))
    return Splits(*_split_file(train, 'cifar10'), test)


def load_imagenet(data_root, dataset):
    hint = _hint(dataset, data_root)
    train = open_npy(os.path.join(data_root, f'{dataset}-train.npy'), dataset, hint)
    test = open_npy(os.path.join(data_root, f'{dataset}-valid.npy'), dataset, hint)  # the release's test set
    return Splits(*_split_file(train, dataset), test)


def load_ffhq256(data_root):
    train, valid = _split_file(open_npy(os.path.join(data_root, 'ffhq-256.npy'), 'ffhq_256',
                                        _hint('ffhq_256', data_root)), 'ffhq_256')
    return Splits(train, valid, valid)


def load_ffhq1024(data_root):
    hint, shape = _hint('ffhq_1024', data_root), (1024, 1024, 3)
    train = PngFolderSource(os.path.join(data_root, 'ffhq1024', 'train', '0'), shape, hint, wants='ffhq_1024')
    valid = PngFolderSource(os.path.join(data_root, 'ffhq1024', 'valid', '0'), shape, hint, wants='ffhq_1024')
    return Splits(train, valid, valid)


def load_fashion_mnist(data_root):
    folder, hint = os.path.join(data_root, 'fashion_mnist'), _hint('fashion_mnist', data_root)
    train_path = os.path.join(folder, 'train-images-idx3-ubyte.gz')
    test_path = os.path.join(folder, 't10k-images-idx3-ubyte.gz')
    train = ArraySource(_read_idx_images(train_path, hint), train_path)
    test = ArraySource(_read_idx_images(test_path, hint), test_path)
    return Splits(*_split_file(train, 'fashion_mnist'), test)


# --- Dataset images: a folder of pictures prepared by setup_images.sh (images_to_npy.py). ---
IMAGES_FOLDER, MANIFEST = 'images', 'manifest.json'
MANIFEST_FORMAT = 'vdvae-images-1'
SPLIT_NAMES = ('train', 'valid', 'test')


def read_manifest(data_root):
    """The manifest of the images prepared under data_root (data_root/images/manifest.json, the
    last file a preparation writes), as a dict; a UserError naming the file and the command to run
    when it is missing or is not one.  Read once per version of the file (_parse_manifest), however
    many times a start asks (the presets, the shape check, the loaders)."""
    path = os.path.join(data_root, IMAGES_FOLDER, MANIFEST)
    hint = f"prepare a folder of images there first: ./setup_images.sh SRC {data_root} --size N (README, " \
           "\"Train on your own images\")"
    if not os.path.isfile(path):
        raise UserError(f"{path} not found, so {data_root} holds no prepared images; {hint}")
    try:
        m, _ = _parse_manifest(path, *_version(path))
        if m.get('format') != MANIFEST_FORMAT:
            raise ValueError(f"format {m.get('format')!r}, not {MANIFEST_FORMAT!r}")
        m['image_shape'], m['bits'], m['normalization']['mean'], m['normalization']['std']  # noqa: B018 (present)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is not a manifest of prepared images ({type(e).__name__}: {e}); {hint}") from None
    return m


def _version(path):
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _parse_manifest(path, mtime_ns, size):
    """(the manifest as a dict, the sha256 of its bytes) of this version (mtime, size) of the file:
    one read for both.  The dict is shared by every caller: read it, never change it."""
    import hashlib
    import json
    with open(path, 'rb') as f:
        raw = f.read()
    return json.loads(raw.decode('utf-8')), hashlib.sha256(raw).hexdigest()


def load_images(data_root, shape):
    """Splits of the images prepared under data_root, whose manifest must say ``shape`` (size,
    channels): each split a memory-mapped .npy (storage npy) or a folder of PNGs (storage png),
    checked against the manifest's row counts.  Each source's ``origin`` is the manifest's sha256,
    so that the run's data fingerprint sees a re-prepared dataset."""
    m = read_manifest(data_root)
    folder, (h, w, c) = os.path.join(data_root, IMAGES_FOLDER), m['image_shape']
    if (h, c) != tuple(shape):
        raise UserError(f"{folder} holds {h}x{w}x{c} images (its manifest), but the model takes {shape[0]}x{shape[0]}"
                        f"x{shape[1]}: prepare the images again at --size {shape[0]} --channels {shape[1]} "
                        f"(./setup_images.sh SRC DATA_ROOT --size {shape[0]} into another DATA_ROOT) and pass that "
                        "--data_root, or train a model for these images")
    manifest = os.path.join(folder, MANIFEST)
    _, origin = _parse_manifest(manifest, *_version(manifest))  # the bytes read_manifest parsed
    hint = f"the dataset is incomplete: prepare it again with ./setup_images.sh SRC {data_root} ... --overwrite"
    sources = []
    for name in SPLIT_NAMES:
        split, path = m['splits'][name], os.path.join(folder, m['splits'][name]['file'])
        if m['storage'] == 'png':
            source = PngFolderSource(path, (h, w, c), hint, wants=f'the images of {folder}')
        else:
            if not os.path.isfile(path):
                raise UserError(f"{path} not found; {hint}")
            array, mm, offset = _map_npy(path)
            if array.shape[1:] != (h, w, c):
                raise UserError(f"{path}: expected images of shape (N, {h}, {w}, {c}) (its manifest), found "
                                f"{array.shape}; {hint}")
            source = ArraySource(array, path, mm, offset)
        if len(source) != split['n']:
            raise UserError(f"{path} holds {len(source)} images, its manifest says {split['n']}; {hint}")
        source.origin = origin
        sources.append(source)
    return Splits(*sources)


LOADERS = {'cifar10': load_cifar10, 'imagenet32': lambda root: load_imagenet(root, 'imagenet32'),
           'imagenet64': lambda root: load_imagenet(root, 'imagenet64'), 'ffhq_256': load_ffhq256,
           'ffhq_1024': load_ffhq1024, 'fashion_mnist': load_fashion_mnist}


def load_data(H):
    """Splits(train, valid, test) of H.dataset under H.data_root, as ImageSources.

    Reads headers (and the small cifar10 / fashion_mnist files); big files stay on
    disk.  Raises UserError, naming the file and the setup script, when data is
    missing or malformed.  No device moves, no global seeding.
    """
    if H.dataset == 'images':
        return load_images(H.data_root, (H.image_size, H.image_channels))
    if H.dataset not in LOADERS:
        raise UserError(f"unknown dataset {H.dataset!r}; known: {', '.join(LOADERS)}, images")
    size, channels = IMAGE_SHAPE[H.dataset]
    if (H.image_size, H.image_channels) != (size, channels):
        raise UserError(f"{H.dataset} images are {size}x{size}x{channels}, but image_size={H.image_size} and "
                        f"image_channels={H.image_channels}; leave these to the preset")
    return LOADERS[H.dataset](H.data_root)


# --- Preprocessing (the release's float32 math, in its order). ---

_constant_cache = {}


def normalization(H):
    """(shift, scale) of the inputs: NORMALIZATION's for the release's datasets; for dataset images
    minus the mean and one over the std of its train split's pixels (the manifest's, in H)."""
    return (-H.image_mean, 1. / H.image_std) if H.dataset == 'images' else NORMALIZATION[H.dataset]


def _constants(H, device):
    """shift, scale, shift_loss, scale_loss as float32 (1,1,1,1) tensors on `device`,
    made once per device like the release's .cuda() constants."""
    import torch
    values = normalization(H) + LOSS_NORMALIZATION.get(H.dataset, DEFAULT_LOSS_NORMALIZATION)
    key = (H.dataset, values, str(device))
    if key not in _constant_cache:
        _constant_cache[key] = tuple(torch.tensor([v], device=device).view(1, 1, 1, 1) for v in values)
    return _constant_cache[key]


def preprocess(H, batch):
    """uint8 (B, H, W, C) images on any device -> (x_in, x_target), float32 NHWC there.

    x_in = (x + shift) * scale with H.dataset's NORMALIZATION (dataset images: its manifest's
    mean and std; never quantised); x_target = (x - 127.5) / 127.5 in [-1, 1], computed as
    (x + -127.5) * (1/127.5); ffhq_256 (and images prepared with --bits 5) quantises the target to
    5 bits first: floor(x / 8) * 8.  ffhq_1024
    works on x = uint8 / 255 (torchvision's ToTensor): target (x - 0.5) * 2.
    """
    import torch
    if batch.dtype != torch.uint8 or batch.dim() != 4:
        raise ValueError(f"preprocess expects uint8 (B, H, W, C) images, got {batch.dtype} {tuple(batch.shape)}")
    shift, scale, shift_loss, scale_loss = _constants(H, batch.device)
    x_in = batch.float().div(255) if H.dataset == 'ffhq_1024' else batch.float()
    x_target = x_in.clone()
    x_in.add_(shift).mul_(scale)
    if low_bit_targets(H):
        x_target.mul_(1. / 8.).floor_().mul_(8.)
    x_target.add_(shift_loss).mul_(scale_loss)
    return x_in, x_target


# --- Batching and distributed sharding. ---

class _Rows:  # a map-style dataset for torch's DataLoader, indexed by arrays of positions
    """Item ``rows`` (1-D positions) = the whole batch source[rows], as a uint8 tensor (B, H, W, C)."""

    def __init__(self, source):
        self.source = source

    def __getitem__(self, rows):
        import torch
        return torch.from_numpy(self.source[rows])


class BatchList:
    """Sampler over a fixed list of batches (arrays of positions), in order."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class EpochBatches:
    """Sampler of one rank's training batches: those of ``train_batch_indices`` for the
    epoch last given to ``set_epoch(epoch, start_batch)``, from batch ``start_batch`` on
    (as DistributedSampler.set_epoch, so that one DataLoader with persistent workers
    serves the whole run)."""

    def __init__(self, n, batch_size, *, seed, rank=0, world_size=1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.set_epoch(0)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return max(0, train_batches_per_epoch(self.n, self.batch_size, self.world_size) - self.start_batch)

    def __iter__(self):
        batches = train_batch_indices(self.n, self.batch_size, seed=self.seed, epoch=self.epoch, rank=self.rank,
                                      world_size=self.world_size)
        return iter(batches[self.start_batch:])


STOP_SIGNALS = ('SIGTERM', 'SIGINT')


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: workers ignore SIGTERM and SIGINT.  A scheduler's
    SIGTERM or a Ctrl-C reaches the whole process group; the training process then
    finishes its step and writes its checkpoint, which needs its workers alive.  They
    exit when the training process closes them, exits (stop_workers) or dies.  Forked
    workers are born with both signals blocked (_Loader), so none is fatal before this
    runs; spawned ones (under mpiexec) start with a clear mask, as the multiprocessing
    module launches them."""
    import signal
    sigs = {getattr(signal, name) for name in STOP_SIGNALS}
    for sig in sigs:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


# The DataLoader iterators whose worker processes may still run (see stop_workers).
_WORKER_ITERATORS = weakref.WeakSet()
_stop_at_exit = False


def stop_workers():
    """End the worker processes of every DataLoader iterator still alive: the DataLoader's
    own shutdown (tell each worker to exit, join it for up to 5 s), then SIGKILL for any
    worker still there.  Registered with atexit when the first workers start, so that it
    runs before multiprocessing's exit handler.  That handler stops daemonic children with
    SIGTERM and then waits for them without a time limit; the workers ignore SIGTERM
    (ignore_stop_signals), and an uncaught exception keeps the iterators of its frames
    alive until after the handler has run, so without this every error would hang the
    process."""
    for it in list(_WORKER_ITERATORS):
        it._shutdown_workers()  # what the iterator's __del__ does (a no-op the second time)
        for w in it._workers:
            if w.is_alive():
                w.kill()
                w.join()


def _track_workers(it):
    """Record a DataLoader iterator for stop_workers, which is registered with atexit the
    first time: after torch and multiprocessing registered their handlers, so it runs
    before them (atexit runs the last registered first)."""
    global _stop_at_exit
    if not _stop_at_exit:
        atexit.register(stop_workers)
        _stop_at_exit = True
    _WORKER_ITERATORS.add(it)


def _loader(source, sampler, num_workers, pin_memory, persistent=False, mp_context=None):
    """A DataLoader yielding source[rows] for each ``rows`` the sampler gives.
    ``mp_context``: how worker processes start ('fork', 'spawn', 'forkserver'; None: the
    platform's default); ``persistent``: keep the workers from one pass to the next."""
    import torch

    class _Loader(torch.utils.data.DataLoader):
        def _get_iterator(self):
            """Start the workers with SIGTERM/SIGINT blocked: a forked worker inherits the
            mask, so it cannot die of a signal before ignore_stop_signals runs; this
            process gets a signal that arrived meanwhile once the workers are started.
            The iterator is recorded for stop_workers."""
            import signal
            sigs = {getattr(signal, name) for name in STOP_SIGNALS}
            old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
            try:
                it = super()._get_iterator()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            if self.num_workers:
                _track_workers(it)
            return it

    # batch_size=None: no collation; each worker holds at most prefetch_factor batches.
    # Its own generator: starting an iterator must not draw from the global torch RNG
    # (that would make a resumed run's noise differ from an uninterrupted one's).
    workers = dict(prefetch_factor=2, worker_init_fn=ignore_stop_signals, persistent_workers=persistent,
                   multiprocessing_context=mp_context) if num_workers else {}
    return _Loader(
        _Rows(source), sampler=sampler, batch_size=None, num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(), generator=torch.Generator().manual_seed(0), **workers)


def _check_rank(rank, world_size):
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")


def train_batches_per_epoch(n, batch_size, world_size):
    """Training steps per epoch on every rank: the epoch is cut into global batches of
    batch_size * world_size images and the last partial global batch is dropped."""
    return n // (batch_size * world_size)


def train_batch_indices(n, batch_size, *, seed, epoch, rank=0, world_size=1):
    """(steps, batch_size) positions into a source of n images for one rank and epoch.

    A permutation from np.random.default_rng((seed, epoch)) (no global state; the
    same `seed` on every rank) is cut into global batches of batch_size * world_size
    images; rank r takes rows [r * batch_size, (r + 1) * batch_size) of each.  The
    ranks' shards are disjoint, and step i of N processes sees exactly the images of
    step i of one process with batch_size * N, so the two train identically.
    """
    _check_rank(rank, world_size)
    steps = train_batches_per_epoch(n, batch_size, world_size)
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    global_batches = perm[:steps * batch_size * world_size].reshape(steps, world_size, batch_size)
    return np.ascontiguousarray(global_batches[:, rank])


def train_loader(source, batch_size, *, seed, epoch, rank=0, world_size=1, start_batch=0, num_workers=0,
                 pin_memory=False, mp_context=None):
    """Training batches of one epoch for one rank: uint8 tensors (batch_size, H, W, C).

    Order from train_batch_indices (reshuffled every epoch from `seed`, which must be
    the same on every rank); `start_batch` skips the batches already trained on this
    epoch, for an exact resume.  pin_memory pins batches (when CUDA is present) so
    that `.to(device, non_blocking=True)` overlaps the copy.  The workers persist: for
    the next epoch call ``loader.sampler.set_epoch(epoch + 1)`` and iterate again.
    """
    steps = train_batches_per_epoch(len(source), batch_size, world_size)
    if steps == 0:
        raise UserError(f"{source.path}: {len(source)} training images give no batch of {batch_size} per rank "
                        f"with {world_size} ranks")
    sampler = EpochBatches(len(source), batch_size, seed=seed, rank=rank, world_size=world_size)
    sampler.set_epoch(epoch, start_batch)
    return _loader(source, sampler, num_workers, pin_memory, persistent=True, mp_context=mp_context)


def worker_start_method(launcher):
    """How data-loading workers start: forking a process that has initialised MPI is unsafe,
    so under mpiexec (``launcher``, see utils.detect_launcher) they are spawned (once per run:
    the workers persist); None: the platform's default."""
    return 'spawn' if launcher == 'mpiexec' else None


def eval_shard(n, rank, world_size):
    """Positions rank r evaluates: a contiguous block of range(n).  Over all ranks
    every position appears exactly once; block sizes differ by at most one."""
    _check_rank(rank, world_size)
    return np.arange(n * rank // world_size, n * (rank + 1) // world_size, dtype=np.int64)


def eval_loader(source, batch_size, *, rank=0, world_size=1, num_workers=0, pin_memory=False, mp_context=None):
    """Evaluation batches of rank r's shard in order, uint8 (B, H, W, C); the last batch
    may be smaller, so ranks may run different numbers of batches (by at most one):
    sum per-image statistics locally and all-reduce once after the loop."""
    shard = eval_shard(len(source), rank, world_size)
    return _loader(source, BatchList([shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]),
                   num_workers, pin_memory, mp_context=mp_context)

