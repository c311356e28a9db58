"""TFRecordDataset and SyntheticDataset: the original multi-LOD layout, labels kept with their
images through shuffling, and numpy minibatches."""

import numpy as np

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
