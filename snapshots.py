"""What a run leaves behind, and how a later run continues from it.

Beside each network pickle a run keeps two more files:
- optimizer-state-NNNNNNNNN.npz (NNNNNNNNN = images shown): the Adam slots and the loss scales;
- resume-state.json: the exact progress (images shown, wall time, tick, LOD), the numpy random
  state, the name of the .npz, and the SHA-256 of the pickle's bytes, so an entry is only trusted
  for the very file it was written with (snapshot names repeat when a tick is under 1 kimg).
Its top level describes the newest snapshot; 'previous' keeps the entry of the pickle before.
Snapshots of older runs, without the json, still resume: kimg from the file name, time from log.txt.

Resuming, train.py asks `locate_resume_pkl` to turn resume_run_id (a run, a pickle or 'latest')
into a pickle (in a multi-node run the chief asks and tells the others), then `load_resume_point`
loads it: `load_resume_state` finds its entry and `resume_progress` fills in kimg and time; later
`restore_optimizers` and `restore_random_state` put the saved optimizer and numpy random state back.

TensorFlow is imported only by the functions that touch variables: the pre-flight checks use
the rest (finished runs, stale temporary files) before it loads.
"""

import collections
import glob
import hashlib
import io
import json
import os
import re
import time

import numpy as np

import config
import misc

RESUME_STATE_FILE = 'resume-state.json'
_OPTIMIZER_STATE_GLOB = 'optimizer-state-*.npz'

# ----------------------------------------------------------------------------
# Files: the optimizer state (.npz) and resume-state.json.


def optimizer_state_name(cur_nimg):
    return 'optimizer-state-%09d.npz' % cur_nimg


def save_npz(filename, arrays):
    """np.savez, but atomic: a kill mid-write leaves no half file under `filename`."""
    packed = io.BytesIO()
    np.savez(packed, **arrays)
    misc.atomic_write_bytes(filename, packed.getvalue())


def save_resume_state(result_subdir, state):
    """Replace resume-state.json atomically (readers see the old or the new text, never a mix)."""
    text = json.dumps(state, indent=1, sort_keys=True)
    misc.atomic_write_bytes(os.path.join(result_subdir, RESUME_STATE_FILE), text.encode('utf-8'))


def read_resume_state(result_subdir):
    """The parsed resume-state.json of a run, or None when it is missing or unreadable."""
    path = os.path.join(result_subdir, RESUME_STATE_FILE)
    try:
        with open(path, 'rt', encoding='utf-8') as file:
            parsed = json.load(file)
    except (OSError, ValueError):
        return None
    return parsed if isinstance(parsed, dict) else None


def resume_state_entries(state):
    """The entries of a resume state, newest snapshot first."""
    if state is None:
        return []
    newest = dict(state)
    older = newest.pop('previous', [])
    return [newest] + list(older)


def load_resume_state(network_pkl):
    """The entry written together with this very pickle (same name, same bytes), or None."""
    name = os.path.basename(network_pkl)
    entries = resume_state_entries(read_resume_state(os.path.dirname(network_pkl)))
    candidates = [entry for entry in entries if entry.get('snapshot') == name]
    if not candidates:
        return None     # Hashing a large pickle is skipped when no entry could match anyway.
    digest = file_sha256(network_pkl)
    return next((entry for entry in candidates if entry.get('snapshot_sha256') == digest), None)


def file_sha256(filename):
    hasher = hashlib.sha256()
    with open(filename, 'rb') as file:
        while True:
            block = file.read(4 << 20)
            if not block:
                return hasher.hexdigest()
            hasher.update(block)


def encode_random_state(state):
    """numpy's legacy random state as JSON-friendly lists and numbers."""
    algorithm, key, position, has_gauss, gauss = state
    return [algorithm, [int(word) for word in key], int(position), int(has_gauss), float(gauss)]


def decode_random_state(state):
    """Inverse of encode_random_state: a tuple np.random.set_state accepts."""
    algorithm, key, position, has_gauss, gauss = state
    return (algorithm, np.array(key, dtype=np.uint32), position, has_gauss, gauss)

