"""Loading network pickles you did not write: `load_network_pkl`, which `misc.load_pkl` uses.

A pickle can name any importable function and have it called while it loads, so plain
`pickle.load` is for files you trust. `RestrictedUnpickler` admits only the globals a network
pickle is made of and refuses the rest before touching them. It also keeps what the pickle makes
it allocate (byte strings, arrays) within a small multiple of the file's size, so a few bytes
cannot ask for gigabytes. A network pickle may also carry networks source that legacy.py would
have to execute; unknown source runs only on request (`allow_unknown_source=True` or the
environment variable WSI_PROGAN_ALLOW_PICKLE_CODE=1), or is rebuilt with this project's code when
the user vouches for it (`trusted_sources`, see legacy.py). Every failure names the file.
"""

import builtins
import copyreg
import functools
import importlib
import math
import os
import pickle

import numpy as np

import legacy

ALLOW_CODE_ENV = legacy.ALLOW_CODE_ENV
MEMORY_ALLOWANCE = 8 * 2 ** 20     # Bytes a pickle may have allocated beyond twice its own size.

# ----------------------------------------------------------------------------
# Errors. Each names the file and says what is wrong with it.

UnknownSourceError = legacy.UnknownSourceError


class RefusedPickleError(pickle.UnpicklingError):
    """The restricted unpickler met a global, or a call, that a network pickle has no need for."""


class PickleTooLargeError(pickle.UnpicklingError):
    """Loading the pickle would allocate far more memory than its size accounts for."""


class DamagedPickleError(pickle.UnpicklingError):
    """The file is truncated, or not a pickle at all."""


# ----------------------------------------------------------------------------
# What a network pickle may name. Each entry resolves lazily: a name is imported only when a
# pickle asks for it.


def _numpy_internal(submodule, name):
    """numpy.core.X / numpy._core.X (numpy 1 pickles name the former, numpy 2 the latter)."""
    for package in ('numpy._core', 'numpy.core'):
        try:
            module = importlib.import_module('%s.%s' % (package, submodule))
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError('numpy has no %s.%s' % (submodule, name))


def _network_class():
    import tfutil
    return tfutil.Network


def _easydict_class():
    """config.EasyDict; a plain dict where the running config module defines none (networks
    read their static kwargs as a dict either way)."""
    import config
    return getattr(config, 'EasyDict', dict)


def _attribute_of(module_name, name):
    return lambda: getattr(importlib.import_module(module_name), name)


def _allowed_globals():
    """{(module, name): resolver} of everything else a network pickle is built from (_GUARDED_GLOBALS
    has the rest)."""
    table = {
        ('tfutil', 'Network'): _network_class,
        ('config', 'EasyDict'): _easydict_class,
        ('collections', 'OrderedDict'): _attribute_of('collections', 'OrderedDict'),
    }
    # How numpy pickles arrays and scalars, under its numpy 1 and numpy 2 module names.
    numpy_helpers = [('multiarray', 'scalar'), ('numeric', '_frombuffer')]
    for package in ('numpy.core', 'numpy._core'):
        for submodule, name in numpy_helpers:
            table[('%s.%s' % (package, submodule), name)] = functools.partial(_numpy_internal, submodule, name)
    containers = ['dict', 'list', 'tuple', 'set', 'frozenset', 'str', 'int', 'float', 'complex', 'bool', 'object']
    for name in containers:
        table[('builtins', name)] = functools.partial(getattr, builtins, name)
    return table


_ALLOWED_GLOBALS = _allowed_globals()

_PY2_MODULES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}     # Python 2 names of the same modules.


def _numpy_scalar_type(module, name):
    """numpy.float32 and friends (the classes of numpy scalars), else None."""
    candidate = getattr(np, name, None) if module == 'numpy' else None
    is_scalar_type = (isinstance(candidate, type) and issubclass(candidate, np.generic)
                      and candidate is not np.object_)     # Object arrays are no part of a network.
    return candidate if is_scalar_type else None


