"""Helpers for tests/test_survival.py: starting train.py without waiting, killing it, reading runs."""

import glob
import json
import os
import re
import subprocess
import sys
import time

from train_helpers import REPO

# Runs on 8x8 TFRecords (the data8 fixture): 4x4 for 0.5 kimg, a 0.5-kimg fade, then 8x8; a tick is
# 0.25 kimg (256 images, 8 steps of 32), about a second here.
SCHED = dict(lod_training_kimg=0.5, lod_transition_kimg=0.5, tick_kimg_base=0.25, minibatch_base=8)


def start_train(config_path, log_path):
    """train.py on a config in its own process (output to log_path); returns the Popen."""
    log = open(log_path, 'wb')
    return subprocess.Popen([sys.executable, 'train.py', str(config_path)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)


def wait_for(predicate, timeout, proc=None, interval=0.1):
    """Poll until predicate() is true; False on timeout or when proc ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(interval)
    return False


def snapshots(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, 'network-*.pkl')))


def resume_state(run_dir):
    with open(os.path.join(run_dir, 'resume-state.json'), encoding='utf-8') as file:
        return json.load(file)


def log_text(run_dir):
    path = os.path.join(run_dir, 'log.txt')
    if not os.path.isfile(path):
        return ''
    with open(path, encoding='utf-8', errors='replace') as file:
        return file.read()


def resumed_from(run_dir):
    """(pkl path, exact kimg or None) the run resumed from, or (None, None) for a fresh start."""
    text = log_text(run_dir)
    loaded = re.search(r'^Loading networks from "(.+)"\.\.\.$', text, re.M)
    exact = re.search(r'^Resume state from resume-state\.json: kimg ([\d.]+)', text, re.M)
    return (loaded.group(1) if loaded else None), (float(exact.group(1)) if exact else None)
