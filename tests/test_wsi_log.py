"""A log a person can read: read problems counted per slide and reported once per tick, details
in read-problems.txt, healthy slide edges silent, no CUDA error lines on a machine without a GPU."""
import os
import re
import subprocess
import sys

import pytest

import tf_compat
import patch_sampler
import wsi
from conftest import corrupt_tiles, run_with_timeout, slide_image, write_slide
from train_helpers import REPO

READ_WARNING = re.compile(r'Warning: (reading|dropping)|Read problems:|resampling')


def test_healthy_slide_edges_and_tiny_coarse_reads_give_no_warnings(tmp_path, mask_cache, messages):
    # A 32x24 top level: at LOD 3 a 4-px patch is a 4-px read, which must be looked at whole.
    wsi.write_pyramidal_tiff(str(tmp_path / 'a.svs'), slide_image(2048, 1536, [(512, 384, 1536, 1152)]),
                             aperio=True, level_factor=4, min_level_size=32)
    with patch_sampler.PatchSampler(str(tmp_path), resolution=32, downsample=8, mask_cache_dir=mask_cache, seed=3,
                          num_threads=2, log=messages.append) as sampler:
        assert sampler.slides[0].level_downsamples[-1] == 64
        for lod in range(sampler.max_lod + 1):
            sampler.sample(lod, 128)
        assert sampler.tick_report() == []
    assert messages == []


def test_failed_reads_are_counted_reported_per_tick_and_detailed_in_a_file(tmp_path, mask_cache, messages):
    slides = tmp_path / 'slides'
    slides.mkdir()
    good = write_slide(slides / 'good.svs')
    bad = write_slide(slides / 'bad.svs')
    corrupt_tiles(bad, from_level=1)
    problems = tmp_path / 'read-problems.txt'
    with patch_sampler.PatchSampler(str(slides), resolution=32, downsample=4, mask_cache_dir=mask_cache, seed=1,
                          num_threads=2, log=messages.append) as sampler:
        sampler.problems_path = str(problems)
        run_with_timeout(lambda: sampler.sample(0, 32), 60)
        report = sampler.tick_report()
    assert [m for m in messages if bad in m and 'dropping' in m] and not [m for m in messages if good in m]
    assert len(report) == 1 and bad in report[0]
    count = int(re.search(r': (\d+) since the last tick', report[0]).group(1))
    details = problems.read_text().splitlines()
    assert len(details) == count >= wsi.MAX_CONSECUTIVE_FAILURES
    assert all(line.startswith(bad + '\tcentre (') and 'OpenSlideError' in line for line in details)


def test_cuda_probe_lines_are_dropped_and_everything_else_passes(capfd):
    with tf_compat.without_cuda_probe_lines():
        os.write(2, b'E0000 cuda_platform.cc:52] failed call to cuInit: CUDA error\n'
                    b'I0000 cudart_stub.cc:31] Could not find cuda drivers on your machine\n'
                    b'W0000 something else] keep this line\n')
        print('stdout untouched')
    out, err = capfd.readouterr()
    assert err == 'W0000 something else] keep this line\n'
    assert out == 'stdout untouched\n'


def test_importing_tensorflow_prints_no_cuda_error_lines_without_a_driver():
    result = subprocess.run([sys.executable, '-c', 'from tf_compat import tf; tf.Session().close(); print("ok")'],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == 'ok', result.stderr
    if tf_compat.has_nvidia_driver():   # a GPU machine: TensorFlow's device lines must still be there
        assert re.search(r'GPU|device', result.stderr), result.stderr
    else:
        assert not tf_compat.CUDA_PROBE_LINE.search(result.stderr.encode()), result.stderr
        assert not re.search(r'cuda', result.stderr, re.I), result.stderr


def test_tensorflows_start_up_lines_stay_out_on_cpu_unless_the_user_sets_the_log_level():
    code = 'from tf_compat import tf; tf.Session().close(); print("ok")'
    env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
    quiet = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert quiet.stdout.strip() == 'ok' and quiet.stderr == '', quiet.stderr
    asked = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120,
                           env=dict(env, TF_CPP_MIN_LOG_LEVEL='0'))
    assert asked.stdout.strip() == 'ok' and 'cpu_feature_guard' in asked.stderr, asked.stderr


@pytest.mark.slow
def test_demo_config_full_run_prints_at_most_5_lines_of_read_warnings(tmp_path):
    # The shipped config.py as it is, with its data and result folders moved into tmp_path.
    with open(os.path.join(REPO, 'config.py'), encoding='utf-8') as f:
        text = f.read()
    config_path = tmp_path / 'demo_config.py'
    config_path.write_text(text + f'\ndata_dir = {str(tmp_path / "datasets")!r}\n'
                                  f'result_dir = {str(tmp_path / "results")!r}\n', encoding='utf-8')
    result = subprocess.run([sys.executable, 'train.py', str(config_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=3600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    run_dirs = [os.path.join(tmp_path, 'results', d) for d in os.listdir(tmp_path / 'results')]
    assert len(run_dirs) == 1 and os.path.isfile(os.path.join(run_dirs[0], 'network-final.pkl'))
    warnings = [line for line in output.splitlines() if READ_WARNING.search(line)]
    assert len(warnings) <= 5, '\n'.join(warnings)
    if not tf_compat.has_nvidia_driver():
        assert not re.search(r'cuInit|CUDA error|cuda drivers', output), output[:3000]