# ----------------------------------------------------------------------------
# Optimizer state.


def is_loss_scaling_var(var):
    return 'LossScalingVars' in var.name


def same_lod_phase(lod_a, lod_b):
    """Whether two LODs lie in one phase of the schedule. Training resets the Adam slots when the
    phase changes, i.e. when either the floor or the ceiling of the LOD moves (a fade starts or ends)."""
    return np.floor(lod_a) == np.floor(lod_b) and np.ceil(lod_a) == np.ceil(lod_b)


def restore_optimizer_state(npz_path, variables, same_phase):
    """Put saved optimizer state back into `variables`. The loss scales always come back, as training
    never resets them; the Adam slots only when the run resumes in the LOD phase they were saved in,
    since training would have reset them at the phase change. Returns {variable: value} set."""
    import tfutil
    saved = _read_npz(npz_path)
    if saved is None:
        return {}
    wanted = [var for var in variables if same_phase or is_loss_scaling_var(var)]
    values = {var: saved[var.name] for var in wanted if _fits(var, saved.get(var.name))}
    tfutil.set_vars(values)
    what = 'Adam slots and loss scaling' if same_phase else 'loss scaling only: new LOD phase, Adam slots reset'
    missing = len(wanted) - len(values)
    note = '; %d not in the file (different setup?) start fresh' % missing if missing else ''
    print('Restored optimizer state from "%s": %d of %d variables (%s)%s' % (
        os.path.basename(npz_path), len(values), len(variables), what, note))
    return values


def _read_npz(npz_path):
    """All arrays of an .npz, or None (with a message) when it cannot be read."""
    try:
        with np.load(npz_path) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        print('Cannot read optimizer state "%s" (%s); starting with fresh optimizer state' % (npz_path, error))
        return None


def _fits(var, value):
    return value is not None and list(value.shape) == var.shape.as_list()

# ----------------------------------------------------------------------------
# Writing snapshots.


class SnapshotWriter:
    """Writes a snapshot: the optimizer state (.npz), then resume-state.json, then the network
    pickle, each file atomically.

    The json goes before the pickle on purpose. Its new top-level entry names the new pickle (by
    name and SHA-256 of the bytes about to be written) and its 'previous' keeps the entry of the
    pickle the run wrote last. A kill after the json but before the pickle thus leaves the old
    pickle, still matched by 'previous'; a kill after the pickle leaves the new one with its entry.
    Either way the newest pickle on disk has exact resume state, which writing the json last would
    not give. The .npz comes first so that the json never names a file not yet written. Older
    optimizer-state files are then removed, except those the two entries name, and with
    `keep` = N all but the newest N network-snapshot-*.pkl."""

    def __init__(self, result_subdir, G, D, Gs, G_opt, D_opt, keep=None):
        self.result_subdir = result_subdir
        self.networks = (G, D, Gs)
        self.opt_vars = G_opt.variables() + D_opt.variables()
        self.keep = keep
        self.last_name = None       # The newest pickle this run wrote, for messages.

    def save(self, name, cur_nimg, total_time, cur_tick, lod):
        import tfutil
        pickled = misc.pkl_bytes(self.networks)
        opt_values = dict(zip(self.opt_vars, tfutil.run(self.opt_vars)))
        npz_name = optimizer_state_name(cur_nimg)
        save_npz(os.path.join(self.result_subdir, npz_name), {var.name: value for var, value in opt_values.items()})
        entry = self._entry(name, pickled, npz_name, opt_values, cur_nimg, total_time, cur_tick, lod)
        on_disk = resume_state_entries(read_resume_state(self.result_subdir))[:1]
        save_resume_state(self.result_subdir, dict(entry, previous=on_disk))
        network_pkl = os.path.join(self.result_subdir, name)
        misc.atomic_write_bytes(network_pkl, pickled)
        self._remove_stale_optimizer_states({npz_name} | {old.get('optimizer_state') for old in on_disk})
        self.last_name = name
        if self.keep is not None:
            remove_old_snapshots(self.result_subdir, self.keep)
        return network_pkl

    @staticmethod
    def _entry(name, pickled, npz_name, opt_values, cur_nimg, total_time, cur_tick, lod):
        return dict(
            snapshot=name,
            snapshot_sha256=hashlib.sha256(pickled).hexdigest(),
            optimizer_state=npz_name,
            cur_nimg=int(cur_nimg),
            kimg=cur_nimg / 1000.0,
            total_time=float(total_time),
            tick=int(cur_tick),
            lod=float(lod),
            lod_phase=[float(np.floor(lod)), float(np.ceil(lod))],
            loss_scaling={var.name: float(value) for var, value in opt_values.items() if is_loss_scaling_var(var)},
            numpy_random_state=encode_random_state(np.random.get_state()),
            saved_at=time.strftime('%Y-%m-%d %H:%M:%S'))

    def _remove_stale_optimizer_states(self, keep):
        for path in glob.glob(os.path.join(self.result_subdir, _OPTIMIZER_STATE_GLOB)):
            if os.path.basename(path) not in keep:
                os.remove(path)


