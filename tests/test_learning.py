"""It learns: a few minutes of progressive training on coloured shapes brings the generated images'
statistics at least twice as close to the real ones as they were at initialisation."""

import os

import numpy as np
import pytest

import dataset_tool
import misc
import tfutil
from test_train import shapes_images
from tf_compat import tf
from train_helpers import run_dirs, run_train, write_config

pytestmark = pytest.mark.slow

NETS = dict(fmap_base=128, fmap_max=64)


def image_statistics(images):
    """Per image: the mean and the spread of each colour channel (NCHW, any range -> [0, 255])."""
    x = images.astype(np.float64).reshape(len(images), 3, -1)
    return np.concatenate([x.mean(axis=2), x.std(axis=2)], axis=1)


def distribution_distance(fakes, reals):
    """How far apart the two sets' per-image statistics are: mean and spread of each statistic."""
    f, r = image_statistics(fakes), image_statistics(reals)
    return np.abs(f.mean(0) - r.mean(0)).sum() + np.abs(f.std(0) - r.std(0)).sum()


def generate(Gs, count, seed):
    latents = np.random.RandomState(seed).randn(count, *Gs.input_shape[1:]).astype(np.float32)
    labels = np.zeros([count, 0], np.float32)
    return Gs.run(latents, labels, minibatch_size=64, out_mul=127.5, out_add=127.5, out_dtype=np.uint8)


def test_training_halves_the_distance_to_the_reals(tmp_path):
    reals = shapes_images(512, 16, seed=1)
    data = str(tmp_path / 'shapes')
    dataset_tool.write_tfrecords(data, reals)
    results = tmp_path / 'results'
    config = write_config(
        tmp_path / 'learn.py', results, dict(tfrecord_dir=data), desc='learn',
        train=dict(total_kimg=24, network_snapshot_ticks=100, image_snapshot_ticks=100, mirror_augment=True,
                   G_smoothing=0.99),   # Short phases: Gs must follow G within a phase.
        G=dict(latent_size=64, **NETS), D=NETS,
        sched=dict(lod_training_kimg=4, lod_transition_kimg=4, minibatch_base=16, tick_kimg_base=4))
    run_train(config, timeout=900)
    [run_dir] = run_dirs(results)

    with tf.Graph().as_default(), tfutil.create_session().as_default():
        initial = tfutil.Network('G', func='networks.G_paper', num_channels=3, resolution=16, label_size=0,
                                 latent_size=64, **NETS)
        before = distribution_distance(generate(initial, 512, seed=2), reals)
    with tf.Graph().as_default(), tfutil.create_session().as_default():
        _, _, Gs = misc.load_pkl(os.path.join(run_dir, 'network-final.pkl'))
        after = distribution_distance(generate(Gs, 512, seed=2), reals)
    print('distance before %.1f, after %.1f' % (before, after))
    assert after <= before / 2
