"""What the restricted unpickler does with hostile or broken files: pickles that ask for gigabytes
from a few bytes are refused before the memory is taken, and every failure names the file and
what is wrong with it. The hostile pickles are written opcode by opcode, as an attacker would."""

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import unpickler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUGE = 1_500_000_000           # 1.5 GB in one request.


def int_arg(n):
    """The pickle opcodes pushing the integer n (BININT for 32 bits, else protocol 0's INT line)."""
    return b'J' + struct.pack('<i', n) if n < 2 ** 31 else b'I%d\n' % n


def call(module, name, *args):
    """GLOBAL module.name, MARK, the arguments (already opcodes), TUPLE, REDUCE."""
    return b'c%s\n%s\n(%stR' % (module.encode(), name.encode(), b''.join(args))


def glob(module, name):
    return b'c%s\n%s\n' % (module.encode(), name.encode())


HOSTILE = {
    # 31 bytes: the whole attack is one number.
    'bytearray_from_int': b'\x80\x04' + call('builtins', 'bytearray', int_arg(HUGE)) + b'.',
    'bytes_from_int': b'\x80\x02' + call('__builtin__', 'bytes', int_arg(HUGE)) + b'.',
    # bytearray.__init__(obj, 1500000000) through copyreg.
    'reconstructor_bytearray': b'\x80\x02' + call('copyreg', '_reconstructor', glob('builtins', 'bytearray'),
                                                  glob('builtins', 'bytearray'), int_arg(HUGE)) + b'.',
    # numpy's _reconstruct(ndarray, (100e9,), 'b'): a 100 GB array.
    'reconstruct_100GB': b'\x80\x02' + call('numpy.core.multiarray', '_reconstruct', glob('numpy', 'ndarray'),
                                            b'(' + int_arg(100_000_000_000) + b't', b'Vb\n') + b'.',
    'reconstruct_1.5GB': b'\x80\x02' + call('numpy._core.multiarray', '_reconstruct', glob('numpy', 'ndarray'),
                                            b'(' + int_arg(HUGE) + b't', b'Vb\n') + b'.',
    # numpy.ndarray((1.5e9,), 'b') called directly.
    'ndarray_call': b'\x80\x02' + call('numpy', 'ndarray', b'(' + int_arg(HUGE) + b't', b'Vb\n') + b'.',
}
REFUSED = {'bytearray_from_int': 'bytearray(int)', 'bytes_from_int': 'bytes(int)',
           'reconstructor_bytearray': 'copyreg._reconstructor(builtins.bytearray, builtins.bytearray, int)',
           'ndarray_call': 'numpy.ndarray(...)'}
TOO_LARGE = {'reconstruct_100GB': 'an array of shape (100000000000,)', 'reconstruct_1.5GB': 'an array of shape'}


def object_array_pickle(length):
    """A numpy array of Python objects claiming `length` elements, with none in its data list
    (numpy 2.x fills such an array element by element from the list it is given)."""
    dtype = call('numpy', 'dtype', b'VO8\n\x89\x88')
    build = b'(K\x01(' + int_arg(length) + b't' + dtype + b'\x89]tb'
    return b'\x80\x02' + call('numpy._core.multiarray', '_reconstruct', glob('numpy', 'ndarray'),
                              b'(K\x00t', b'Vb\n') + build + b'.'


def copies_pickle(chunk, copies):
    """One byte string of `chunk` bytes in the file, copied `copies` times by bytearray(): memory
    grows with `copies`, the file does not."""
    head = b'\x80\x04' + glob('builtins', 'bytearray') + b'\x94' + b'0'      # memo 0, popped
    data = b'B' + struct.pack('<I', chunk) + b'x' * chunk + b'\x94' + b'0'   # memo 1, popped
    body = b'(' + b'h\x00h\x01\x85R' * copies + b'l'
    return head + data + body + b'.'