# ----------------------------------------------------------------------------
# Globals that allocate memory in proportion to their arguments, not to the file: each is handed
# out as a method of the unpickler that checks the arguments and charges what it allocates.

_GUARDED_GLOBALS = {
    ('builtins', 'bytes'): '_make_bytes',
    ('builtins', 'bytearray'): '_make_bytearray',
    ('_codecs', 'encode'): '_encode',
    ('copyreg', '_reconstructor'): '_reconstructor',
    ('numpy', 'dtype'): '_dtype',
    ('numpy', 'ndarray'): '_ndarray',
    ('numpy.core.multiarray', '_reconstruct'): '_reconstruct_array',
    ('numpy._core.multiarray', '_reconstruct'): '_reconstruct_array',
}

# The codecs pickles encode byte strings with (latin1 from Python 3, the others from Python 2).
_TEXT_CODECS = {'latin1', 'latin-1', 'latin_1', 'iso-8859-1', 'iso8859-1', 'ascii', 'utf-8', 'utf8'}
# What copyreg._reconstructor may rebuild: plain objects, and subclasses of these containers.
_RECONSTRUCTOR_BASES = (dict, list, tuple, set, frozenset)


# ----------------------------------------------------------------------------
# The loader.


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what a network pickle needs: numpy arrays, dtypes and scalars (and the helpers
    numpy pickles them with), `tfutil.Network`, `config.EasyDict` and builtin containers. Any
    other global (a function to call, a class to construct) is refused before it is touched.
    Byte strings and arrays made while loading may take at most twice `file_size` plus
    MEMORY_ALLOWANCE bytes (file_size None: the size of `file`)."""

    def __init__(self, file, filename=None, file_size=None):
        super().__init__(file, encoding='latin1')     # latin1: numpy arrays in Python 2 pickles.
        self.filename = filename
        size = os.fstat(file.fileno()).st_size if file_size is None else file_size
        self.memory_budget = 2 * size + MEMORY_ALLOWANCE
        self.memory_charged = 0

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        guard = _GUARDED_GLOBALS.get((module, name))
        if guard is not None:
            return getattr(self, guard)
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is not None:
            return resolve()
        scalar_type = _numpy_scalar_type(module, name)
        if scalar_type is None:
            raise RefusedPickleError(
                'Refused to load %s.%s from the pickle %s: a network pickle holds only numpy arrays, '
                'tfutil.Network and config.EasyDict objects and builtin containers, and loading this global '
                'could run arbitrary code. If you trust the file and know what it holds, load it with '
                'pickle.load instead.' % (module, name, _describe_file(self.filename)))
        return scalar_type

    def _refuse(self, call, why):
        raise RefusedPickleError('Refused to load the pickle %s: it calls %s, which %s; a network pickle never does.'
                                 % (_describe_file(self.filename), call, why))

    def _charge(self, nbytes, what):
        """Count nbytes against the budget before (or right after) they are allocated."""
        self.memory_charged += nbytes
        if self.memory_charged > self.memory_budget:
            raise PickleTooLargeError(
                'Refused to load the pickle %s: %s would bring what it allocates to %s, more than a file of its '
                'size can hold (at most %s). The file is damaged, or was made to exhaust memory.'
                % (_describe_file(self.filename), what, _megabytes(self.memory_charged),
                   _megabytes(self.memory_budget)))

    # The guarded globals.

    def _byte_string(self, kind, args):
        if args and not isinstance(args[0], (bytes, bytearray, str, list, tuple)):
            self._refuse('%s(%s)' % (kind.__name__, type(args[0]).__name__),
                         'makes a byte string from something other than data (a number allocates that many bytes)')
        result = kind(*args)
        self._charge(len(result), 'a byte string of %d bytes' % len(result))
        return result

    def _make_bytes(self, *args):
        return self._byte_string(bytes, args)

    def _make_bytearray(self, *args):
        return self._byte_string(bytearray, args)

    def _encode(self, text, encoding='utf-8', errors='strict'):
        if not (isinstance(text, str) and str(encoding).lower() in _TEXT_CODECS):
            self._refuse('_codecs.encode(%s, %r)' % (type(text).__name__, encoding),
                         'is not how pickles store byte strings')
        result = text.encode(encoding, errors)
        self._charge(len(result), 'a byte string of %d bytes' % len(result))
        return result

    def _reconstructor(self, cls, base, state):
        plain_object = base is object and state is None
        container = base in _RECONSTRUCTOR_BASES and isinstance(state, base)
        if not (isinstance(cls, type) and issubclass(cls, base) and (plain_object or container)):
            self._refuse('copyreg._reconstructor(%s, %s, %s)' % (_name_of(cls), _name_of(base), type(state).__name__),
                         'builds something other than a plain object or container')
        return copyreg._reconstructor(cls, base, state)

    def _dtype(self, *args):
        dtype = np.dtype(*args)
        if dtype.hasobject:
            self._refuse('numpy.dtype(%r)' % (args[0],), 'describes arrays of Python objects')
        return dtype

    def _ndarray(self, *args):
        self._refuse('numpy.ndarray(...)', 'allocates an array of any size; pickles rebuild arrays with '
                     'numpy\'s _reconstruct')

    def _reconstruct_array(self, subtype, shape, dtype):
        if subtype not in (self._ndarray, np.ndarray):
            self._refuse('numpy _reconstruct(%s)' % _name_of(subtype), 'makes something other than a numpy array')
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
            self._refuse('numpy _reconstruct with shape %r' % (shape,), 'is not an array shape')
        dtype = self._dtype(dtype)
        self._charge(math.prod(shape) * dtype.itemsize, 'an array of shape %s and dtype %s' % (shape, dtype))
        return _numpy_internal('multiarray', '_reconstruct')(np.ndarray, shape, dtype)


def _name_of(obj):
    """How a pickle names a class or function it passes on (a guarded global by its own name)."""
    name = getattr(obj, '__name__', None)
    guarded = ['%s.%s' % key for key, method in _GUARDED_GLOBALS.items() if method == name]
    return guarded[0] if guarded else getattr(obj, '__qualname__', type(obj).__name__)


def _megabytes(nbytes):
    return '%.1f MB' % (nbytes / 1e6)


def _describe_file(filename):
    return '(no file name)' if filename is None else '"%s"' % filename


def load_network_pkl(filename, allow_unknown_source=None, trusted_sources=()):
    """Unpickle a network pickle with RestrictedUnpickler. Embedded networks source that is not
    one we know is executed only if allow_unknown_source is true (None: the environment variable
    WSI_PROGAN_ALLOW_PICKLE_CODE decides); sources whose fingerprints are in trusted_sources (or
    WSI_PROGAN_TRUSTED_SOURCES) count as known. Failures name the file and what is wrong."""
    name = str(filename)
    policy = legacy.policy_from_environment(name, allow_unknown_source, trusted_sources)
    with legacy.source_policy(policy), open(filename, 'rb') as pickle_file:
        try:
            return RestrictedUnpickler(pickle_file, name).load()
        except (RefusedPickleError, PickleTooLargeError, UnknownSourceError):
            raise       # Their messages name the file already.
        except EOFError:
            raise DamagedPickleError(_truncated_message(name)) from None
        except MemoryError:
            raise PickleTooLargeError('Could not load the pickle "%s": it needs more memory than there is. The '
                                      'file is damaged, or was made to exhaust memory.' % name) from None
        except pickle.UnpicklingError as e:
            if 'truncated' in str(e):
                raise DamagedPickleError(_truncated_message(name)) from None
            raise DamagedPickleError('Could not load "%s": it is not a pickle, or it is damaged (%s). A network '
                                     'pickle is a file such as network-snapshot-000140.pkl.' % (name, e)) from None
        except Exception as e:
            e.add_note('While loading the network pickle "%s".' % name)
            raise


def _truncated_message(filename):
    return ('Could not load the pickle "%s": it is truncated (the file ends before the pickle does), as after an '
            'interrupted copy or download. Copy it again, or use an earlier snapshot.' % filename)
