"""Every commented line of config.py, uncommented, gives a valid setup: a schedule the training loop
can follow and network options the build functions take, or a utility script with arguments it
accepts."""

import inspect
import os
import re
import runpy

import pytest

import networks
import tfutil
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_TEXT = open(os.path.join(REPO, 'config.py'), encoding='utf-8').read()
LINES = CONFIG_TEXT.splitlines()
SWITCH_LINES = [i for i, line in enumerate(LINES) if re.match(r'^#\s*(desc \+=|train = EasyDict)', line)]
ACTIVE_LINES = [i for i, line in enumerate(LINES) if re.match(r'^(desc \+=)', line)]


class FakeTrainingSet:
    def __init__(self, resolution):
        self.resolution_log2 = int(resolution).bit_length() - 1


def config_with(tmp_path, uncomment=None, comment=()):
    lines = list(LINES)
    for i in comment:
        lines[i] = '#' + lines[i]
    if uncomment is not None:
        lines[uncomment] = lines[uncomment].lstrip('#').lstrip()
    path = tmp_path / 'config.py'
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return runpy.run_path(str(path))


def active_line_of_group(index):
    """The uncommented line that a commented line replaces (same group: dataset, preset, precision)."""
    groups = {'dataset': r"dataset = EasyDict\(", 'preset': r"-preset-", 'precision': r"-fp(16|32)'"}
    for pattern in groups.values():
        if re.search(pattern, LINES[index]):
            return [i for i in ACTIVE_LINES if re.search(pattern, LINES[i])]
    return []


def check_schedule(cfg):
    num_gpus = cfg['num_gpus']
    resolution = cfg['dataset'].get('resolution') or 1024
    training_set = FakeTrainingSet(resolution)
    total_kimg = cfg['train'].get('total_kimg', 15000)
    lods = []
    for kimg in [0, total_kimg * 0.25, total_kimg * 0.5, total_kimg * 0.9, total_kimg]:
        sched = train.TrainingSchedule(kimg * 1000, training_set, num_gpus=num_gpus, **cfg['sched'])
        assert sched.minibatch >= num_gpus and sched.minibatch % num_gpus == 0
        assert 0.0 <= sched.lod <= training_set.resolution_log2 - 2
        assert sched.G_lrate > 0 and sched.D_lrate > 0 and sched.tick_kimg > 0
        lods.append(sched.lod)
    assert lods == sorted(lods, reverse=True)      # Growing only ever adds detail.


def check_network_options(cfg):
    for block, func in [('G', networks.G_paper), ('D', networks.D_paper)]:
        options = dict(cfg[block])
        assert tfutil.import_obj(options.pop('func')) is func
        accepted = set(inspect.signature(func).parameters)
        assert set(options) <= accepted, (block, set(options) - accepted)
    train_args = {k: v for k, v in cfg['train'].items() if k != 'func'}
    inspect.signature(train.train_progressive_gan).bind(**train_args)
    train.grid_shape(cfg['grid'].get('size', '1080p'), 64, 64)


@pytest.mark.parametrize('index', SWITCH_LINES, ids=lambda i: LINES[i][:50])
def test_uncommented_line_gives_a_valid_setup(tmp_path, index):
    cfg = config_with(tmp_path, uncomment=index, comment=active_line_of_group(index))
    assert cfg['desc'] and '/' not in cfg['desc']
    if cfg['train']['func'] == 'train.train_progressive_gan':
        check_schedule(cfg)
        check_network_options(cfg)
    else:
        func = tfutil.import_obj(cfg['train']['func'])
        inspect.signature(func).bind(**{k: v for k, v in cfg['train'].items() if k != 'func'})


def test_shipped_default_trains_the_demo_slides_through_three_resolutions(tmp_path):
    cfg = config_with(tmp_path)
    assert cfg['dataset']['class_name'] == 'dataset.WSIDataset' and cfg['dataset']['create_demo']
    check_schedule(cfg)
    check_network_options(cfg)
    training_set = FakeTrainingSet(cfg['dataset']['resolution'])
    resolutions = {train.TrainingSchedule(kimg * 1000, training_set, num_gpus=1, **cfg['sched']).resolution
                   for kimg in range(int(cfg['train']['total_kimg']) + 1)}
    assert len(resolutions) >= 3
