"""Keeping a training run's results sound when things go wrong: losses that stop being finite,
the job being told to stop (SIGTERM from a scheduler, Ctrl-C), and writes that fail (a full disk)."""

import os
import signal
import sys

import numpy as np

import tfutil
from snapshots import is_loss_scaling_var


class TrainingStopped(RuntimeError):
    """Training cannot usefully continue (non-finite losses that persist)."""


def write_failed(error, kimg, good_snapshot, resume_run_id, config_file):
    """The TrainingStopped for an OSError while writing a snapshot or an image: what failed, the
    newest good snapshot (a path, or None) and how to resume once the problem is fixed. Writes are
    atomic, so the failed file is simply absent, never half-written."""
    command = 'python train.py'
    if config_file and os.path.abspath(config_file) != os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config.py'):
        command += ' ' + config_file
    if good_snapshot is None:
        resume = 'No snapshot was written yet, so once there is space, `%s` starts again from scratch.' % command
    elif resume_run_id == 'latest':
        resume = 'Once there is space, the same command resumes from it: %s' % command
    else:
        resume = 'Once there is space, set train.resume_run_id = %r in the config and run: %s' % (
            os.path.dirname(good_snapshot), command)
    return TrainingStopped('Training stopped at kimg %.3f: writing %s failed (%s); the file was not written, nothing '
                           'half-written is left. The newest good snapshot is %s. %s' % (
                               kimg, error.filename or 'a result file', error.strerror or error,
                               good_snapshot or 'none', resume))


class LossHealth:
    """Judges each tick from the mean losses the training steps fetch anyway, plus the loss scales
    read at tick boundaries. A tick is bad when G or D had no step with a finite loss, or, with loss
    scaling, when every step overflowed (the optimizer skipped the update and lowered the scale
    by loss_scaling_dec each time). No snapshot is written of a bad tick, and more than `max_bad`
    bad ticks in a row stop the run, since the weights are then unlikely to recover."""

    def __init__(self, G_opt, D_opt, max_bad):
        self.max_bad = max_bad
        self.bad_ticks = 0
        self.ls = [(which, opt, var) for which, opt in [('G', G_opt), ('D', D_opt)]
                   for var in opt.variables() if is_loss_scaling_var(var)]
        self._start_tick()

    def _start_tick(self):
        self.steps = {'G': 0, 'D': 0}
        self.finite = {'G': 0, 'D': 0}
        self.ls_start = self._loss_scales()

    def _loss_scales(self):
        return tfutil.run([var for _, _, var in self.ls]) if self.ls else []

    def record(self, which, loss):
        """Count one step of 'G' or 'D' with its mean loss."""
        self.steps[which] += 1
        self.finite[which] += int(np.isfinite(loss))

    def problems(self):
        """What is wrong with the tick so far, one phrase per problem (empty when healthy)."""
        found = ['%s loss non-finite in all %d steps' % (which, self.steps[which])
                 for which in 'GD' if self.steps[which] and not self.finite[which]]
        for (which, opt, _), before, now in zip(self.ls, self.ls_start, self._loss_scales()):
            steps = self.steps[which]
            # Every overflow lowers the scale by loss_scaling_dec; the tolerance absorbs rounding.
            if steps and now <= before - opt.loss_scaling_dec * steps + 1e-3:
                found.append('every %s step overflowed (loss scale 2^%.1f)' % (opt.id, now))
        return found

    def current_tick_bad(self):
        return bool(self.problems()) or self.bad_ticks > 0

    def end_tick(self, cur_tick, cur_nimg, last_snapshot):
        """Close the tick; True when it was bad. Raises TrainingStopped when too many were."""
        problems = self.problems()
        self._start_tick()
        if not problems:
            self.bad_ticks = 0
            return False
        self.bad_ticks += 1
        print('Warning: tick %d (kimg %.3f): %s; steps were skipped, no snapshot written (%d bad tick%s in a row)' % (
            cur_tick, cur_nimg / 1000.0, '; '.join(problems), self.bad_ticks, '' if self.bad_ticks == 1 else 's'))
        if self.bad_ticks > self.max_bad:
            raise TrainingStopped('Training stopped at kimg %.3f: %s for %d ticks in a row (max_nonfinite_ticks=%d). '
                                  'The last good snapshot is %s, left as it was. Lower the learning rates, or for fp16 '
                                  'check the loss-scaling settings, then resume from it.' % (
                                      cur_nimg / 1000.0, '; '.join(problems), self.bad_ticks, self.max_bad,
                                      last_snapshot or 'none (no snapshot was written in this run)'))
        return True


class SignalCatcher:
    """Turns SIGTERM / SIGINT into a flag the loop polls between steps, so that a stop request
    ends in a snapshot instead of lost work. A second Ctrl-C interrupts at once."""

    def __init__(self, signums):
        self.signum = None
        self.previous = {}
        for signum in signums:
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:      # Handlers can only be set from the main thread; elsewhere nothing changes.
                pass

    @property
    def name(self):
        return None if self.signum is None else signal.Signals(self.signum).name

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        sys.stderr.write('\n%s received: finishing the current step, then writing a snapshot...\n' %
                         signal.Signals(signum).name)

    def restore(self):
        """Give the signals back to the handlers they had before."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