# Peak memory is VmHWM, the peak resident set of this process's own memory: unlike ru_maxrss, it
# does not carry over the RSS of the (large) pytest process the subprocess was forked from.
LOAD_ALL = textwrap.dedent('''
    import json, sys
    import unpickler

    def peak_rss_mb():
        with open('/proc/self/status') as status:
            return next(int(line.split()[1]) for line in status if line.startswith('VmHWM:')) / 1024

    baseline = peak_rss_mb()
    results = {}
    for name, path in json.loads(sys.argv[1]).items():
        try:
            unpickler.load_network_pkl(path)
            results[name] = ['loaded', '']
        except Exception as e:
            results[name] = [type(e).__name__, str(e)]
    print(json.dumps(dict(results=results, baseline_mb=baseline, peak_mb=peak_rss_mb(),
                          tensorflow='tensorflow' in sys.modules)))
''')


def test_pickles_asking_for_gigabytes_are_refused_in_little_memory(tmp_path):
    files = dict(HOSTILE, object_array=object_array_pickle(200_000_000), copies=copies_pickle(2 ** 20, 100))
    paths = {}
    for name, data in files.items():
        paths[name] = str(tmp_path / ('%s.pkl' % name))
        with open(paths[name], 'wb') as f:
            f.write(data)
    assert len(HOSTILE['bytearray_from_int']) <= 36
    proc = subprocess.run([sys.executable, '-c', LOAD_ALL, json.dumps(paths)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = report['results']
    for name, call_text in REFUSED.items():
        kind, message = results[name]
        assert kind == 'RefusedPickleError' and call_text in message and paths[name] in message, (name, kind, message)
    for name, what in TOO_LARGE.items():
        kind, message = results[name]
        assert kind == 'PickleTooLargeError' and what in message and paths[name] in message, (name, kind, message)
    kind, message = results['object_array']
    assert kind == 'RefusedPickleError' and 'Python objects' in message, (kind, message)
    # 100 copies of 1 MB from a 1 MB file: more than twice the file plus the allowance.
    kind, message = results['copies']
    assert kind == 'PickleTooLargeError' and 'a byte string of 1048576 bytes' in message, (kind, message)
    # The peak of the whole process, which never imported TensorFlow, with every hostile file loaded.
    assert not report['tensorflow']
    assert report['peak_mb'] < 200, report


def test_budget_leaves_room_for_real_arrays(tmp_path):
    # An ordinary pickle of arrays, under numpy 2 and (protocol 2) Python-2-style names, loads unchanged.
    arrays = [np.arange(300_000, dtype=np.float32), np.ones((3, 5), np.float16), np.float32(2.5)]
    for protocol in (2, 4, 5):
        path = tmp_path / ('arrays-%d.pkl' % protocol)
        path.write_bytes(pickle.dumps(arrays, protocol=protocol))
        with open(path, 'rb') as f:
            loaded = unpickler.RestrictedUnpickler(f, str(path)).load()
        for a, b in zip(arrays, loaded):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype


def _network_like_pickle():
    return pickle.dumps([np.zeros(5000, np.float32), {'name': 'G'}], protocol=4)


@pytest.mark.parametrize('case', ['truncated', 'cut_in_header', 'empty', 'html', 'text'])
def test_damaged_files_are_named_with_what_is_wrong(tmp_path, case):
    data = _network_like_pickle()
    content, expected = {
        'truncated': (data[:len(data) // 2], 'is truncated'),
        'cut_in_header': (data[:3], 'is truncated'),
        'empty': (b'', 'is truncated'),
        'html': (b'<!DOCTYPE html><html><body>Sign in to download</body></html>', 'is not a pickle'),
        'text': (b'G_paper latents 512\n', 'is not a pickle'),
    }[case]
    path = tmp_path / 'network-snapshot-000140.pkl'
    path.write_bytes(content)
    with pytest.raises(Exception) as excinfo:
        unpickler.load_network_pkl(str(path))
    message = str(excinfo.value)
    assert '"%s"' % path in message and expected in message, (excinfo.type, message)
    assert excinfo.type is unpickler.DamagedPickleError
