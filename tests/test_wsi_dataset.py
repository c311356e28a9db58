"""dataset.WSIDataset: slide patches and CSV labels reaching TensorFlow minibatches, LOD changes
taking effect at once, and a short training run on slides through two LODs."""

import os

import numpy as np
import PIL.Image
import pytest

import dataset
import tfutil
from conftest import write_slide
from train_helpers import run_dirs, run_train, tick_lines, write_config

TINTS = {'s1.tif': (1.25, 0.7, 0.7), 's2.tif': (0.7, 1.25, 0.7), 's3.tif': (0.7, 0.7, 1.25)}
CLASSES = {'s1.tif': 'tumour', 's2.tif': 'normal', 's3.tif': 'stroma'}     # Sorted: normal, stroma, tumour.


@pytest.fixture(scope='module')
def tinted_slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp('slides')
    for index, (name, tint) in enumerate(TINTS.items()):
        write_slide(folder / name, width=1024, height=768, tint=tint, seed=index)
    with open(folder / 'labels.csv', 'wt') as file:
        file.write('slide,class\n' + ''.join('%s,%s\n' % (name, CLASSES[name]) for name in reversed(list(TINTS))))
    return str(folder)


def dominant_channel(images):
    return images.reshape(len(images), 3, -1).astype(np.float64).mean(axis=2).argmax(axis=1)


def test_labels_from_csv_reach_the_minibatches_in_onehot_order(tf_session, tinted_slides, tmp_path):
    wsi_set = dataset.WSIDataset(tinted_slides, wsi_ext='.tif', resolution=16, downsample=8,
                                 label_file='labels.csv', max_label_size='full', mask_cache_dir=str(tmp_path))
    assert wsi_set.label_size == 3 and wsi_set.shape == [3, 16, 16]
    images_tf, labels_tf = wsi_set.get_minibatch_tf()
    wsi_set.configure(16, 0)
    images, labels = tfutil.run([images_tf, labels_tf])
    assert images.dtype == np.uint8 and images.shape == (16, 3, 16, 16)
    assert labels.dtype == np.float32 and labels.shape == (16, 3)
    assert np.array_equal(labels.sum(axis=1), np.ones(16))
    # Class index by sorted class name: normal (green slide) 0, stroma (blue) 1, tumour (red) 2.
    expected_class = {0: 2, 1: 0, 2: 1}       # dominant channel -> class index
    assert [expected_class[c] for c in dominant_channel(images)] == list(labels.argmax(axis=1))
    random_labels = tfutil.run(wsi_set.get_random_labels_tf(64))
    assert random_labels.shape == (64, 3) and set(random_labels.argmax(axis=1)) == {0, 1, 2}
    wsi_set.close()


def test_a_new_lod_takes_effect_at_the_next_run(tf_session, tinted_slides, tmp_path):
    wsi_set = dataset.WSIDataset(tinted_slides, wsi_ext='.tif', resolution=16, downsample=8,
                                 mask_cache_dir=str(tmp_path))
    images_tf, labels_tf = wsi_set.get_minibatch_tf()
    wsi_set.configure(8, 0)
    assert tfutil.run(images_tf).shape == (8, 3, 16, 16)
    wsi_set.configure(4, 1.5)                   # floor(1.5) = LOD 1: 8x8 patches, 4 of them.
    assert tfutil.run(images_tf).shape == (4, 3, 8, 8)
    assert tfutil.run(labels_tf).shape == (4, 0)
    wsi_set.configure(8, 2)
    assert tfutil.run(images_tf).shape == (8, 3, 4, 4)
    # Read-ahead is bounded in minibatches too, not only in megabytes (tiny at 4x4): at most
    # MAX_READ_AHEAD_MINIBATCHES of them queued behind the one taken, a chunk per reader each.
    readers = wsi_set.sampler._pool.workers
    assert sum(reader.pending for reader in readers) <= dataset.MAX_READ_AHEAD_MINIBATCHES * len(readers)
    wsi_set.close()


@pytest.mark.slow
def test_training_on_slides_passes_through_two_lods(tinted_slides, tmp_path):
    results = tmp_path / 'results'
    config = write_config(
        tmp_path / 'slides.py', results, desc='slides',
        dataset=dict(class_name='dataset.WSIDataset', tfrecord_dir=tinted_slides, wsi_ext='.tif', resolution=8,
                     downsample=8, mask_cache_dir=str(tmp_path / 'masks'), augment=0.5),
        train=dict(total_kimg=1.0, mirror_augment=True),
        sched=dict(lod_training_kimg=0.25, lod_transition_kimg=0.25, tick_kimg_base=0.25))
    run_train(config)
    [run_dir] = run_dirs(results)
    lods = [lod for _, lod in tick_lines(run_dir)]
    assert lods[0] == 1.0 and lods[-1] == 0.0 and any(0.0 < lod < 1.0 for lod in lods)
    assert os.path.isfile(os.path.join(run_dir, 'network-final.pkl'))
    reals = np.asarray(PIL.Image.open(os.path.join(run_dir, 'reals.png')), np.float64)
    augmented = np.asarray(PIL.Image.open(os.path.join(run_dir, 'reals-augmented.png')), np.float64)
    assert augmented.shape == reals.shape and np.abs(augmented - reals).mean() > 1
    assert sorted(os.listdir(os.path.join(run_dir, 'slide-overviews'))) == [
        'overview-000-s1.tif.png', 'overview-001-s2.tif.png', 'overview-002-s3.tif.png']


def test_wrong_settings_say_what_to_change(tf_session, tinted_slides, tmp_path):
    with pytest.raises(ValueError, match='max_label_size'):
        dataset.WSIDataset(tinted_slides, wsi_ext='.tif', resolution=16, max_label_size='all')
    wsi_set = dataset.WSIDataset(tinted_slides, wsi_ext='.tif', resolution=16, downsample=8,
                                 mask_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r'LODs 0\.\.2 .*LOD 3 is outside'):
        wsi_set.configure(4, 3)
    wsi_set.close()
