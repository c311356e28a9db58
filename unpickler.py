"""Loading network pickles you did not write: `load_network_pkl`, which `misc.load_pkl` uses.

A pickle can name any importable function and have it called while it loads, so plain
`pickle.load` is for files you trust. `RestrictedUnpickler` admits only the globals a network
pickle is made of and refuses the rest before touching them. A network pickle may also carry
networks source that legacy.py would have to execute; that happens only on request
(`allow_unknown_source=True` or the environment variable WSI_PROGAN_ALLOW_PICKLE_CODE=1).
"""

import builtins
import functools
import importlib
import os
import pickle

import numpy as np

import legacy

ALLOW_CODE_ENV = 'WSI_PROGAN_ALLOW_PICKLE_CODE'

# ----------------------------------------------------------------------------
# Errors.


class RefusedPickleError(pickle.UnpicklingError):
    """The restricted unpickler met a global that a network pickle has no need for."""


class UnknownSourceError(pickle.UnpicklingError):
    """A network's embedded source is not recognised, and executing it was not allowed."""


def env_allows_code():
    setting = os.environ.get(ALLOW_CODE_ENV, '')
    return setting.strip().lower() in ('1', 'true', 'yes', 'on')


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
    """{(module, name): resolver} of everything a network pickle is built from."""
    table = {
        ('tfutil', 'Network'): _network_class,
        ('config', 'EasyDict'): _easydict_class,
        ('numpy', 'ndarray'): lambda: np.ndarray,
        ('numpy', 'dtype'): lambda: np.dtype,
        ('copyreg', '_reconstructor'): _attribute_of('copyreg', '_reconstructor'),
        ('_codecs', 'encode'): _attribute_of('_codecs', 'encode'),
        ('collections', 'OrderedDict'): _attribute_of('collections', 'OrderedDict'),
    }
    # How numpy pickles arrays and scalars, under its numpy 1 and numpy 2 module names.
    numpy_helpers = [('multiarray', '_reconstruct'), ('multiarray', 'scalar'), ('numeric', '_frombuffer')]
    for package in ('numpy.core', 'numpy._core'):
        for submodule, name in numpy_helpers:
            table[('%s.%s' % (package, submodule), name)] = functools.partial(_numpy_internal, submodule, name)
    containers = ['dict', 'list', 'tuple', 'set', 'frozenset', 'bytearray', 'bytes', 'str', 'int', 'float',
                  'complex', 'bool', 'object']
    for name in containers:
        table[('builtins', name)] = functools.partial(getattr, builtins, name)
    return table


_ALLOWED_GLOBALS = _allowed_globals()

_PY2_MODULES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}     # Python 2 names of the same modules.


def _numpy_scalar_type(module, name):
    """numpy.float32 and friends (the classes of numpy scalars), else None."""
    candidate = getattr(np, name, None) if module == 'numpy' else None
    is_scalar_type = isinstance(candidate, type) and issubclass(candidate, np.generic)
    return candidate if is_scalar_type else None


# ----------------------------------------------------------------------------
# The loader.


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what a network pickle needs: numpy arrays, dtypes and scalars (and the helpers
    numpy pickles them with), `tfutil.Network`, `config.EasyDict` and builtin containers. Any
    other global (a function to call, a class to construct) is refused before it is touched."""

    def __init__(self, file, filename=None):
        super().__init__(file, encoding='latin1')     # latin1: numpy arrays in Python 2 pickles.
        self.filename = filename

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
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


def _describe_file(filename):
    return '(no file name)' if filename is None else '"%s"' % filename


def _refuse_embedded_source(filename, what, reason):
    """The gate load_network_pkl puts before legacy.py's execution of embedded source."""
    raise UnknownSourceError(
        'Refused to execute the networks source embedded in the pickle %s for %s: %s. Building it means '
        'running the Python code stored in the file, with your permissions; a pickle from an unknown source '
        'can do anything this way. If you trust the file, pass allow_unknown_source=True to misc.load_pkl, '
        'set %s=1, or load it with pickle.load.' % (_describe_file(filename), what, reason, ALLOW_CODE_ENV))


def load_network_pkl(filename, allow_unknown_source=None):
    """Unpickle a network pickle with RestrictedUnpickler. Embedded networks source that is not
    recognised is executed only if allow_unknown_source is true (None: the environment variable
    WSI_PROGAN_ALLOW_PICKLE_CODE decides)."""
    if allow_unknown_source is None:
        allow_unknown_source = env_allows_code()
    name = str(filename)
    gate = None if allow_unknown_source else functools.partial(_refuse_embedded_source, name)
    with legacy.embedded_source_gate(gate), open(filename, 'rb') as pickle_file:
        return RestrictedUnpickler(pickle_file, name).load()
