"""data.py, files_to_npy.py and the setup scripts: every preset's on-disk format, the release's split
rules, preprocessing parity with the release's reference batch, sharding, bounded
memory and clear errors on bad input.

Small files in each real format are built in a temporary folder and loaded through
the same code as real data.  Fashion-MNIST is also set up and loaded for real (from
Debian's dataset-fashion-mnist package); CI must have it, elsewhere that test skips
when the package is neither installed nor installable.
"""
import gzip
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import files_to_npy
from hps import NORMALIZATION, UserError, get_hparams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(REPO, 'tests', 'reference')
FASHION_SYSTEM_DIR = '/usr/share/datasets/fashion-mnist'


def hparams(preset, root):
    return get_hparams(['--hps', preset, '--data_root', str(root)])


def everything(source):
    return source[np.arange(len(source))]


def release_permutation_split(seed, holdout, n):
    """The release's rule, written its way: global np.random.seed, then permutation."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        perm = np.random.permutation(n)
    finally:
        np.random.set_state(state)
    return perm[:-holdout], perm[-holdout:]


def run_script(*args, env=None, check=True):
    result = subprocess.run(['bash', *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


# --- writers of each on-disk format ---

def write_pickle_batch(path, chw_rows, protocol=2):
    """A CIFAR-10-style batch: {b'data': (N, 3*S*S) uint8, b'labels': [...]}."""
    with open(path, 'wb') as f:
        pickle.dump({b'batch_label': b'x', b'data': chw_rows, b'labels': [0] * len(chw_rows)}, f, protocol=protocol)


def write_idx(path, images):
    raw = struct.pack('>4i', 0x803, len(images), 28, 28) + images.astype(np.uint8).tobytes()
    with gzip.open(path, 'wb') as f:
        f.write(raw)


def write_png(path, image):
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)


def random_images(rng, n, size, channels=3):
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


# --- preprocessing ---

def test_preprocess_matches_release_reference_batch():
    batch = torch.from_numpy(np.load(os.path.join(REF, 'tiny32', 'batch.npy')))
    ref = np.load(os.path.join(REF, 'tiny32', 'batch_preprocessed.npz'))
    x_in, x_target = data.preprocess(hparams('cifar10', '.'), batch)
    assert x_in.dtype == x_target.dtype == torch.float32 and x_in.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(x_in.numpy(), ref['x_in'])
    np.testing.assert_array_equal(x_target.numpy(), ref['x_target'])
    assert batch.dtype == torch.uint8  # the input batch is left alone


def test_preprocess_5bit_ffhq256_and_ffhq1024():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    x = u8.astype(np.float64)
    x_in, x_t = data.preprocess(hparams('ffhq256', '.'), torch.from_numpy(u8))
    shift, scale = NORMALIZATION['ffhq_256']
    np.testing.assert_allclose(x_in.numpy(), (x + shift) * scale, rtol=0, atol=2e-6)  # input not quantised
    np.testing.assert_allclose(x_t.numpy(), np.floor(x / 8) * 8 / 127.5 - 1, rtol=0, atol=1e-6)
    assert len(np.unique(x_t.numpy())) == 32 and x_t.max() < 0.95

    x_in, x_t = data.preprocess(hparams('ffhq1024', '.'), torch.from_numpy(u8))
    np.testing.assert_allclose(x_in.numpy(), (x / 255 - 0.4387) / 0.2743, rtol=0, atol=2e-6)
    np.testing.assert_allclose(x_t.numpy(), (x / 255 - 0.5) * 2, rtol=0, atol=1e-6)
    assert x_t.min() == -1 and x_t.max() == 1


# --- split rules ---

@pytest.mark.parametrize('dataset,seed,holdout,n', [('imagenet32', 42, 5000, 1281167), ('imagenet64', 42, 5000, 1281167),
                                                    ('ffhq256', 5, 7000, 70000), ('ffhq_256', 5, 7000, 70000),
                                                    ('fashion_mnist', 0, 5000, 60000)])
def test_split_indices_follow_the_release_rule(dataset, seed, holdout, n):
    train, valid = data.split_indices(dataset, n)
    want_train, want_valid = release_permutation_split(seed, holdout, n)
    np.testing.assert_array_equal(train, want_train)
    np.testing.assert_array_equal(valid, want_valid)


def test_cifar10_split_is_train_test_split_with_the_release_arguments():
    from sklearn.model_selection import train_test_split
    n = 50000
    train, valid = data.split_indices('cifar10', n)
    rows = np.random.RandomState(1).randint(0, 2 ** 31, (n, 2))  # stands in for the images
    want_train, want_valid = train_test_split(rows, test_size=5000, random_state=11172018)
    np.testing.assert_array_equal(rows[train], want_train)
    np.testing.assert_array_equal(rows[valid], want_valid)
    # Independently of scikit-learn: its ShuffleSplit draws one RandomState permutation.
    perm = np.random.RandomState(11172018).permutation(n)
    np.testing.assert_array_equal(valid, perm[:5000])
    np.testing.assert_array_equal(train, perm[5000:])


def test_split_indices_partition_and_ffhq1024_and_too_small_files():
    for dataset, n in [('cifar10', 6000), ('imagenet32', 5001), ('fashion_mnist', 60000)]:
        train, valid = data.split_indices(dataset, n)
        assert sorted(np.r_[train, valid].tolist()) == list(range(n))
    train, valid = data.split_indices('ffhq1024', 10)
    assert train.tolist() == list(range(10)) and valid.size == 0
    with pytest.raises(UserError, match='needs more than 7000'):
        data.split_indices('ffhq_256', 7000)
    with pytest.raises(UserError, match='unknown dataset'):
        data.split_indices('mnist', 100)


# --- loaders, one per on-disk format ---

def test_cifar10_pickle_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    batches = [rng.integers(0, 256, (1010, 3072), dtype=np.uint8) for _ in range(5)]
    batches[0][0, :1024], batches[0][0, 1024:2048], batches[0][0, 2048:] = 10, 20, 30  # R, G, B planes
    for i, b in enumerate(batches):
        write_pickle_batch(folder / f'data_batch_{i + 1}', b, protocol=2 if i else 4)
    test = rng.integers(0, 256, (37, 3072), dtype=np.uint8)
    write_pickle_batch(folder / 'test_batch', test)
    before = np.random.get_state()[1].copy()
    splits = data.load_data(hparams('cifar10', tmp_path))
    assert np.array_equal(np.random.get_state()[1], before)  # no global seeding

    # The release: stack, reshape CHW -> HWC, then train_test_split(test_size=5000, random_state=11172018).
    from sklearn.model_selection import train_test_split
    tr_x = np.vstack(batches).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    want_train, want_valid = train_test_split(tr_x, test_size=5000, random_state=11172018)
    assert splits.train.shape == (50, 32, 32, 3) and splits.valid.shape == (5000, 32, 32, 3)
    np.testing.assert_array_equal(everything(splits.train), want_train)
    np.testing.assert_array_equal(everything(splits.valid), want_valid)
    np.testing.assert_array_equal(everything(splits.test), test.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    where = np.flatnonzero(data.split_indices('cifar10', 5050)[0] == 0)
    source = splits.train if len(where) else splits.valid
    pos = where[0] if len(where) else np.flatnonzero(data.split_indices('cifar10', 5050)[1] == 0)[0]
    assert source[np.array([pos])][0, 5, 7].tolist() == [10, 20, 30]


def test_imagenet_npy_files(tmp_path):
    rng = np.random.default_rng(1)
    train, valid = random_images(rng, 5100, 32), random_images(rng, 23, 32)
    np.save(tmp_path / 'imagenet32-train.npy', train)
    np.save(tmp_path / 'imagenet32-valid.npy', valid)
    splits = data.load_data(hparams('imagenet32', tmp_path))
    tr_idx, va_idx = release_permutation_split(42, 5000, 5100)
    np.testing.assert_array_equal(everything(splits.train), train[tr_idx])
    np.testing.assert_array_equal(everything(splits.valid), train[va_idx])
    np.testing.assert_array_equal(everything(splits.test), valid)  # test = the valid file
    idx = np.array([7, 3, 99, 3, 0])  # any order, repeats allowed
    np.testing.assert_array_equal(splits.train[idx], train[tr_idx[idx]])
    with pytest.raises(IndexError):
        splits.valid[np.array([5000])]
    clone = pickle.loads(pickle.dumps(splits.valid))  # as a spawned DataLoader worker gets it
    assert clone.mm is not splits.valid.mm
    np.testing.assert_array_equal(clone[np.array([4999, 0])], train[va_idx[[4999, 0]]])


def test_ffhq256_npy_sparse_file(tmp_path):
    # 7010 images of 256x256x3 (1.4 GB apparent size; sparse, so it costs no disk).
    path = tmp_path / 'ffhq-256.npy'
    mm = np.lib.format.open_memmap(path, mode='w+', dtype=np.uint8, shape=(7010, 256, 256, 3))
    tr_idx, va_idx = release_permutation_split(5, 7000, 7010)
    for k in (0, 1, 2):
        mm[tr_idx[k]] = k + 1
        mm[va_idx[k]] = k + 101
    del mm
    splits = data.load_data(hparams('ffhq256', tmp_path))
    assert len(splits.train) == 10 and len(splits.valid) == 7000 and splits.test is splits.valid
    assert splits.train[np.array([2, 0, 1])][:, 100, 100, 0].tolist() == [3, 1, 2]
    assert splits.valid[np.array([0, 1, 2])][:, 255, 0, 2].tolist() == [101, 102, 103]


def test_ffhq1024_png_folders(tmp_path):
    rng = np.random.default_rng(2)
    images = {}
    for split, names in (('train', ['00002', '00000', '00001']), ('valid', ['65001', '65000'])):
        folder = tmp_path / 'ffhq1024' / split / '0'
        folder.mkdir(parents=True)
        for name in names:
            images[name] = np.zeros((1024, 1024, 3), np.uint8)
            images[name][:8, :8] = rng.integers(0, 256, (8, 8, 3))
            write_png(folder / f'{name}.png', images[name])
    splits = data.load_data(hparams('ffhq1024', tmp_path))
    assert splits.train.shape == (3, 1024, 1024, 3) and splits.test is splits.valid
    got = splits.train[np.array([2, 0])]  # sorted file names: 00000, 00001, 00002
    np.testing.assert_array_equal(got, np.stack([images['00002'], images['00000']]))
    np.testing.assert_array_equal(splits.valid[np.array([0])][0], images['65000'])


def test_fashion_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / 'fashion_mnist'
    folder.mkdir()
    train, test = rng.integers(0, 256, (5050, 28, 28)), rng.integers(0, 256, (31, 28, 28))
    write_idx(folder / 'train-images-idx3-ubyte.gz', train)
    write_idx(folder / 't10k-images-idx3-ubyte.gz', test)
    splits = data.load_data(hparams('fashion_mnist', tmp_path))
    tr_idx, va_idx = release_permutation_split(0, 5000, 5050)
    assert splits.train.shape == (50, 28, 28, 1)
    np.testing.assert_array_equal(everything(splits.train)[..., 0], train[tr_idx])
    np.testing.assert_array_equal(everything(splits.valid)[..., 0], train[va_idx])
    np.testing.assert_array_equal(everything(splits.test)[..., 0], test)


def test_real_fashion_mnist_setup_and_load(tmp_path):
    """setup_fashion_mnist.sh for real (Debian's package), then all 70000 images."""
    if not os.path.isdir(FASHION_SYSTEM_DIR) and not os.environ.get('CI') and (
            os.geteuid() != 0 or not shutil.which('apt-get')):
        pytest.skip(f"{FASHION_SYSTEM_DIR} absent and not installable here (CI installs it)")
    first = run_script('setup_fashion_mnist.sh', tmp_path)
    assert 'md5 verified' in first.stdout
    second = run_script('setup_fashion_mnist.sh', tmp_path)
    assert 'nothing to do' in second.stdout
    splits = data.load_data(hparams('fashion_mnist', tmp_path))
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (55000, 5000, 10000)
    pixels = np.concatenate([everything(splits.train), everything(splits.valid)]).reshape(60, -1)
    n = pixels.size
    mean = pixels.sum(dtype=np.int64) / n  # exact integer sums, then float64
    std = np.sqrt(sum((row.astype(np.int64) ** 2).sum() for row in pixels) / n - mean ** 2)
    shift, scale = NORMALIZATION['fashion_mnist']  # hps's constants = the 60000 training images' pixels
    assert abs(mean + shift) < 1e-6 and abs(std - 1 / scale) < 1e-6
    assert everything(splits.test).mean() > 50


def test_fashion_mnist_download_resumes_and_verifies(tmp_path):
    """The download path, served from a local folder: a partial file is resumed, a bad one refused."""
    if not os.path.isdir(FASHION_SYSTEM_DIR):
        pytest.skip(f"needs {FASHION_SYSTEM_DIR} as the stand-in server")
    env = {'FASHION_MNIST_SYSTEM_DIR': str(tmp_path / 'none'), 'FASHION_MNIST_URL': f'file://{FASHION_SYSTEM_DIR}'}
    dest = tmp_path / 'root' / 'fashion_mnist'
    dest.mkdir(parents=True)
    whole = open(os.path.join(FASHION_SYSTEM_DIR, 't10k-images-idx3-ubyte.gz'), 'rb').read()
    (dest / 't10k-images-idx3-ubyte.gz.part').write_bytes(whole[:100000])
    out = run_script('setup_fashion_mnist.sh', tmp_path / 'root', env=env)
    assert out.stdout.count('downloaded, md5 verified') == 4
    assert (dest / 't10k-images-idx3-ubyte.gz').read_bytes() == whole and not list(dest.glob('*.part'))

    bad = tmp_path / 'bad'
    bad.mkdir()
    for name in os.listdir(FASHION_SYSTEM_DIR):
        (bad / name).write_bytes(b'not the data')
    env['FASHION_MNIST_URL'] = f'file://{bad}'
    out = run_script('setup_fashion_mnist.sh', tmp_path / 'root2', env=env, check=False)
    assert out.returncode != 0 and 'does not match its published md5' in out.stderr
    assert not list((tmp_path / 'root2' / 'fashion_mnist').iterdir())  # nothing half-made left


# --- Downsampled ImageNet zips -> the release's .npy ---

def imagenet_batch(rng, n, size, first_value):
    chw = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    chw[:, 0, 0, 0] = first_value
    return {'data': chw.reshape(n, -1), 'labels': list(range(n)), 'mean': np.zeros(3 * size * size)}


def test_convert_imagenet_zips_in_numeric_batch_order(tmp_path):
    rng = np.random.default_rng(4)
    batches = {b: imagenet_batch(rng, 3, 64, b) for b in range(1, 11)}
    for part, numbers in (('part1', [5, 1, 3, 2, 4]), ('part2', [10, 6, 7, 9, 8])):
        with zipfile.ZipFile(tmp_path / f'Imagenet64_train_{part}.zip', 'w') as zf:
            for b in numbers:
                zf.writestr(f'Imagenet64_train_{part}/train_data_batch_{b}', pickle.dumps(batches[b]))
    zips = [str(tmp_path / 'Imagenet64_train_part2.zip'), str(tmp_path / 'Imagenet64_train_part1.zip')]
    out = tmp_path / 'imagenet64-train.npy'
    assert files_to_npy.convert_imagenet(zips, str(out), 'train', 64) == 30
    got = np.load(out)
    assert got.shape == (30, 64, 64, 3) and got.dtype == np.uint8
    assert got[::3, 0, 0, 0].tolist() == list(range(1, 11))  # 1, 2, ..., 10, not 1, 10, 2, ...
    want = np.concatenate([batches[b]['data'] for b in range(1, 11)]).reshape(-1, 3, 64, 64).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got, want)

    with pytest.raises(UserError, match='train_data_batch_1..10 once each'):  # part2 forgotten
        files_to_npy.convert_imagenet(zips[1:], str(tmp_path / 'x.npy'), 'train', 64)
    with pytest.raises(UserError, match=r"'data' is uint8 \(N, 3072\)"):  # wrong size
        files_to_npy.convert_imagenet(zips, str(tmp_path / 'x.npy'), 'train', 32)
    assert not list(tmp_path.glob('x.npy*'))  # no half-written file left


