"""Your own images: preparation (formats, modes, EXIF, the resize rule, splits, storage, re-runs),
the images presets, training on 32x32 RGB and 28x28 grayscale, every tool from the run folder,
2 processes equal 1, and one-line errors for bad input."""
import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import data
import hps
import images_to_npy
from checkpoints import data_fingerprint
from hps import UserError, get_hparams
from test_train import ROOT, free_port, log_lines, run, state_dict, train_losses

FAST = ['--no_progress', '--threads', '1', '--iters_per_print', '1', '--iters_per_images', '100000']


def smooth(rng, h, w, c=3):
    """A smooth random picture (so that resizing it is not a no-op on noise), uint8 (h, w, c)."""
    small = rng.randint(0, 256, (max(2, h // 8), max(2, w // 8), c)).astype(np.uint8)
    big = Image.fromarray(small if c > 1 else small[..., 0]).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(big).reshape(h, w, c) // 2 + rng.randint(0, 128, (h, w, c)).astype(np.uint8)


def make_source(folder, n_plain=36, seed=0):
    """A folder as cameras and the web make them: plain PNGs of odd sizes and aspect ratios (some
    nested), an RGBA PNG, a palette PNG with a transparent colour, a JPEG with an EXIF orientation,
    WebP, BMP, a 16-bit grayscale TIFF, a CMYK TIFF, a two-frame GIF, an image smaller than 32, a
    truncated JPEG, a text file and a duplicate."""
    rng = np.random.RandomState(seed)
    os.makedirs(os.path.join(folder, 'nested', 'deeper'), exist_ok=True)
    for i in range(n_plain):
        h, w = rng.randint(32, 90, 2)
        sub = ['', 'nested/', 'nested/deeper/'][i % 3]
        Image.fromarray(smooth(rng, h, w)).save(os.path.join(folder, f'{sub}plain{seed}-{i}.png'))
    Image.fromarray(np.concatenate([smooth(rng, 40, 50), rng.randint(0, 256, (40, 50, 1)).astype(np.uint8)], 2),
                    'RGBA').save(os.path.join(folder, 'rgba.png'))
    pal = Image.fromarray(smooth(rng, 45, 33)).convert('P', palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(os.path.join(folder, 'nested', 'palette.png'), transparency=0)
    photo = Image.fromarray(smooth(rng, 40, 64))  # 64 wide, 40 high; shown rotated: 40 wide, 64 high
    exif = photo.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    photo.save(os.path.join(folder, 'photo.jpg'), exif=exif, quality=95)
    Image.fromarray(smooth(rng, 36, 48)).save(os.path.join(folder, 'web.webp'))
    Image.fromarray(smooth(rng, 33, 35)).save(os.path.join(folder, 'nested', 'old.bmp'))
    Image.fromarray((smooth(rng, 40, 40, 1)[..., 0].astype(np.uint16) * 257 + 100)).save(
        os.path.join(folder, 'gray16.tif'))
    Image.fromarray(smooth(rng, 38, 52)).convert('CMYK').save(os.path.join(folder, 'print.tif'))
    frames = [Image.fromarray(smooth(rng, 40, 44)).convert('P') for _ in range(2)]
    frames[0].save(os.path.join(folder, 'nested', 'deeper', 'anim.gif'), save_all=True, append_images=frames[1:])
    Image.fromarray(smooth(rng, 20, 30)).save(os.path.join(folder, 'small.png'))
    with open(os.path.join(folder, 'photo.jpg'), 'rb') as f:
        jpeg = f.read()
    with open(os.path.join(folder, 'broken.jpg'), 'wb') as f:
        f.write(jpeg[:len(jpeg) // 3])
    with open(os.path.join(folder, 'notes.txt'), 'w') as f:
        f.write('not a picture\n')
    shutil.copy(os.path.join(folder, f'plain{seed}-0.png'), os.path.join(folder, 'nested', 'copy.png'))


def prepare(src, root, *flags):
    return images_to_npy.main(['prepare', str(src), str(root), '--no_progress', '--workers', '2', *flags])


@pytest.fixture(scope='session')
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp('pictures')
    make_source(str(folder))
    return str(folder)


@pytest.fixture(scope='session')
def rgb32(source, tmp_path_factory):
    root = tmp_path_factory.mktemp('rgb32')
    prepare(source, root, '--size', '32')
    return str(root)


@pytest.fixture(scope='session')
def gray28(source, tmp_path_factory):
    root = tmp_path_factory.mktemp('gray28')
    prepare(source, root, '--size', '28', '--channels', '1')
    return str(root)


def manifest(root):
    with open(os.path.join(root, 'images', 'manifest.json')) as f:
        return json.load(f)


def row_of(root, path):
    entry = next(f for f in manifest(root)['files'] if f['path'] == path)
    return np.load(os.path.join(root, 'images', f"{entry['split']}.npy"))[entry['row']]


# ----------------------------------------------------------------------------- preparation

def test_every_format_is_read_and_bad_files_are_skipped_and_named(source, rgb32, tmp_path, capsys):
    m = manifest(rgb32)
    kept = {f['path']: f for f in m['files']}
    for name in ['rgba.png', 'nested/palette.png', 'photo.jpg', 'web.webp', 'nested/old.bmp', 'gray16.tif',
                 'print.tif', 'nested/deeper/anim.gif', 'nested/deeper/plain0-2.png']:
        assert name in kept, name
    assert kept['gray16.tif']['mode'] == 'I;16' and kept['print.tif']['mode'] == 'CMYK'
    reasons = {s['path']: s['reason'] for s in m['skipped']}
    assert reasons['notes.txt'] == 'not an image'
    assert reasons['broken.jpg'].startswith('unreadable')
    assert reasons['small.png'].startswith('smaller than --size 32')
    assert reasons['plain0-0.png'].startswith('duplicate of nested/copy.png')  # the first by path is kept
    assert len(reasons) == 4 and m['counts'] == dict(files=48, kept=44, skipped=4, upscaled=0)
    assert sum(s['n'] for s in m['splits'].values()) == 44 and m['image_shape'] == [32, 32, 3]
    # the summary: one line naming every skipped file and what the rule did with the small one
    prepare(source, tmp_path, '--size', '32')
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and all(n in out[0] for n in reasons) and '--upscale' in out[0]
    # --upscale keeps the small image, resized up, and says so
    prepare(source, tmp_path / 'up', '--size', '32', '--upscale')
    line = capsys.readouterr().out
    up = manifest(tmp_path / 'up')
    assert up['counts']['upscaled'] == 1 and '1 smaller than 32 upscaled' in line
    assert next(f for f in up['files'] if f['path'] == 'small.png')['upscaled']


def expected(path, size, channels):
    """The documented rule, written out with Pillow directly: EXIF orientation, 16-bit scaled by
    1/257, transparency on white, then ImageOps.fit (the centred square, Lanczos)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode == 'I;16':
            im = Image.fromarray(np.round(np.asarray(im) / 257.).astype(np.uint8))
        if im.mode in ('RGBA', 'P'):
            rgba = im.convert('RGBA')
            white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, rgba)
        im = im.convert('L' if channels == 1 else 'RGB')
        return np.asarray(ImageOps.fit(im, (size, size), Image.Resampling.LANCZOS)).reshape(size, size, channels)


@pytest.mark.parametrize('name', ['nested/deeper/plain0-2.png', 'rgba.png', 'nested/palette.png', 'photo.jpg',
                                  'gray16.tif', 'print.tif', 'nested/deeper/anim.gif'])
def test_pixels_are_the_documented_resize(source, rgb32, gray28, name):
    for root, size, channels in ((rgb32, 32, 3), (gray28, 28, 1)):
        np.testing.assert_array_equal(row_of(root, name), expected(os.path.join(source, name), size, channels))


def test_a_photo_is_turned_as_its_exif_orientation_says(source, rgb32):
    with Image.open(os.path.join(source, 'photo.jpg')) as im:
        unturned = np.asarray(ImageOps.fit(im.convert('RGB'), (32, 32), Image.Resampling.LANCZOS))
    row = row_of(rgb32, 'photo.jpg')
    assert np.abs(row.astype(int) - unturned).mean() > 10  # not the file's raw pixel order
    assert next(f for f in manifest(rgb32)['files'] if f['path'] == 'photo.jpg')['source_size'] == [64, 40]


def test_transparency_is_composited_on_white(tmp_path):
    folder = tmp_path / 'src'
    os.makedirs(folder)
    for i in range(3):
        Image.new('RGBA', (8, 8), (10 * i, 0, 0, 0)).save(folder / f'clear{i}.png')  # fully transparent
    prepare(folder, tmp_path / 'root', '--size', '8')
    for split in data.SPLIT_NAMES:
        assert (np.load(tmp_path / 'root' / 'images' / f'{split}.npy') == 255).all()


def test_split_is_by_content_deterministic_and_stable_when_images_are_added(source, rgb32, tmp_path):
    m = manifest(rgb32)
    for f in m['files']:
        with open(os.path.join(source, f['path']), 'rb') as fh:
            sha = hashlib.sha256(fh.read()).hexdigest()
        u = int(sha[:16], 16) / 2 ** 64
        if f['split_rule'] == 'hash':
            assert f['split'] == ('train' if u < 0.9 else 'valid' if u < 0.95 else 'test'), f['path']
    # the same folder again: the same dataset, row for row
    prepare(source, tmp_path / 'again', '--size', '32')
    for split in data.SPLIT_NAMES:
        np.testing.assert_array_equal(np.load(tmp_path / 'again' / 'images' / f'{split}.npy'),
                                      np.load(os.path.join(rgb32, 'images', f'{split}.npy')))
    # more images: no old one changes split
    bigger = tmp_path / 'bigger'
    shutil.copytree(source, bigger)
    make_source(str(bigger / 'more'), n_plain=30, seed=1)
    prepare(bigger, tmp_path / 'big', '--size', '32')
    old = {f['path']: f['split'] for f in m['files'] if f['split_rule'] == 'hash'}
    new = {f['path']: f['split'] for f in manifest(tmp_path / 'big')['files']}
    assert len(new) > len(m['files']) + 30 and len(old) >= len(m['files']) - 2
    assert all(new[p] == s for p, s in old.items())  # (an image the fallback put in an empty split may go back)


def test_tiny_folder_gets_every_split_and_presplit_folders_are_kept(tmp_path, capsys):
    rng = np.random.RandomState(3)
    tiny = tmp_path / 'tiny'
    os.makedirs(tiny)
    for i in range(3):
        Image.fromarray(smooth(rng, 16, 16)).save(tiny / f'{i}.png')
    prepare(tiny, tmp_path / 'tiny_root', '--size', '16')
    assert {s: v['n'] for s, v in manifest(tmp_path / 'tiny_root')['splits'].items()} == \
        dict(train=1, valid=1, test=1)
    split = tmp_path / 'split'
    for name, n in (('train', 5), ('valid', 2), ('test', 3)):
        os.makedirs(split / name / 'sub')
        for i in range(n):
            Image.fromarray(smooth(rng, 20, 24)).save(split / name / 'sub' / f'{i}.png')
    Image.fromarray(smooth(rng, 20, 24)).save(split / 'stray.png')
    prepare(split, tmp_path / 'split_root', '--size', '16', '--channels', '1')
    m = manifest(tmp_path / 'split_root')
    assert {s: v['n'] for s, v in m['splits'].items()} == dict(train=5, valid=2, test=3)
    assert all(f['split'] == f['path'].split('/')[0] for f in m['files'])
    assert m['skipped'][0]['path'] == 'stray.png' and 'outside' in m['skipped'][0]['reason']
    shutil.rmtree(split / 'valid')
    with pytest.raises(SystemExit) as e:
        prepare(split, tmp_path / 'split_root2', '--size', '16')
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and 'no valid/' in err


def test_large_images_are_stored_as_png_folders_with_the_same_pixels(source, rgb32, tmp_path):
    prepare(source, tmp_path, '--size', '32', '--storage', 'png')
    m = manifest(tmp_path)
    assert m['storage'] == 'png' and not os.path.exists(tmp_path / 'images' / 'train.npy')
    as_png = data.load_images(str(tmp_path), (32, 3))
    as_npy = data.load_images(rgb32, (32, 3))
    for a, b in zip(as_png, as_npy):
        np.testing.assert_array_equal(a[np.arange(len(a))], b[np.arange(len(b))])
    auto = argparse.Namespace(src='x', channels=3, bits=8, storage='auto', upscale=False)
    assert [images_to_npy.options_of(argparse.Namespace(size=s, **vars(auto)))['storage'] for s in (256, 512)] == \
        ['npy', 'png']


def test_normalisation_is_the_train_splits_pixel_mean_and_std(rgb32):
    m = manifest(rgb32)
    train = np.load(os.path.join(rgb32, 'images', 'train.npy')).astype(np.float64)
    assert m['normalization']['mean'] == pytest.approx(train.mean(), rel=1e-12)
    assert m['normalization']['std'] == pytest.approx(train.std(), rel=1e-12)
    H = get_hparams(['--hps', 'images', '--data_root', rgb32])
    x = torch.from_numpy(np.load(os.path.join(rgb32, 'images', 'valid.npy')))
    x_in, x_target = data.preprocess(H, x)
    np.testing.assert_allclose(x_in.numpy(), (x.numpy() - train.mean()) / train.std(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_target.numpy(), (x.numpy() - 127.5) / 127.5, atol=1e-6)


def test_five_bit_targets_and_bins(source, tmp_path):
    prepare(source, tmp_path, '--size', '16', '--bits', '5')
    H = get_hparams(['--hps', 'images_quick', '--data_root', str(tmp_path)])
    assert H.image_bits == 5 and hps.low_bit_targets(H)
    x = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(1, 16, 16, 3).contiguous()
    _, target = data.preprocess(H, x)
    np.testing.assert_allclose(target.numpy(), (np.floor(x.numpy() / 8) * 8 - 127.5) / 127.5, atol=1e-6)
    from vae import VAE
    assert VAE(H).decoder.out_net.low_bit


def test_rerun_does_nothing_and_other_options_are_refused(source, tmp_path, capsys):
    prepare(source, tmp_path, '--size', '16')
    path = tmp_path / 'images' / 'manifest.json'
    before = path.read_bytes(), os.stat(path).st_mtime_ns
    capsys.readouterr()
    prepare(source, tmp_path, '--size', '16')
    assert 'nothing to do' in capsys.readouterr().out and (path.read_bytes(), os.stat(path).st_mtime_ns) == before
    with pytest.raises(SystemExit) as e:
        prepare(source, tmp_path, '--size', '24')
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and '--overwrite' in err and '--size 16' in err
    assert path.read_bytes() == before[0]
    prepare(source, tmp_path, '--size', '24', '--overwrite')
    assert manifest(tmp_path)['image_shape'] == [24, 24, 3] and os.listdir(tmp_path) == ['images']


def test_an_interrupted_preparation_leaves_the_old_dataset_and_no_half_written_one(source, tmp_path, monkeypatch):
    prepare(source, tmp_path, '--size', '16')
    before = (tmp_path / 'images' / 'manifest.json').read_bytes()
    real = images_to_npy.atomic_write

    def interrupted(path):
        if path.endswith(data.MANIFEST):
            raise KeyboardInterrupt  # Ctrl-C just before the manifest, the last file
        return real(path)
    monkeypatch.setattr(images_to_npy, 'atomic_write', interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, tmp_path, '--size', '16', '--channels', '1', '--overwrite')
    assert os.listdir(tmp_path) == ['images'] and (tmp_path / 'images' / 'manifest.json').read_bytes() == before
    with pytest.raises(KeyboardInterrupt):
        prepare(source, tmp_path / 'fresh', '--size', '16')
    assert not os.path.exists(tmp_path / 'fresh')


def test_the_data_fingerprint_sees_an_image_the_sampled_rows_miss(source, tmp_path):
    changed = tmp_path / 'src'
    shutil.copytree(source, changed)
    prepare(source, tmp_path / 'a', '--size', '32')
    m = manifest(tmp_path / 'a')
    n = m['splits']['train']['n']
    sampled = set(np.linspace(0, n - 1, min(n, 16)).astype(int))
    victim = next(f for f in m['files'] if f['split'] == 'train' and f['row'] not in sampled
                  and f['path'].startswith('nested/deeper/plain'))  # (not a file another one duplicates)
    with Image.open(changed / victim['path']) as im:  # the same size, other pixels
        other = Image.fromarray(255 - np.asarray(im.convert('RGB')))
    for attempt in range(50):  # another image that lands in train too, at the same row (same path)
        other.putpixel((0, 0), (attempt, 0, 0))
        buf = io.BytesIO()
        other.save(buf, format='PNG')
        if images_to_npy.content_split(hashlib.sha256(buf.getvalue()).hexdigest())[0] == 'train':
            break
    (changed / victim['path']).write_bytes(buf.getvalue())
    prepare(changed, tmp_path / 'b', '--size', '32')
    a, b = data.load_images(str(tmp_path / 'a'), (32, 3)), data.load_images(str(tmp_path / 'b'), (32, 3))
    assert len(a.train) == len(b.train)
    assert data_fingerprint(a.train)[:2] == data_fingerprint(b.train)[:2]  # the sampled rows alone miss it
    assert data_fingerprint(a.train) != data_fingerprint(b.train)


# ----------------------------------------------------------------------------- presets

def test_images_blocks_reproduce_the_release_and_derive_the_other_sizes():
    for size, name in ((32, 'cifar10'), (64, 'imagenet64'), (256, 'ffhq256'), (1024, 'ffhq1024')):
        ref = hps.HPARAMS_REGISTRY[name]
        assert hps.images_blocks(size) == (name, ref['enc_blocks'], ref['dec_blocks'])
    assert hps.images_blocks(16)[1:] == ('16x6,16d2,8x6,8d2,4x3,4d4,1x3', '1x1,4m1,4x2,8m4,8x5,16m8,16x10')
    quick = hps.HPARAMS_REGISTRY['fashion_mnist_quick']
    assert hps.images_quick_preset(28) == dict(enc_blocks=quick['enc_blocks'], dec_blocks=quick['dec_blocks'])


def test_images_presets_pass_the_checks_at_every_size_they_take(monkeypatch):
    from vae import check_hparams
    shape = {}
    monkeypatch.setattr(data, 'read_manifest', lambda root: dict(image_shape=shape['now'], bits=8,
                                                                 normalization=dict(mean=100., std=60.)))
    for size in (16, 32, 64, 128, 256, 512, 1024):
        shape['now'] = [size, size, 3]
        H = get_hparams(['--hps', 'images'])
        check_hparams(H)  # layer strings, widths (--width = the width at the image resolution)
        assert H.image_size == size and H.dataset == 'images'
        release = {32: 'cifar10', 64: 'imagenet64', 256: 'ffhq256', 1024: 'ffhq1024'}.get(size)
        if release:  # the release's preset, value for value, but for the dataset
            ref = hps.preset(release)
            assert {k: v for k, v in H.items() if k not in ('dataset', 'image_mean', 'image_std', 'data_root',
                                                            'hparam_sets')} == \
                {k: v for k, v in ref.items() if k not in ('dataset', 'image_mean', 'image_std', 'data_root',
                                                           'hparam_sets')}
    for size in (8, 28, 32, 64):
        shape['now'] = [size, size, 1]
        check_hparams(get_hparams(['--hps', 'images_quick']))


@pytest.mark.parametrize('argv, size, words', [
    (['--hps', 'images'], 28, '--size 32'),
    (['--hps', 'images_quick'], 30, '--size 28'),
    (['--dataset', 'images', '--enc_blocks', '32x2,32d2,16x2,16d16,1x1', '--dec_blocks', '1x1,16m1,32m16'], 64,
     '--size 32'),
    (['--hps', 'cifar10', '--dataset', 'images'], 64, '--size 32'),
])
def test_a_dataset_of_another_size_than_the_architecture_is_one_line(argv, size, words, monkeypatch):
    m = dict(image_shape=[size, size, 3], bits=8, normalization=dict(mean=100., std=60.))
    monkeypatch.setattr(data, 'read_manifest', lambda root: m)
    with pytest.raises(UserError) as e:
        get_hparams(argv)
    assert words in str(e.value) and '\n' not in str(e.value)


# ----------------------------------------------------------------------------- training and the tools

@pytest.fixture(scope='session')
def rgb_run(rgb32, tmp_path_factory):
    """3 steps of --hps images_quick on the 32x32 RGB images, batch 8, workers on (the default): the
    run the tools read, and what 2 processes with batch 4 must compute."""
    save_dir = tmp_path_factory.mktemp('rgb_runs')
    run(['--hps', 'images_quick', '--data_root', rgb32, '--n_batch', '8', '--max_iters', '3', '--lr', '0.003',
         '--rank_invariant_noise', '--save_dir', str(save_dir), '--desc', 'rgb'] + FAST)
    return save_dir / 'rgb'


def from_run(run_dir):
    return ['--save_dir', str(run_dir.parent), '--desc', run_dir.name]


def test_train_on_32x32_rgb_then_every_tool_from_the_run_folder(rgb32, rgb_run, tmp_path):
    import evaluate
    import sample
    import train
    with Image.open(rgb_run / 'samples-1.png') as im:  # the training sample grid
        assert im.size[0] == 32 * 3 and im.mode == 'RGB'  # the 3 validation images across
    n_test = manifest(rgb32)['splits']['test']['n']
    out = ['--out_dir', str(tmp_path)]
    # nothing but the run folder: the run's saved config names the data, its shape and normalisation
    assert train.main(['--test_eval', '--no_progress', '--num_workers', '0'] + from_run(rgb_run))['n_images'] == n_test
    sample.main(['--mode', 'uncond', '--n', '3'] + out + from_run(rgb_run))
    sample.main(['--mode', 'recon', '--indices', '0'] + out + from_run(rgb_run))
    with Image.open(tmp_path / 'uncond.png') as im:
        assert im.size == (96, 32)
    kl = evaluate.main(['--kl_stats', '--no_progress'] + out + from_run(rgb_run))
    assert kl['dataset'] == 'images' and kl['n_images'] == n_test


def test_train_on_28x28_grayscale_with_the_one_channel_head(gray28, tmp_path):
    import train
    run(['--hps', 'images_quick', '--data_root', gray28, '--n_batch', '4', '--max_iters', '2', '--save_dir',
         str(tmp_path), '--desc', 'gray'] + FAST)
    sd = state_dict(tmp_path / 'gray' / 'latest-model-ema.th')
    assert sd['decoder.out_net.out_conv.weight'].shape[0] == 5 * 3  # num_mixtures x (logit, mean, log-scale)
    assert sd['encoder.in_conv.weight'].shape[1] == 1
    stats = train.main(['--test_eval', '--no_progress', '--num_workers', '0'] + from_run(tmp_path / 'gray'))
    assert stats['n_images'] == manifest(gray28)['splits']['test']['n'] and np.isfinite(stats['elbo'])


def test_two_torchrun_processes_equal_one(rgb32, rgb_run, tmp_path):
    run(['--hps', 'images_quick', '--data_root', rgb32, '--n_batch', '4', '--max_iters', '3', '--lr', '0.003',
         '--rank_invariant_noise', '--num_workers', '0', '--save_dir', str(tmp_path), '--desc', 'two',
         '--port', str(free_port())] + FAST, launcher=['torchrun', '--standalone', '--nproc_per_node', '2'])
    assert log_lines(tmp_path / 'two', 'rank_check')[-1]['param_spread'] == 0.0
    a, b = state_dict(rgb_run / 'latest-model.th'), state_dict(tmp_path / 'two' / 'latest-model.th')
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    la, lb = train_losses(rgb_run), train_losses(tmp_path / 'two')
    np.testing.assert_allclose([la[i] for i in range(3)], [lb[i] for i in range(3)], rtol=1e-5)


# ----------------------------------------------------------------------------- bad input, one line each

def one_line(p, *words):
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1, (p.returncode, err)
    assert all(w in err for w in words), err
    return err


def test_bad_source_folders_and_data_roots_are_one_line_and_write_nothing(source, tmp_path, capsys):
    prep = os.path.join(ROOT, 'setup_images.sh')

    def setup(*args):
        return subprocess.run([prep, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    one_line(setup(tmp_path / 'nowhere', tmp_path / 'r1', '--size', '16'), 'nowhere', 'no such folder')
    junk = tmp_path / 'junk'
    os.makedirs(junk)
    (junk / 'a.txt').write_text('text')
    shutil.copy(os.path.join(source, 'broken.jpg'), junk)
    (tmp_path / 'afile').write_text('')
    for src, root, words in ((junk, tmp_path / 'r2', ['holds 0 usable images', 'a.txt', 'broken.jpg']),
                             (source, tmp_path / 'afile' / 'root', ['cannot write to', 'DATA_ROOT'])):
        with pytest.raises(SystemExit) as e:
            prepare(src, root, '--size', '16')
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert sorted(os.listdir(tmp_path)) == ['afile', 'junk']


def test_a_missing_manifest_or_a_truncated_array_is_one_line(rgb32, tmp_path):
    with pytest.raises(UserError) as e:
        get_hparams(['--hps', 'images', '--data_root', str(tmp_path)])
    assert 'manifest.json not found' in str(e.value) and './setup_images.sh' in str(e.value)
    shutil.copytree(os.path.join(rgb32, 'images'), tmp_path / 'images')
    train = tmp_path / 'images' / 'train.npy'
    train.write_bytes(train.read_bytes()[:-100])
    p = run(['--hps', 'images_quick', '--data_root', str(tmp_path), '--save_dir', str(tmp_path / 'runs')],
            check=False)
    one_line(p, 'train.npy', 'truncated')
    assert not os.path.exists(tmp_path / 'runs')


def test_a_run_whose_data_was_prepared_again_at_another_size_is_one_line(rgb_run, source, tmp_path):
    import sample
    prepare(source, tmp_path, '--size', '16')
    with pytest.raises(UserError) as e:  # the tools: the run's model takes 32x32
        sample.main(['--mode', 'grid', '--data_root', str(tmp_path), '--out_dir', str(tmp_path)] + from_run(rgb_run))
    assert '16x16x3' in str(e.value) and '--size 32' in str(e.value) and '\n' not in str(e.value)
    saved = {name: (rgb_run / name).read_bytes() for name in os.listdir(rgb_run) if name.startswith('latest-')}
    p = run(['--hps', 'images_quick', '--data_root', str(tmp_path), '--max_iters', '4', '--n_batch', '8']
            + FAST + from_run(rgb_run), check=False)  # resuming the run on them
    one_line(p, 'image_size', '--allow_changes')
    assert {name: (rgb_run / name).read_bytes() for name in saved} == saved
