"""Writing small config files and running `python train.py config` in a subprocess, for tests."""

import glob
import os
import subprocess
import sys

import misc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_NETS = dict(fmap_base=64, fmap_max=32)

CONFIG_TEMPLATE = '''\
from config import EasyDict
data_dir = {data_dir!r}
result_dir = {result_dir!r}
inception_dir = None
tf_config = EasyDict({{'graph_options.place_pruned_graph': True}})
env = EasyDict(TF_CPP_MIN_LOG_LEVEL='1')
desc = {desc!r}
random_seed = 1000
num_gpus = {num_gpus!r}
dataset = EasyDict({dataset!r})
train = EasyDict({train!r})
G = EasyDict({G!r})
D = EasyDict({D!r})
G_opt = EasyDict(beta1=0.0, beta2=0.99, epsilon=1e-8)
D_opt = EasyDict(beta1=0.0, beta2=0.99, epsilon=1e-8)
G_loss = EasyDict(func='loss.G_wgan_acgan')
D_loss = EasyDict(func='loss.D_wgangp_acgan')
sched = EasyDict({sched!r})
grid = EasyDict({grid!r})
'''


def write_config(path, result_dir, dataset, data_dir='', desc='test', num_gpus=1, train=None, G=None, D=None,
                 sched=None, grid=None):
    """A config file of config.py's shape; dicts given here are merged over small defaults."""
    blocks = dict(
        train=dict(func='train.train_progressive_gan', total_kimg=1, image_snapshot_ticks=1, network_snapshot_ticks=1),
        G=dict(func='networks.G_paper', latent_size=32, **SMALL_NETS),
        D=dict(func='networks.D_paper', **SMALL_NETS),
        sched=dict(lod_initial_resolution=4, lod_training_kimg=0.5, lod_transition_kimg=0.5, minibatch_base=8,
                   tick_kimg_base=0.5, tick_kimg_dict={}),
        grid=dict(size='4x2', layout='random'))
    for name, value in dict(train=train, G=G, D=D, sched=sched, grid=grid).items():
        blocks[name].update(value or {})
    text = CONFIG_TEMPLATE.format(data_dir=data_dir, result_dir=str(result_dir), desc=desc, num_gpus=num_gpus,
                                  dataset=dict(dataset), **blocks)
    with open(path, 'wt') as file:
        file.write(text)
    return str(path)


def run_train(config_path, timeout=600):
    """Run train.py on a config in a fresh process; returns the CompletedProcess (output captured)."""
    result = subprocess.run([sys.executable, 'train.py', str(config_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError('train.py failed:\n' + result.stdout[-5000:] + result.stderr[-5000:])
    return result


def run_dirs(result_dir):
    return sorted(glob.glob(os.path.join(str(result_dir), '[0-9][0-9][0-9]-*')))


def tick_lines(run_dir):
    """(kimg, lod) of every tick line in the run's log.txt."""
    return [(tick.kimg, tick.lod) for tick in misc.read_tick_lines(run_dir)]