def test_setup_imagenet_script_converts_zips_once(tmp_path):
    rng = np.random.default_rng(5)
    train = [imagenet_batch(rng, 510, 32, b) for b in range(1, 11)]
    with zipfile.ZipFile(tmp_path / 'Imagenet32_train.zip', 'w') as zf:
        for b, batch in enumerate(train, 1):
            zf.writestr(f'Imagenet32_train/train_data_batch_{b}', pickle.dumps(batch))
    with zipfile.ZipFile(tmp_path / 'Imagenet32_val.zip', 'w') as zf:
        zf.writestr('Imagenet32_val/val_data', pickle.dumps(imagenet_batch(rng, 40, 32, 0)))
    out = run_script('setup_imagenet.sh', 'imagenet32', tmp_path)
    assert 'NOT the release' in out.stdout
    assert 'not comparable' in (tmp_path / 'imagenet32-version.txt').read_text()
    assert 'nothing to do' in run_script('setup_imagenet.sh', 'imagenet32', tmp_path).stdout
    splits = data.load_data(hparams('imagenet32', tmp_path))
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (100, 5000, 40)
    missing = run_script('setup_imagenet.sh', 'imagenet64', tmp_path, check=False)
    assert missing.returncode == 1 and 'Imagenet64_train_part1.zip not found' in missing.stderr


