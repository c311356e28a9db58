"""TFRecordDataset and SyntheticDataset: the original multi-LOD layout, labels kept with their
images through shuffling, and numpy minibatches."""

import numpy as np
import pytest

import dataset
import dataset_tool


def numbered_images(count, resolution):
    """Image i is filled with the value i (so an image tells its own index at every LOD)."""
    return np.repeat(np.arange(count, dtype=np.uint8), 3 * resolution * resolution).reshape(count, 3, resolution, resolution)


def test_tfrecords_keep_labels_with_their_images_at_every_lod(tf_session, tmp_path):
    count = 40
    labels = np.eye(count, dtype=np.float32)[:, :8] + np.arange(count, dtype=np.float32)[:, None]
    dataset_tool.write_tfrecords(str(tmp_path), numbered_images(count, 16), labels)
    records = dataset.TFRecordDataset(str(tmp_path), max_label_size='full', shuffle_mb=1)
    assert records.shape == [3, 16, 16] and records.resolution_log2 == 4 and records.label_size == 8
    for lod, size in [(0, 16), (1, 8), (2, 4), (1.5, 8)]:
        images, batch_labels = records.get_minibatch_np(10, lod=lod)
        assert images.shape == (10, 3, size, size) and images.dtype == np.uint8
        index = images[:, 0, 0, 0].astype(int)
        np.testing.assert_array_equal(batch_labels, labels[index])
    first_label_only = dataset.TFRecordDataset(str(tmp_path), max_label_size=1)
    assert first_label_only.label_size == 1
    assert dataset.TFRecordDataset(str(tmp_path)).label_size == 0       # Labels are off unless asked for.


def test_synthetic_dataset_follows_configure(tf_session):
    synthetic = dataset.SyntheticDataset(resolution=32, num_channels=3, label_size=2)
    images, labels = synthetic.get_minibatch_np(5, lod=2)
    assert images.shape == (5, 3, 8, 8) and labels.shape == (5, 2)
    assert synthetic.get_random_labels_np(7).shape == (7, 2)


def graph_op_count():
    from tf_compat import tf
    return len(tf.get_default_graph().get_operations())


def test_datasets_share_the_base_defaults(tf_session, tmp_path):
    dataset_tool.write_tfrecords(str(tmp_path / 'records'), numbered_images(8, 8))
    for data in [dataset.SyntheticDataset(resolution=8, num_channels=3),
                 dataset.TFRecordDataset(str(tmp_path / 'records'))]:
        assert isinstance(data, dataset.Dataset)
        images = object()
        ops_before = graph_op_count()
        assert data.augment_minibatch_tf(images) is images and graph_op_count() == ops_before  # No augmentation ops.
        data.write_overview(str(tmp_path / 'run'))
        assert not (tmp_path / 'run').exists()                                                 # No overview.
        labels = data.get_random_labels_np(3)
        assert labels.shape == (3, 0) and labels.dtype == np.float32
        data.close()


def test_wrong_label_settings_say_what_to_change(tf_session, tmp_path):
    dataset_tool.write_tfrecords(str(tmp_path), numbered_images(6, 8), np.eye(6, dtype=np.float32))
    for wrong in [-1, 'all', 1.5]:
        with pytest.raises(ValueError, match="max_label_size must be 0 .*'full'"):
            dataset.TFRecordDataset(str(tmp_path), max_label_size=wrong)
    np.save(str(tmp_path / 'short.npy'), np.zeros([4, 2], np.float32))
    with pytest.raises(ValueError, match='has 4 rows but the dataset .* has 6 images'):
        dataset.TFRecordDataset(str(tmp_path), label_file='short.npy', max_label_size='full')


def test_configure_names_the_lods_a_dataset_serves(tf_session, tmp_path):
    dataset_tool.write_tfrecords(str(tmp_path), numbered_images(4, 16))
    records = dataset.TFRecordDataset(str(tmp_path))
    assert records.max_lod == 2
    with pytest.raises(ValueError, match='LODs 0..2 .*LOD 3 is outside'):
        records.configure(4, 3)
    with pytest.raises(ValueError, match='at least one image'):
        records.configure(0, 0)


def test_unknown_dataset_class_lists_the_known_ones(tf_session):
    with pytest.raises(ValueError, match='Unknown dataset class .*dataset.WSIDataset'):
        dataset.load_dataset('dataset.TFRecordDatset', tfrecord_dir='anywhere')
