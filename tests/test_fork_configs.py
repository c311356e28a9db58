"""Configs of the WSI-ProGAN fork run unchanged: a dataset line without class_name reads a folder of
slides as WSIDataset (and a folder of TFRecords as before), and the fork's .npy label file gives
each slide its class in sorted file-name order."""

import os

import numpy as np
import pytest

import checks
import dataset
import dataset_tool
import tfutil
from conftest import write_slide
from train_helpers import run_dirs, run_train, tick_lines, write_config

# Written in this order; sorted by file name they are a, b, c. Each slide's tint makes one colour
# channel dominate, so a patch shows which slide it came from.
TINTS = {'b.svs': (1.25, 0.7, 0.7), 'c.svs': (0.7, 0.7, 1.25), 'a.svs': (0.7, 1.25, 0.7)}
CLASS_OF_SORTED = [2, 0, 1]                     # The fork's .npy rows: a -> 2, b -> 0, c -> 1.
CLASS_OF_CHANNEL = {0: 0, 1: 2, 2: 1}           # Red is b, green is a, blue is c.


@pytest.fixture(scope='module')
def fork_slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp('fork_slides')
    for index, (name, tint) in enumerate(TINTS.items()):
        write_slide(folder / name, width=1024, height=768, tint=tint, seed=index)
    np.save(folder / 'labels.npy', np.eye(3, dtype=np.float32)[CLASS_OF_SORTED])
    np.save(folder / 'indices.npy', np.array(CLASS_OF_SORTED, np.int64))
    return str(folder)


def dominant_channel(images):
    return images.reshape(len(images), 3, -1).astype(np.float64).mean(axis=2).argmax(axis=1)


def test_a_dataset_line_without_class_name_reads_slides_and_says_so(fork_slides, tmp_path, capsys):
    data = dataset.load_dataset(data_dir=os.path.dirname(fork_slides), tfrecord_dir=os.path.basename(fork_slides),
                                resolution=16, downsample=8, mask_cache_dir=str(tmp_path))
    assert isinstance(data, dataset.WSIDataset) and len(data.sampler.slides) == 3
    data.close()
    said = [line for line in capsys.readouterr().out.splitlines() if 'class_name' in line]
    assert said == ['dataset.class_name not set: "%s" holds slides and no *.tfrecords, so it is read as '
                    'dataset.WSIDataset' % fork_slides]
    checks.check_dataset(dict(tfrecord_dir=fork_slides), data_dir=None)     # The pre-flight check agrees.


def test_a_dataset_line_without_class_name_still_reads_tfrecords(tf_session, tmp_path, capsys):
    images = np.random.RandomState(0).randint(0, 256, [4, 3, 8, 8], dtype=np.uint8)
    dataset_tool.write_tfrecords(str(tmp_path / 'records'), images)
    data = dataset.load_dataset(tfrecord_dir=str(tmp_path / 'records'))
    assert isinstance(data, dataset.TFRecordDataset) and data.shape == [3, 8, 8]
    data.close()
    assert 'class_name' not in capsys.readouterr().out
    checks.check_dataset(dict(tfrecord_dir=str(tmp_path / 'records')), data_dir=None)


def test_a_folder_with_neither_names_both(tmp_path):
    (tmp_path / 'notes.txt').write_text('no data here')
    both = r'neither \*\.tfrecords files .* nor slides with extension \.svs'
    with pytest.raises(ValueError, match=both):
        dataset.load_dataset(tfrecord_dir=str(tmp_path))
    with pytest.raises(checks.ConfigError, match=both):
        checks.check_dataset(dict(tfrecord_dir=str(tmp_path)), data_dir=None)