# --- the other setup scripts ---

def test_setup_cifar10_checks_the_archive(tmp_path):
    (tmp_path / 'cifar-10-python.tar.gz').write_bytes(b'corrupt')
    out = run_script('setup_cifar10.sh', tmp_path, check=False)
    assert out.returncode == 1 and 'md5' in out.stderr
    assert not (tmp_path / 'cifar-10-batches-py').exists()
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    for name in ['data_batch_1', 'data_batch_2', 'data_batch_3', 'data_batch_4', 'data_batch_5', 'test_batch']:
        (folder / name).write_bytes(b'')
    assert 'nothing to do' in run_script('setup_cifar10.sh', tmp_path).stdout


def test_setup_ffhq1024_links_the_release_split(tmp_path):
    src = tmp_path / 'images1024x1024'
    image = np.zeros((1024, 1024, 3), np.uint8)
    for number in (64998, 64999, 65000, 65001):
        sub = src / f'{number // 1000 * 1000:05d}'
        sub.mkdir(parents=True, exist_ok=True)
        write_png(sub / f'{number:05d}.png', image)
    root = tmp_path / 'root'
    refused = run_script('setup_ffhq1024.sh', src, root, check=False)
    assert refused.returncode == 2 and '69996 missing' in refused.stderr and not (root / 'ffhq1024').exists()
    run_script('setup_ffhq1024.sh', src, root, env={'ALLOW_PARTIAL': '1'})
    assert sorted(os.listdir(root / 'ffhq1024' / 'train' / '0')) == ['64998.png', '64999.png']
    assert sorted(os.listdir(root / 'ffhq1024' / 'valid' / '0')) == ['65000.png', '65001.png']
    assert 'nothing to do' in run_script('setup_ffhq1024.sh', src, root, env={'ALLOW_PARTIAL': '1'}).stdout
    splits = data.load_data(hparams('ffhq1024', root))
    assert (len(splits.train), len(splits.valid)) == (2, 2)


