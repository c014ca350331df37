"""Hyperparameters and checkpoint loading: presets, strictness, the release's sharp edges."""
import argparse

import pytest
import torch

from conftest import load_tiny, ref
from hps import (DEFAULT_PRESET, HPARAMS_REGISTRY, Hyperparams, UserError, add_vae_arguments, get_hparams,
                 parse_args_and_update_hparams)
from checkpoints import load_state_dict_file, restore_params


def test_release_defaults_and_preset_chain():
    H = get_hparams(['--hps', 'cifar10'])
    assert (H.width, H.zdim, H.n_batch, H.lr, H.wd, H.warmup_iters, H.ema_rate) == (384, 16, 16, 2e-4, 0.01, 100, 0.9999)
    assert (H.grad_clip, H.skip_threshold, H.num_mixtures, H.image_size, H.image_channels) == (200, 400, 10, 32, 3)
    assert (H.adam_beta1, H.adam_beta2, H.iters_per_ckpt, H.iters_per_save, H.seed) == (0.9, 0.9, 25000, 10000, 0)
    H = get_hparams(['--hps', 'ffhq1024'])  # inherits through imagenet32 -> imagenet64 -> ffhq256
    assert (H.width, H.lr, H.grad_clip, H.skip_threshold, H.num_mixtures, H.n_batch) == (16, 7e-5, 360, 500, 2, 1)
    assert (H.epochs_per_eval, H.num_images_visualize, H.num_temperatures_visualize, H.ema_rate) == (1, 1, 4, 0.999)
    assert H.data_root == './ffhq_images1024x1024' and H.dataset == 'ffhq_1024' and H.image_size == 1024
    H = get_hparams(['--hps', 'ffhq256'])
    assert (H.num_images_visualize, H.num_variables_visualize, H.num_temperatures_visualize) == (2, 3, 1)
    assert (H.grad_clip, H.skip_threshold) == (130, 180)


def test_order_defaults_presets_flags():
    H = get_hparams(['--hps', 'cifar10,imagenet32', '--width', '128'])
    assert H.width == 128 and H.n_batch == 8 and H.dataset == 'imagenet32'


def test_no_hps_gives_the_default_preset():
    H = get_hparams([])
    assert H.hparam_sets == DEFAULT_PRESET and H.dataset == 'fashion_mnist' and H.image_channels == 1


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(UserError) as e:
        get_hparams(['--hps', 'cifar100'])
    assert 'cifar100' in str(e.value) and all(name in str(e.value) for name in HPARAMS_REGISTRY)


def test_preset_key_that_is_not_an_argument_is_an_error():
    HPARAMS_REGISTRY['_bad'] = Hyperparams(widht=3)
    try:
        with pytest.raises(UserError, match="'widht'"):
            get_hparams(['--hps', '_bad'])
    finally:
        del HPARAMS_REGISTRY['_bad']


def test_unknown_key_is_an_error_not_none():
    H = get_hparams([])
    with pytest.raises(AttributeError, match='no key'):
        H.widht


def test_release_api_names():
    parser = argparse.ArgumentParser()
    add_vae_arguments(parser)
    H = parse_args_and_update_hparams(Hyperparams(), parser, ['--hps', 'imagenet64'])
    assert H.dataset == 'imagenet64'


def test_module_prefix_is_stripped(tmp_path):
    H, model, *_ = load_tiny()
    sd = torch.load(ref('tiny32', 'model.th'), weights_only=True)
    torch.save({'module.' + k: v for k, v in sd.items()}, tmp_path / 'ddp-model.th')
    assert list(load_state_dict_file(str(tmp_path / 'ddp-model.th'))) == list(sd)
    restore_params(model, str(tmp_path / 'ddp-model.th'), H)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


def test_wrong_checkpoint_names_its_preset():
    from hps import preset
    from vae import VAE
    with torch.device('meta'):
        sd = VAE(preset('imagenet32')).state_dict()
    H = preset('cifar10')
    with torch.device('meta'):
        model = VAE(H)
    from checkpoints import describe_mismatch
    msg = describe_mismatch(model, sd, 'f.th', H)
    assert "'imagenet32' preset" in msg and 'Shape differs' in msg


def test_naming_the_preset_of_a_file_builds_only_the_preset_that_fits(monkeypatch):
    """describe_mismatch is an error path, so guessing the file's preset stays cheap: no model
    is built for a preset whose block counts or input and output convolutions differ from the
    file's (every preset's model was built), and the one that fits is built once."""
    import checkpoints
    import vae
    from hps import preset
    H = preset('cifar10')
    with torch.device('meta'):
        model = vae.VAE(H)
        of_no_preset = vae.VAE(preset('fashion_mnist', width=16, zdim=2)).state_dict()
        of_imagenet32 = vae.VAE(preset('imagenet32')).state_dict()
    monkeypatch.setattr(checkpoints, '_SHAPES', {}, raising=False)  # nothing built before
    built, init = [], vae.VAE.__init__

    def counted(self, H):
        built.append(H.hparam_sets)
        init(self, H)
    monkeypatch.setattr(vae.VAE, '__init__', counted)
    assert 'looks like' not in checkpoints.describe_mismatch(model, of_no_preset, 'f.th', H) and built == []
    for _ in range(2):
        assert "'imagenet32' preset" in checkpoints.describe_mismatch(model, of_imagenet32, 'f.th', H)
    assert built == ['imagenet32']
