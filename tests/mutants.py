"""Planted bugs: do the tests catch them?

Each mutant is one deliberate one-line bug. It is applied to a fresh copy of the checkout (in a
temporary folder, the checkout itself is never touched) and the mutant's tests run there, with
the Python running this script; the first test that fails has caught it. One line per mutant:

    caught   gp-weight        by tests/test_loss.py::test_D_loss_with_the_default_weights...
    MISSED   some-mutant      (tests: ...)
    PATTERN NOT FOUND  name   in file: ...      (the code changed: re-target the mutant)

Usage (from anywhere; not collected by pytest):
    python tests/mutants.py                 # every mutant
    python tests/mutants.py gp-weight drift # only these
    python tests/mutants.py --list
    python tests/mutants.py --baseline      # first check the tests pass on the code as it is
Exit status: 0 when every mutant run was caught (and the baseline passed), 1 otherwise.
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_COPIED = shutil.ignore_patterns('.git', '.venv', '__pycache__', '.pytest_cache', 'results', '*.pyc')
TIMEOUT_SECONDS = 300

Mutant = collections.namedtuple('Mutant', 'name file old new tests')

LOSS_D_DEFAULTS = 'tests/test_loss.py::test_D_loss_with_the_default_weights_and_its_gradients'
PROCESS_REALS = 'tests/test_process_reals.py::test_process_reals_matches_the_reference'
TWO_TOWERS = 'tests/test_training_graph.py::test_two_towers_step_like_one'
NODES_LIKE_DEVICES = 'tests/test_cluster.py::test_two_nodes_step_like_one_process_with_two_devices'
NATIVE_LIKE_FULL = 'tests/test_native_resolution.py::test_native_graph_gives_the_full_resolution_losses_gradients_and_step'

MUTANTS = [
    Mutant('gp-weight', 'loss.py',
           'wgan_lambda=10.0,', 'wgan_lambda=1.0,',
           [LOSS_D_DEFAULTS]),
    Mutant('drift-removed', 'loss.py',
           'loss += drift * wgan_epsilon', 'loss += drift * 0',
           [LOSS_D_DEFAULTS]),
    Mutant('D-label-sign', 'loss.py',
           'loss += _per_sample(on_reals + on_fakes) * cond_weight', 'loss -= _per_sample(on_reals + on_fakes) * cond_weight',
           [LOSS_D_DEFAULTS]),
    Mutant('G-label-sign', 'loss.py',
           'loss += _per_sample(penalty) * cond_weight',
           'loss -= _per_sample(penalty) * cond_weight',
           ['tests/test_loss.py::test_G_loss_and_its_gradients']),
    Mutant('gp-norm-uncorrected', 'loss.py',    # the native graph's penalty on the small image's own norm
           'axis=[1, 2, 3])) / _enlargement(D, between)', 'axis=[1, 2, 3]))',
           [NATIVE_LIKE_FULL]),
    Mutant('fade-reversed', 'train.py',
           'images = tfutil.lerp(images, _one_level_coarser(images), lod - tf.floor(lod))',
           'images = tfutil.lerp(_one_level_coarser(images), images, lod - tf.floor(lod))',
           [PROCESS_REALS]),
    Mutant('mirror-never-keeps', 'train.py',
           'keep = coin < 0.5', 'keep = coin < 0.0',
           [PROCESS_REALS]),
    Mutant('mbstd-groups-consecutive', 'networks.py',   # groups of consecutive samples, not every (N/G)th
           'groups = tf.reshape(x, [members, -1, height, width, channels])',
           'groups = tf.transpose(tf.reshape(x, [-1, members, height, width, channels]), [1, 0, 2, 3, 4])',
           ['tests/test_legacy_pickles.py::test_legacy_pickle_matches_numpy_reference']),
    Mutant('wscale-conv-gain', 'networks.py',
           'def conv2d(x, fmaps, kernel, gain=np.sqrt(2), use_wscale=False):',
           'def conv2d(x, fmaps, kernel, gain=1, use_wscale=False):',
           ['tests/test_networks.py::test_pixelnorm_and_wscale_switches_change_the_network']),
    Mutant('gs-beta-ignored', 'train.py',
           'Gs.setup_as_moving_average_of(G, beta=G_smoothing)', 'Gs.setup_as_moving_average_of(G)',
           [TWO_TOWERS]),
    Mutant('gs-average-copies', 'tfutil.py',
           'target.assign(lerp(src_net.vars[name], target, keep))', 'target.assign(src_net.vars[name])',
           [TWO_TOWERS]),
    Mutant('loss-scale-kept-on-overflow', 'tfutil.py',
           'return tf.group(tf.assign_sub(ls_var, self.loss_scaling_dec))', 'return tf.group()',
           ['tests/test_tfutil.py::test_nonfinite_gradients_are_skipped_and_lower_the_loss_scale']),
    Mutant('tower-on-first-device', 'train.py',
           "with tf.name_scope('GPU%d' % tower), tf.device(device):",
           "with tf.name_scope('GPU%d' % tower), tf.device(devices[0]):",
           ['tests/test_training_graph.py::test_each_tower_sits_on_its_device']),
    Mutant('augment-skipped-in-towers', 'train.py',
           'reals = augment_reals(training_set, reals_per_tower[tower])', 'reals = reals_per_tower[tower]',
           ['tests/test_augment.py::test_training_graph_augments_on_each_device']),
    Mutant('tissue-mask-inverted', 'wsi.py',
           'tissue = grey < threshold', 'tissue = grey >= threshold',
           ['tests/test_wsi.py::test_blank_slide_gets_no_tissue_where_plain_otsu_would_find_half']),
    Mutant('lod-field-of-view-halved', 'patch_sampler.py',
           'centre, self.table.field_of_view[slide_index], size)',
           'centre, self.table.field_of_view[slide_index] / (1 + (size < self.resolution)), size)',
           ['tests/test_wsi.py::test_sampler_patches_cover_the_same_field_of_view_at_every_lod']),
    Mutant('patch-um-ignores-mpp', 'wsi.py',
           'field_of_view = patch_um / mpp', 'field_of_view = patch_um / 0.25',
           ['tests/test_wsi_cohort.py::test_patch_um_gives_the_same_physical_field_of_view_at_025_and_05_um_per_px']),
    Mutant('roi-holes-filled', 'wsi.py',
           'rings = [polygon.exterior, *polygon.interiors]', 'rings = [polygon.exterior]',
           ['tests/test_wsi_cohort.py::test_patch_centres_fall_inside_the_chosen_class_and_outside_its_hole_at_every_lod']),
    Mutant('stain-not-applied', 'patch_sampler.py',
           'patch = self.transforms[slide_index](patch)', 'patch = patch',
           ['tests/test_stain.py::test_slide_patches_move_to_the_target_and_tinted_copies_come_together']),
    Mutant('tiny-reads-subsampled-to-one-pixel', 'wsi.py',
           'step = max(1, read_size // BLANK_CHECK_SAMPLES)', 'step = 4',
           ['tests/test_wsi_log.py::test_healthy_slide_edges_and_tiny_coarse_reads_give_no_warnings']),
    Mutant('read-ahead-not-cancelled', 'patch_sampler.py',
           'self._counters[0] = self._serial', 'self._counters[0] = 0',
           ['tests/test_wsi.py::test_batches_read_ahead_a_bounded_amount_and_stop_cleanly']),
    Mutant('tissue-draw-off-by-one-run', 'wsi.py',
           'run = bisect.bisect_right(self.ends, k)', 'run = bisect.bisect_left(self.ends, k)',
           ['tests/test_cohort_scale.py::test_tissue_runs_hold_the_mask_and_draw_the_same_pixels_as_a_pixel_list[0]']),
    Mutant('readers-outlive-the-trainer', 'worker_pool.py',
           'pass_fds=[child_end.fileno()]', 'pass_fds=[child_end.fileno(), parent_end.fileno()]',
           ['tests/test_cohort_scale.py::test_readers_exit_when_the_trainer_dies[SIGKILL]']),
    Mutant('fast-read-path-lost', 'wsi.py',
           "osr = getattr(handle, '_osr', None)", "osr = getattr(handle, '_osr_handle', None)",
           ['tests/test_wsi.py::test_sampler_reads_through_the_fast_path']),
    Mutant('nodes-not-summed', 'tfutil.py',
           'self._sum_across_nodes(devices, device_grads)', 'pass',
           [NODES_LIKE_DEVICES]),
    Mutant('chief-weights-not-shared', 'cluster.py',
           'keep = 1.0 if self.is_chief else 0.0', 'keep = 1.0 / self.count',
           [NODES_LIKE_DEVICES]),
    Mutant('stop-signal-not-shared', 'train.py',
           'caught = tf.one_hot(node.index, node.count) * signal_in', 'caught = tf.one_hot(node.index, node.count) * 0',
           ['tests/test_cluster.py::test_sigterm_on_one_node_stops_both_at_the_same_step']),
]


def copy_with(mutant, folder):
    """Copy the checkout into folder with the mutant applied; the problem as text, or None."""
    with open(os.path.join(CHECKOUT, mutant.file), encoding='utf-8') as f:
        text = f.read()
    count = text.count(mutant.old)
    if count != 1:
        return 'PATTERN NOT FOUND' if count == 0 else f'PATTERN FOUND {count} TIMES'
    shutil.copytree(CHECKOUT, folder, ignore=NOT_COPIED)
    with open(os.path.join(folder, mutant.file), 'w', encoding='utf-8') as f:
        f.write(text.replace(mutant.old, mutant.new))
    return None


def first_failure(folder, tests):
    """The first of tests that fails in folder (None: all pass), and the pytest output."""
    command = [sys.executable, '-m', 'pytest', '-x', '-q', '-rfE', '-p', 'no:cacheprovider', *tests]
    try:
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
                                check=False)     # a failing test is the outcome looked for
    except subprocess.TimeoutExpired:
        return f'(a timeout after {TIMEOUT_SECONDS} s)', ''
    if result.returncode == 0:
        return None, result.stdout
    match = re.search(r'^(?:FAILED|ERROR) (\S+)', result.stdout, re.MULTILINE)
    return (match.group(1) if match else f'(pytest exit status {result.returncode})'), result.stdout


def baseline_passes(mutants):
    """Run the chosen mutants' tests on an unchanged copy: a test failing there catches nothing."""
    tests = list(dict.fromkeys(test for m in mutants for test in m.tests))
    with tempfile.TemporaryDirectory(prefix='mutant-baseline-') as tmp:
        folder = os.path.join(tmp, 'checkout')
        shutil.copytree(CHECKOUT, folder, ignore=NOT_COPIED)
        command = [sys.executable, '-m', 'pytest', '-q', '-rfE', '-p', 'no:cacheprovider', *tests]
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)
    if result.returncode == 0:
        print('baseline  passes', flush=True)
        return True
    failures = re.findall(r'^(?:FAILED|ERROR) (\S+)', result.stdout, re.MULTILINE)
    print('baseline  FAILS:', ' '.join(failures) or result.stdout[-2000:], flush=True)
    return False