def test_setup_ffhq256_from_a_png_folder_and_from_a_npy(tmp_path):
    src = tmp_path / 'pngs'
    src.mkdir()
    images = random_images(np.random.default_rng(6), 3, 256)
    for name, image in zip(['b.png', 'c.png', 'a.png'], images):
        write_png(src / name, image)
    run_script('setup_ffhq256.sh', tmp_path / 'r1', src, env={'ALLOW_PARTIAL': '1'})
    np.testing.assert_array_equal(np.load(tmp_path / 'r1' / 'ffhq-256.npy'), images[[2, 0, 1]])  # sorted names
    refused = run_script('setup_ffhq256.sh', tmp_path / 'r2', src, check=False)
    assert refused.returncode == 2 and 'expected 70000 .png images, found 3' in refused.stderr
    assert not (tmp_path / 'r2' / 'ffhq-256.npy').exists()
    run_script('setup_ffhq256.sh', tmp_path / 'r3', tmp_path / 'r1' / 'ffhq-256.npy')
    assert os.path.islink(tmp_path / 'r3' / 'ffhq-256.npy')
    assert 'nothing to do' in run_script('setup_ffhq256.sh', tmp_path / 'r3').stdout


# --- sharding and batching ---

def test_train_shards_are_disjoint_equal_and_reshuffled_per_epoch():
    n, b, w = 1003, 10, 4
    steps = data.train_batches_per_epoch(n, b, w)
    assert steps == 25
    shards = [data.train_batch_indices(n, b, seed=7, epoch=3, rank=r, world_size=w) for r in range(w)]
    assert all(s.shape == (steps, b) for s in shards)
    flat = np.concatenate([s.ravel() for s in shards])
    assert len(set(flat.tolist())) == len(flat) == w * steps * b and flat.max() < n
    again = data.train_batch_indices(n, b, seed=7, epoch=3, rank=1, world_size=w)
    np.testing.assert_array_equal(again, shards[1])
    other_epoch = data.train_batch_indices(n, b, seed=7, epoch=4, rank=1, world_size=w)
    assert not np.array_equal(other_epoch, shards[1])
    # step i of w ranks = step i of one process with a w-times larger batch, rank by rank
    single = data.train_batch_indices(n, b * w, seed=7, epoch=3)
    np.testing.assert_array_equal(np.concatenate(shards, axis=1), single)