def remove_old_snapshots(result_subdir, keep):
    """Delete all but the newest `keep` network-snapshot-*.pkl of a run (network-final.pkl stays).
    The pickle resume-state.json names as the newest is never deleted, whatever its name says."""
    named = {entry.get('snapshot') for entry in resume_state_entries(read_resume_state(result_subdir))[:1]}
    numbered = sorted(glob.glob(os.path.join(result_subdir, 'network-snapshot-*.pkl')))
    for path in numbered[:max(len(numbered) - keep, 0)]:
        if os.path.basename(path) not in named:
            os.remove(path)

# ----------------------------------------------------------------------------
# Continuing a run: which pickle, and at what kimg and time.

ResumePoint = collections.namedtuple('ResumePoint', 'network_pkl networks state kimg time')


def load_resume_point(network_pkl, resume_kimg=None, resume_time=None):
    """The ResumePoint of a pickle that locate_resume_pkl chose (networks (G, D, Gs), resume-state
    entry or None, kimg, seconds), or None for no pickle: start from scratch. Build the graph under
    the device the networks should live on before calling: loading creates their variables."""
    if network_pkl is None:
        return None
    print('Loading networks from "%s"...' % network_pkl)
    networks = misc.load_pkl(network_pkl)
    state = load_resume_state(network_pkl)
    kimg, seconds = resume_progress(network_pkl, resume_kimg, resume_time, state)
    return ResumePoint(network_pkl, networks, state, kimg, seconds)


def restore_optimizers(point, opt_variables, lod, reset_opt_for_new_lod):
    """Bring back the optimizer state saved with the resume point, if it has any."""
    npz_name = point.state.get('optimizer_state') if point is not None and point.state else None
    if not npz_name:
        return
    same_phase = not reset_opt_for_new_lod or same_lod_phase(point.state['lod'], lod)
    restore_optimizer_state(os.path.join(os.path.dirname(point.network_pkl), npz_name), opt_variables, same_phase)


def restore_random_state(point):
    """Continue numpy's random stream (latents and the like) where the snapshot left it."""
    saved = point.state.get('numpy_random_state') if point is not None and point.state else None
    if saved:
        np.random.set_state(decode_random_state(saved))


def resume_tick(point):
    """The tick count the resumed run had reached (0 without exact resume state)."""
    return int(point.state['tick']) if point is not None and point.state is not None else 0


def locate_resume_pkl(resume_run_id, resume_snapshot=None):
    """The pickle to resume from, or None to start from scratch: with no resume_run_id, or with
    'latest' while no run has a snapshot yet (so a preemptible job's first start and all its
    restarts can be the same command)."""
    if resume_run_id is None:
        return None
    if resume_run_id != 'latest':
        return misc.locate_network_pkl(resume_run_id, resume_snapshot)
    run_dir = latest_run_with_snapshot(config.result_dir)
    if run_dir is None:
        print('resume_run_id="latest": no run with a network snapshot under "%s" yet; starting from scratch' %
              config.result_dir)
        return None
    return misc.locate_network_pkl(run_dir, resume_snapshot)