def run_mutant(mutant, verbose=False):
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f'mutant-{mutant.name}-') as tmp:
        folder = os.path.join(tmp, 'checkout')
        problem = copy_with(mutant, folder)
        if problem:
            print(f'{problem:9s} {mutant.name:30s} in {mutant.file}: {mutant.old!r}', flush=True)
            return False
        failed, output = first_failure(folder, mutant.tests)
    seconds = time.time() - start
    if failed is None:
        print(f'MISSED    {mutant.name:30s} ({seconds:.0f} s; tests: {" ".join(mutant.tests)})', flush=True)
    else:
        print(f'caught    {mutant.name:30s} by {failed} ({seconds:.0f} s)', flush=True)
    if verbose:
        print(output[-3000:])
    return failed is not None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('names', nargs='*', help='mutants to run (default: all)')
    parser.add_argument('--list', action='store_true', help='list the mutants and exit')
    parser.add_argument('--verbose', action='store_true', help="show the end of each run's pytest output")
    parser.add_argument('--baseline', action='store_true', help="first run the mutants' tests on the code as it is")
    args = parser.parse_args()
    by_name = {m.name: m for m in MUTANTS}
    if args.list:
        for m in MUTANTS:
            print(f'{m.name:30s} {m.file:12s} {" ".join(m.tests)}')
        return 0
    unknown = [name for name in args.names if name not in by_name]
    if unknown:
        parser.error(f'unknown mutant(s) {", ".join(unknown)}; --list shows them')
    chosen = [by_name[name] for name in args.names] if args.names else MUTANTS
    if args.baseline and not baseline_passes(chosen):
        return 1
    caught = [run_mutant(m, args.verbose) for m in chosen]
    return 0 if all(caught) else 1


if __name__ == '__main__':
    sys.exit(main())