@pytest.mark.parametrize('label_file', ['labels.npy', 'indices.npy'])
def test_npy_labels_are_one_row_per_slide_in_sorted_file_name_order(tf_session, fork_slides, tmp_path, label_file):
    data = dataset.load_dataset(tfrecord_dir=fork_slides, resolution=16, downsample=8, label_file=label_file,
                                max_label_size='full', mask_cache_dir=str(tmp_path))
    assert data.label_size == 3
    assert {os.path.basename(s.path): s.class_index for s in data.sampler.slides} == {'a.svs': 2, 'b.svs': 0, 'c.svs': 1}
    images_tf, labels_tf = data.get_minibatch_tf()
    data.configure(24, 0)
    images, labels = tfutil.run([images_tf, labels_tf])
    data.close()
    np.testing.assert_array_equal(labels.argmax(axis=1), [CLASS_OF_CHANNEL[c] for c in dominant_channel(images)])
    np.testing.assert_array_equal(labels.sum(axis=1), 1)


def test_npy_labels_that_do_not_fit_say_why(fork_slides, tmp_path):
    short = tmp_path / 'short.npy'
    np.save(short, np.eye(3)[:2])
    with pytest.raises(ValueError, match=r'short\.npy has 2 rows but there are 3 slides'):
        dataset.WSIDataset(fork_slides, resolution=16, downsample=8, label_file=str(short), max_label_size='full',
                           mask_cache_dir=str(tmp_path))
    soft = tmp_path / 'soft.npy'
    np.save(soft, np.full([3, 2], 0.5))
    with pytest.raises(ValueError, match=r'soft\.npy: a \.npy label file holds one-hot rows or non-negative class'):
        dataset.WSIDataset(fork_slides, resolution=16, downsample=8, label_file=str(soft), max_label_size='full',
                           mask_cache_dir=str(tmp_path))


@pytest.mark.slow
def test_a_fork_config_trains_through_two_lods(fork_slides, tmp_path):
    results = tmp_path / 'results'
    config = write_config(
        tmp_path / 'fork.py', results, desc='fork', data_dir=os.path.dirname(fork_slides),
        dataset=dict(tfrecord_dir=os.path.basename(fork_slides), label_file='labels.npy', max_label_size='full',
                     resolution=8, downsample=8, mask_cache_dir=str(tmp_path / 'masks')),
        train=dict(total_kimg=1.0),
        sched=dict(lod_training_kimg=0.25, lod_transition_kimg=0.25, tick_kimg_base=0.25))
    output = run_train(config).stdout
    assert 'so it is read as dataset.WSIDataset' in output and 'Label size    = 3' in output
    [run_dir] = run_dirs(results)
    lods = [lod for _, lod in tick_lines(run_dir)]
    assert lods[0] == 1.0 and lods[-1] == 0.0 and any(0.0 < lod < 1.0 for lod in lods)
    assert os.path.isfile(os.path.join(run_dir, 'network-final.pkl'))


def test_the_forks_config_with_its_active_generate_fake_images_line_fails_before_tensorflow(fork_slides, tmp_path):
    import subprocess
    import sys
    from train_helpers import REPO
    results = tmp_path / 'results'
    (results / '003-earlier-run').mkdir(parents=True)
    config = write_config(tmp_path / 'fork.py', results, desc='fork', data_dir=os.path.dirname(fork_slides),
                          dataset=dict(tfrecord_dir=os.path.basename(fork_slides), resolution=8, downsample=8))
    with open(config, 'a') as f:      # as the fork ships it: a utility line left active at the end
        f.write("train = EasyDict(func='util_scripts.generate_fake_images', run_id=10, num_pngs=1000); num_gpus = 1; "
                "desc = 'fake-images-' + str(train.run_id)\n")
    result = subprocess.run([sys.executable, '-X', 'importtime', 'train.py', config], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'Configuration error: train.run_id = 10 (for util_scripts.generate_fake_images) names no run' in result.stderr
    assert '003-earlier-run' in result.stderr
    assert 'import time:' in result.stderr and '| tensorflow\n' not in result.stderr   # failed before TensorFlow loaded