def test_starting_a_loader_does_not_touch_the_global_rng():
    source = data.ArraySource(random_images(np.random.default_rng(3), 40, 4), 'mem')
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    next(iter(data.train_loader(source, 8, seed=1, epoch=0)))
    next(iter(data.eval_loader(source, 8)))
    assert torch.equal(torch.rand(3), want)


def test_train_loader_batches_and_exact_resume():
    images = random_images(np.random.default_rng(8), 103, 4)
    source = data.ArraySource(images, 'mem')
    idx = data.train_batch_indices(103, 8, seed=1, epoch=2, rank=1, world_size=2)
    batches = list(data.train_loader(source, 8, seed=1, epoch=2, rank=1, world_size=2))
    assert len(batches) == 6 and all(x.dtype == torch.uint8 and x.shape == (8, 4, 4, 3) for x in batches)
    for x, i in zip(batches, idx):
        np.testing.assert_array_equal(x.numpy(), images[i])
    resumed = list(data.train_loader(source, 8, seed=1, epoch=2, rank=1, world_size=2, start_batch=4))
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, batches[4:]))
    with_workers = list(data.train_loader(source, 8, seed=1, epoch=2, rank=1, world_size=2, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(with_workers, batches)) and len(with_workers) == 6
    with pytest.raises(UserError, match='no batch'):
        data.train_loader(source, 64, seed=1, epoch=0, world_size=2)


@pytest.mark.parametrize('n,world_size', [(10, 3), (5000, 7), (7, 8), (1, 1)])
def test_eval_shards_visit_every_image_exactly_once(n, world_size):
    shards = [data.eval_shard(n, r, world_size) for r in range(world_size)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_eval_loader_keeps_the_last_partial_batch(tmp_path):
    images = random_images(np.random.default_rng(9), 23, 32)
    np.save(tmp_path / 'x.npy', images)
    source = data.open_npy(str(tmp_path / 'x.npy'), 'cifar10').view(np.arange(22, -1, -1))  # reversed
    seen = []
    for rank in range(3):
        batches = list(data.eval_loader(source, 3, rank=rank, world_size=3, num_workers=rank % 2))
        assert all(len(x) <= 3 for x in batches)
        seen.append(np.concatenate([x.numpy() for x in batches]))
    np.testing.assert_array_equal(np.concatenate(seen), images[::-1])


def test_memory_stays_flat_reading_a_large_npy(tmp_path):
    """~300 MB .npy, every image read once in batches: resident memory grows far less."""
    path = tmp_path / 'imagenet64-train.npy'
    n = 25000  # x 12288 bytes = 307 MB
    mm = np.lib.format.open_memmap(path, mode='w+', dtype=np.uint8, shape=(n, 64, 64, 3))
    for i in range(0, n, 2500):
        mm[i:i + 2500] = (np.arange(i, i + 2500) % 251).astype(np.uint8)[:, None, None, None]
    mm.flush()
    del mm
    source = data.open_npy(str(path), 'imagenet64')

    def rss_mb():
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024

    peak, count = 0, 0
    for x in data.train_loader(source, 64, seed=0, epoch=0):
        count += len(x)
        if count == 64:
            start = rss_mb()  # after the first batch: imports and buffers are in place
        if count % 6400 == 0:
            assert (x[:, 5, 5, 0].numpy() == x[:, 60, 60, 2].numpy()).all()
            peak = max(peak, rss_mb() - start)
    assert count == n // 64 * 64
    print(f"resident memory grew by {peak:.1f} MB")
    assert peak < 30, f"resident memory grew by {peak:.0f} MB reading a 307 MB file"


# --- bad input: one-line UserErrors naming the file ---

def expect_user_error(H, *words):
    with pytest.raises(UserError) as info:
        data.load_data(H)
    message = str(info.value)
    assert '\n' not in message and all(w in message for w in words), message
    return message


def test_missing_files_name_the_file_and_the_setup_script(tmp_path):
    expect_user_error(hparams('cifar10', tmp_path), 'data_batch_1', 'setup_cifar10.sh')
    expect_user_error(hparams('imagenet64', tmp_path), 'imagenet64-train.npy', 'setup_imagenet.sh imagenet64')
    expect_user_error(hparams('ffhq256', tmp_path), 'ffhq-256.npy', 'setup_ffhq256.sh')
    expect_user_error(hparams('ffhq1024', tmp_path), os.path.join('ffhq1024', 'train', '0'), 'setup_ffhq1024.sh')
    expect_user_error(hparams('fashion_mnist_quick', tmp_path), 'train-images-idx3-ubyte.gz', 'setup_fashion_mnist.sh')


def test_bad_npy_files(tmp_path):
    H = hparams('ffhq256', tmp_path)
    path = tmp_path / 'ffhq-256.npy'
    np.save(path, np.zeros((8, 256, 256, 1), np.uint8))
    expect_user_error(H, str(path), '(N, 256, 256, 3)', '(8, 256, 256, 1)')  # channel count
    np.save(path, np.zeros((8, 256, 256, 3), np.float32))
    expect_user_error(H, str(path), 'uint8', 'float32')
    np.save(path, np.zeros((8, 256, 256, 3), np.uint8))
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) - 1000)
    expect_user_error(H, str(path), 'truncated')
    path.write_bytes(b'garbage')
    expect_user_error(H, str(path), 'not a readable .npy')