def finished_latest_run(total_kimg):
    """With resume_run_id='latest': the network-final.pkl of the newest run with a snapshot when
    that run has already trained to total_kimg (so there is nothing to resume), else None."""
    run_dir = latest_run_with_snapshot(config.result_dir)
    final = os.path.join(run_dir, 'network-final.pkl') if run_dir is not None else None
    if final is None or not os.path.isfile(final):
        return None
    entry = load_resume_state(final)
    kimg = entry['kimg'] if entry is not None else snapshot_kimg(final)
    return final if kimg is not None and kimg >= total_kimg else None


def runs_to_tidy(resume_run_id, resume_snapshot=None):
    """The run directories a resuming run should clear of stale temporary files: the run it
    resumes from and, with 'latest', the newer runs that died before their first snapshot."""
    if resume_run_id is None:
        return []
    if resume_run_id != 'latest':
        return [os.path.dirname(misc.locate_network_pkl(resume_run_id, resume_snapshot))]
    source = latest_run_with_snapshot(config.result_dir)
    first = int(os.path.basename(source).split('-')[0]) if source is not None else -1
    runs = [os.path.join(config.result_dir, name) for name in misc.list_runs(config.result_dir)]
    return [run for run in runs if int(os.path.basename(run).split('-')[0]) >= first and os.path.isdir(run)]


def latest_run_with_snapshot(result_dir):
    """The run directory with the highest number that holds a network pickle, or None."""
    numbered = sorted(misc.list_runs(result_dir), key=lambda name: int(name.split('-')[0]), reverse=True)
    for name in numbered:
        run_dir = os.path.join(result_dir, name)
        if os.path.isdir(run_dir) and misc.list_network_pkls(run_dir):
            return run_dir
    return None


def resume_progress(network_pkl, resume_kimg, resume_time, resume_state=None):
    """(kimg, seconds) to continue from; values given stay. Missing ones come from the pickle's
    resume-state entry when there is one (exact), else from its name and its run's log."""
    if resume_state is not None:
        resume_kimg = resume_state['cur_nimg'] / 1000.0 if resume_kimg is None else resume_kimg
        resume_time = resume_state['total_time'] if resume_time is None else resume_time
        print('Resume state from %s: kimg %.3f, tick %d, lod %.2f' % (
            RESUME_STATE_FILE, resume_state['cur_nimg'] / 1000.0, resume_state['tick'], resume_state['lod']))
    if resume_kimg is None:
        resume_kimg = snapshot_kimg(network_pkl)
    if resume_kimg is None:
        print('Cannot tell the kimg of "%s" from its name; resuming at kimg 0' % network_pkl)
        resume_kimg = 0.0
    if resume_time is None:
        resume_time = resume_time_from_log(os.path.dirname(network_pkl), resume_kimg) or 0.0
    print('Resuming at kimg %.1f, time %s' % (resume_kimg, misc.format_time(resume_time)))
    return float(resume_kimg), float(resume_time)


def snapshot_kimg(network_pkl):
    """The kimg a pickle was written at: network-snapshot-001657.pkl -> 1657; for network-final.pkl
    the last tick of its run's log. None when neither tells."""
    filename = os.path.basename(network_pkl)
    numbered = re.search(r'network-snapshot-(\d+)\.pkl$', filename)
    if numbered:
        return int(numbered.group(1))
    if filename != 'network-final.pkl':
        return None
    ticks = misc.read_tick_lines(os.path.dirname(network_pkl))
    return ticks[-1].kimg if ticks else None


def resume_time_from_log(result_subdir, kimg):
    """Training seconds at the run's last tick up to `kimg`, or None. A snapshot's name rounds its
    kimg down, so ticks up to one kimg beyond it still count."""
    reached = [tick.total_sec for tick in misc.read_tick_lines(result_subdir) if tick.kimg < kimg + 1]
    return reached[-1] if reached else None