def test_bad_pickles_idx_and_pngs(tmp_path):
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    for i in range(1, 6):
        write_pickle_batch(folder / f'data_batch_{i}', np.zeros((2, 3072), np.uint8))
    (folder / 'data_batch_3').write_bytes(b'\x80\x04garbage')
    expect_user_error(hparams('cifar10', tmp_path), 'data_batch_3', 'not a readable pickled batch')
    write_pickle_batch(folder / 'data_batch_3', np.zeros((2, 1024), np.uint8))
    expect_user_error(hparams('cifar10', tmp_path), 'data_batch_3', '(N, 3072)')
    with open(folder / 'data_batch_3', 'wb') as f:  # a pickle that would run code is refused
        pickle.dump({'data': os.system}, f)
    expect_user_error(hparams('cifar10', tmp_path), 'data_batch_3', 'refusing')

    fm = tmp_path / 'fashion_mnist'
    fm.mkdir()
    write_idx(fm / 'train-images-idx3-ubyte.gz', np.zeros((5001, 28, 28)))
    (fm / 't10k-images-idx3-ubyte.gz').write_bytes(gzip.compress(b'\x00\x00\x08\x01' + bytes(100)))
    expect_user_error(hparams('fashion_mnist', tmp_path), 't10k-images-idx3-ubyte.gz', 'magic 2051')
    whole = gzip.compress(struct.pack('>4i', 0x803, 10, 28, 28) + bytes(10 * 784))
    (fm / 't10k-images-idx3-ubyte.gz').write_bytes(whole[:-30])
    expect_user_error(hparams('fashion_mnist', tmp_path), 't10k-images-idx3-ubyte.gz', 'gzip')

    train = tmp_path / 'ffhq1024' / 'train' / '0'
    valid = tmp_path / 'ffhq1024' / 'valid' / '0'
    train.mkdir(parents=True)
    valid.mkdir(parents=True)
    write_png(train / '00000.png', np.zeros((1024, 1024, 1), np.uint8))
    write_png(valid / '65000.png', np.zeros((1024, 1024, 3), np.uint8))
    expect_user_error(hparams('ffhq1024', tmp_path), '00000.png', '1024x1024 RGB PNG', ' L ')
    write_png(train / '00000.png', np.zeros((1024, 1024, 3), np.uint8))
    (train / '00001.png').write_bytes((train / '00000.png').read_bytes()[:200])  # truncated
    splits = data.load_data(hparams('ffhq1024', tmp_path))
    with pytest.raises(UserError, match='00001.png: cannot decode'):
        splits.train[np.array([0, 1])]
    (train / 'notes.txt').write_text('x')
    expect_user_error(hparams('ffhq1024', tmp_path), 'notes.txt', 'only .png image files')


def test_check_command_prints_split_sizes(tmp_path):
    np.save(tmp_path / 'imagenet32-train.npy', np.zeros((5010, 32, 32, 3), np.uint8))
    np.save(tmp_path / 'imagenet32-valid.npy', np.zeros((3, 32, 32, 3), np.uint8))
    out = subprocess.run([sys.executable, 'files_to_npy.py', 'check', '--hps', 'imagenet32', '--data_root',
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and '5000 images' in out.stdout and '10 images' in out.stdout
    out = subprocess.run([sys.executable, 'files_to_npy.py', 'check', '--hps', 'cifar10', '--data_root',
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith('error: ') and 'setup_cifar10.sh' in out.stderr
