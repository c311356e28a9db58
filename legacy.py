"""Network pickles from elsewhere: the original ProGAN's, WSI-ProGAN's, and files you did not write.

A network pickle holds `(G, D, Gs)`, three `tfutil.Network` objects whose state is a dict
`{'version': 2, 'name', 'static_kwargs', 'build_module_src', 'build_func_name', 'variables'}`.
`build_module_src` is the full source of the networks module that built them. This module
decides how such a state is rebuilt here (`tfutil.Network.__setstate__` calls into it):

1. The import handlers registered in `tfutil.network_import_handlers` convert the state first
   (each is a function state => state, as in the original).
2. The embedded source must be one we know (`KNOWN_SOURCES`: this project's networks.py at each of
   its states, and the original ProGAN's and WSI-ProGAN's; also the current local networks.py, and
   any fingerprint the user vouches for, see `source_policy`). Sources are compared by fingerprint
   (`source_fingerprint`), so formatting, comments and docstrings do not matter.
3. If the source is known, this project's `networks` module has the build function by that name,
   the pickle's static kwargs mean the same to both, and the local build creates exactly the
   pickle's variables (names and shapes), the network is built from the local module (NHWC inside)
   and carries this project's source from then on: what it is saved with is code we wrote.
4. Otherwise the embedded source is executed under a TensorFlow 1 compatibility shim (a stand-in
   for `tensorflow` that maps TF1 names onto `tensorflow.compat.v1` and runs NCHW convolutions
   and pools through NHWC transposes, which CPUs require), and a line says so. Known source runs
   without asking; unknown source runs only when the user allowed it (`source_policy`, or the
   environment variable WSI_PROGAN_ALLOW_PICKLE_CODE=1), whichever loader is used, plain
   `pickle.load` included.

Imports go one way: tfutil and unpickler use this module; it uses only the standard library,
numpy, and (when a network is actually rebuilt, so importing it stays light) tf_compat and networks.
"""

import ast
import builtins
import contextlib
import contextvars
import functools
import hashlib
import inspect
import os
import pickle
import types

import numpy as np

# ----------------------------------------------------------------------------
# Which networks sources we know. A fingerprint is the SHA-256 of the module's syntax tree with
# docstrings removed, written out by _canonical_tree: reformatting, comments and docstrings leave
# it unchanged, any change to what the code does changes it. Each entry was computed with
# source_fingerprint from the file named (for this project: `git show COMMIT:networks.py`).

KNOWN_SOURCES = {
    '2a007c24ca7e6d68fcfd445cbac628720c9cc8ac144e8bbce875d081b9b07fe8': "this project's networks.py at 6df2c30",
    '0da9c0cff69257f64456bdea21714591d774ae8055201d462627d6e3e18a7f2b': "this project's networks.py at 7134c70",
    'c074a99b72e75d7b3117922e98706a402bb4d428c3a3b4ab2977d7c214f9e379': "this project's networks.py at 6153bc9",
    '7f082236c5b16f89d84fc3222b992dab5e415515b06436bed40de626749ff052': "this project's networks.py at 99e63f0",
    # The two differ only in trailing whitespace.
    '56882b3d0f23a385e0b6707ebaff74ea495f4a1703e7770954dc0e4abfe55478':
        "networks.py of the original ProGAN (tkarras/progressive_growing_of_gans at fdc55b9) and of WSI-ProGAN "
        "(SarderLab/WSI-ProGAN at 1bda3a8)",
}

ALLOW_CODE_ENV = 'WSI_PROGAN_ALLOW_PICKLE_CODE'
TRUSTED_SOURCES_ENV = 'WSI_PROGAN_TRUSTED_SOURCES'      # Fingerprints the user vouches for, comma-separated.


def source_fingerprint(source):
    """The fingerprint of a networks module's source (see KNOWN_SOURCES), or None if it does not parse."""
    try:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            body = getattr(node, 'body', None)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and _starts_with_docstring(body):
                node.body = body[1:] or [ast.Pass()]
        text = _canonical_tree(tree)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):    # Not Python we can read.
        return None
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


def _starts_with_docstring(body):
    first = body[0] if body else None
    return (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str))


# Fields newer Pythons added (or show) with no effect on what the code does here; left out so a
# fingerprint is the same on every Python version.
_VERSION_DEPENDENT_FIELDS = ('kind', 'type_comment', 'type_params', 'type_ignores')


def _canonical_tree(node):
    """A text form of a syntax tree (like ast.dump, whose output varies between Python versions):
    node types and fields, without positions, empty fields and _VERSION_DEPENDENT_FIELDS."""
    if isinstance(node, ast.AST):
        fields = ['%s=%s' % (name, _canonical_tree(value)) for name, value in ast.iter_fields(node)
                  if name not in _VERSION_DEPENDENT_FIELDS and value is not None and value != []]
        return '%s(%s)' % (type(node).__name__, ','.join(fields))
    if isinstance(node, list):
        return '[%s]' % ','.join(_canonical_tree(item) for item in node)
    return repr(node)


def local_networks_source():
    import networks
    return _module_source(networks)


# ----------------------------------------------------------------------------
# What the loader allows: executing unknown embedded source (only when asked), and fingerprints
# the user vouches for. A loader sets a SourcePolicy for the duration of its load; otherwise
# (plain pickle.load) it comes from the environment. Context variables follow the call into
# Network.__setstate__ and are private to each thread.


class UnknownSourceError(pickle.UnpicklingError):
    """A network's embedded source is not one we know, and executing it was not allowed."""


class SourcePolicy:
    """Whether unknown embedded source may be executed, and the fingerprints trusted as known."""

    def __init__(self, allow_unknown=False, trusted=(), filename=None):
        self.allow_unknown = bool(allow_unknown)
        self.trusted = frozenset(trusted)
        self.filename = filename      # For messages; None when the loader does not know it.


def _env_flag(name):
    return os.environ.get(name, '').strip().lower() in ('1', 'true', 'yes', 'on')


def policy_from_environment(filename=None, allow_unknown=None, trusted=()):
    """A SourcePolicy; allow_unknown None means WSI_PROGAN_ALLOW_PICKLE_CODE decides, and the
    fingerprints in WSI_PROGAN_TRUSTED_SOURCES are trusted along with `trusted`."""
    if allow_unknown is None:
        allow_unknown = _env_flag(ALLOW_CODE_ENV)
    from_env = [f.strip() for f in os.environ.get(TRUSTED_SOURCES_ENV, '').split(',') if f.strip()]
    given = [trusted] if isinstance(trusted, str) else list(trusted)     # One fingerprint or several.
    return SourcePolicy(allow_unknown, given + from_env, filename)


_policy = contextvars.ContextVar('wsi_progan_source_policy', default=None)


@contextlib.contextmanager
def source_policy(policy):
    """Within the block, networks unpickled follow `policy` (a SourcePolicy)."""
    token = _policy.set(policy)
    try:
        yield
    finally:
        _policy.reset(token)


def current_policy():
    policy = _policy.get()
    return policy_from_environment() if policy is None else policy


def is_known_source(source, policy):
    fingerprint = source_fingerprint(source)
    return fingerprint is not None and (fingerprint in KNOWN_SOURCES or fingerprint in policy.trusted
                                        or fingerprint == _local_fingerprint())


@functools.lru_cache(maxsize=1)
def _local_fingerprint():
    return source_fingerprint(local_networks_source())


def _refuse_unknown_source(state, what, reason, policy):
    where = 'the pickle "%s"' % policy.filename if policy.filename else 'the pickle being loaded'
    raise UnknownSourceError(
        'Refused to execute the networks source embedded in %s for %s: %s. Building it means running the '
        'Python code stored in the file, with your permissions; a pickle from an unknown source can do anything '
        'this way. If you have reviewed that source, trust its fingerprint %s (trusted_sources=[...] in '
        'misc.load_pkl, or %s=<fingerprint>) to rebuild it with this project\'s code; to execute it as it is, pass '
        'allow_unknown_source=True to misc.load_pkl or set %s=1.'
        % (where, what, reason, source_fingerprint(state['build_module_src']), TRUSTED_SOURCES_ENV, ALLOW_CODE_ENV))


# ----------------------------------------------------------------------------
# From a pickled state to a build function.

STATE_KEYS = ('version', 'name', 'static_kwargs', 'build_module_src', 'build_func_name', 'variables')


def import_state(state, handlers=()):
    """Apply the import handlers (state => state), then check the state's shape."""
    for handler in handlers:
        state = handler(state)
        if not isinstance(state, dict):
            raise TypeError('Network import handler %r returned %r, not a state dict'
                            % (getattr(handler, '__name__', handler), type(state).__name__))
    if state.get('version') != 2:
        raise ValueError('Unsupported Network pickle version %r (this project reads version 2; register a '
                         'converter in tfutil.network_import_handlers for others)' % (state.get('version'),))
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise ValueError('Network pickle state lacks %s' % ', '.join(missing))
    return state


def build_func_for_state(state):
    """(build function, source the network carries from now on) for the state: this project's
    function and source when it is recognised (see recognise_local_build), else the embedded
    source's, executed under the TF1 shim if it is known or the current policy allows it."""
    func, reason = recognise_local_build(state)
    if func is not None:
        return func, local_networks_source()
    what = 'network "%s" (build function %s)' % (state['name'], state['build_func_name'])
    policy = current_policy()
    if not (policy.allow_unknown or is_known_source(state['build_module_src'], policy)):
        _refuse_unknown_source(state, what, reason, policy)
    print('Loading %s: %s; executing the networks source embedded in the pickle under the TensorFlow 1 '
          'compatibility shim.' % (what, reason))
    module = module_from_source(state['build_module_src'])
    func = getattr(module, state['build_func_name'], None)
    if not callable(func):
        raise ValueError('The networks source embedded in the pickle defines no function %s' % state['build_func_name'])
    return func, state['build_module_src']


def recognise_local_build(state):
    """(local build function, None) when the state's source is known and this project's networks
    module can rebuild the state faithfully, else (None, reason)."""
    import networks
    name = state['build_func_name']
    func = getattr(networks, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (inspect.isfunction(func) and func.__module__ == networks.__name__):
        return None, 'this project\'s networks module has no build function %r' % (name,)
    source = state['build_module_src']
    if source == local_networks_source():
        return func, None       # Written by this very networks module.
    if not is_known_source(source, current_policy()):
        return None, 'its networks source is not one this project knows (fingerprint %s)' % source_fingerprint(source)
    reason = _signature_difference(func, state)
    if reason is None:
        reason = _variable_difference(func, state)
    return (func, None) if reason is None else (None, reason)


def _module_source(module):
    try:
        return inspect.getsource(module)
    except (OSError, TypeError):
        return None


_NO_DEFAULT = object()


def _embedded_signature(source, func_name):
    """{parameter: default (or _NO_DEFAULT, or None when not a literal)} of a top-level function
    in the embedded source, read with ast (nothing is executed); None if not found."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, TypeError):
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func_name:
            args = node.args
            positional = args.posonlyargs + args.args
            defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            params = {}
            for arg, default in list(zip(positional, defaults)) + list(zip(args.kwonlyargs, args.kw_defaults)):
                params[arg.arg] = _NO_DEFAULT if default is None else _literal(default)
            return params
    return None


class _NotLiteral:
    pass


def _literal(node):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NotLiteral


def _signature_difference(func, state):
    """Why the embedded build function's parameters may mean something else than the local
    one's, or None. Only parameters that matter for this state are compared."""
    embedded = _embedded_signature(state['build_module_src'], state['build_func_name'])
    if embedded is None:
        return None     # Nothing to compare with; the variables decide.
    local = {p.name: (_NO_DEFAULT if p.default is p.empty else p.default)
             for p in inspect.signature(func).parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)}
    inputs_embedded = [n for n, d in embedded.items() if d is _NO_DEFAULT]
    inputs_local = [n for n, d in local.items() if d is _NO_DEFAULT]
    if inputs_embedded != inputs_local:
        return 'its inputs (%s) differ from this project\'s %s (%s)' % (
            ', '.join(inputs_embedded), state['build_func_name'], ', '.join(inputs_local))
    static_kwargs = state['static_kwargs']
    for key in static_kwargs:
        if (key in embedded) != (key in local):
            return 'its static argument %s=%r is a parameter of only one of the pickle\'s and this project\'s %s' % (
                key, static_kwargs[key], state['build_func_name'])
    for key, default in embedded.items():
        if key in static_kwargs or default is _NO_DEFAULT or key == 'is_template_graph':
            continue
        if key not in local:
            return 'the pickle\'s %s has a parameter %s that this project\'s lacks' % (state['build_func_name'], key)
        if default is not _NotLiteral and not _same_value(default, local[key]):
            return 'the default of %s differs (%r in the pickle, %r here)' % (key, default, local[key])
    return None


def _same_value(a, b):
    try:
        return bool(a == b) and (type(a) is type(b) or all(isinstance(v, (int, float)) for v in (a, b)))
    except Exception:
        return False


def _variable_difference(func, state):
    """Why the local build's variables (names and shapes) differ from the state's, or None."""
    try:
        local = local_variable_shapes(func, state['static_kwargs'])
    except Exception as e:     # The local function cannot build these arguments.
        return 'this project\'s %s cannot build it (%s: %s)' % (state['build_func_name'], type(e).__name__, e)
    pickled = {name: list(np.shape(value)) for name, value in state['variables']}
    missing = sorted(set(pickled) - set(local))
    extra = sorted(set(local) - set(pickled))
    reshaped = sorted(n for n in set(pickled) & set(local) if pickled[n] != local[n])
    if not (missing or extra or reshaped):
        return None
    parts = []
    if missing:
        parts.append('variables only in the pickle: %s' % ', '.join(missing[:5]))
    if extra:
        parts.append('variables only in this project\'s build: %s' % ', '.join(extra[:5]))
    if reshaped:
        parts.append('shapes differ for %s' % ', '.join('%s (%s here, %s in the pickle)' % (n, local[n], pickled[n])
                                                         for n in reshaped[:5]))
    return 'its variables do not match this project\'s %s (%s)' % (state['build_func_name'], '; '.join(parts))


def local_variable_shapes(func, static_kwargs):
    """{local name: shape} of the variables `func` creates, built in a scratch graph."""
    from tf_compat import tf
    input_names = [p.name for p in inspect.signature(func).parameters.values()
                   if p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty]
    with tf.Graph().as_default():
        with tf.variable_scope('probe', reuse=tf.AUTO_REUSE):
            inputs = [tf.placeholder(tf.float32, name=name) for name in input_names]
            func(*inputs, is_template_graph=True, **static_kwargs)
        return {var.name[len('probe/'):].split(':')[0]: var.shape.as_list() for var in tf.global_variables()}


def checked_variables(net, state):
    """The state's (name, value) pairs, after checking that they are exactly the built network's
    variables with the same shapes (a clear error instead of a KeyError deep in set_vars, and no
    variable is allocated that the pickle does not pay for with its own data)."""
    pickled = {name for name, _ in state['variables']}
    problems = ['%s is missing from the pickle' % name for name in net.vars if name not in pickled]
    for name, value in state['variables']:
        if name not in net.vars:
            problems.append('%s is not a variable of the built network' % name)
        elif list(np.shape(value)) != net.vars[name].shape.as_list():
            problems.append('%s has shape %s in the pickle but %s in the built network'
                            % (name, list(np.shape(value)), net.vars[name].shape.as_list()))
    if problems:
        raise ValueError('Network "%s": the pickle\'s variables do not fit the network built from it: %s'
                         % (state['name'], '; '.join(problems[:8])))
    return state['variables']


# ----------------------------------------------------------------------------
# Executing embedded source under the TF1 compatibility shim.

_shim = None
_source_modules = []      # Modules made from embedded source: one per distinct text, kept alive.


def module_from_source(source):
    """The module made by executing a pickle's embedded networks source under the TF1 shim;
    pickles with the same source (G, D and Gs of one file) share it."""
    for module in _source_modules:
        if module.__network_pickle_source__ == source:
            return module
    module_name = '_tfutil_network_import_module_%d' % len(_source_modules)
    module = exec_source_module(source, module_name)
    module.__network_pickle_source__ = source
    _source_modules.append(module)
    return module


def exec_source_module(source, module_name):
    """A new module from `source`, with `import tensorflow` (and `tensorflow.compat.v1`) inside it
    bound to the TF1 compatibility shim."""
    module = types.ModuleType(module_name)
    module.__dict__['__builtins__'] = _shim_builtins()
    exec(compile(source, '<network pickle source: %s>' % module_name, 'exec'), module.__dict__)
    return module


def _shim_builtins():
    real_import = builtins.__import__

    def shim_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name in ('tensorflow', 'tensorflow.compat', 'tensorflow.compat.v1'):
            return tf1_shim()
        return real_import(name, globals, locals, fromlist, level)

    namespace = dict(builtins.__dict__)
    namespace['__import__'] = shim_import
    return namespace


class _ShimModule(types.ModuleType):
    """A module whose missing attributes come from another module."""

    def __init__(self, name, base):
        super().__init__(name)
        self._shim_base = base

    def __getattr__(self, name):
        if name.startswith('__') and name.endswith('__'):
            raise AttributeError(name)
        return getattr(self._shim_base, name)


def tf1_shim():
    """The stand-in for `tensorflow` (TF 1.x) inside executed pickle source: tensorflow.compat.v1
    (graph mode, variable_scope, get_variable, initializers, rsqrt, ...) with NCHW convolutions and
    pools in tf.nn run as NHWC between transposes, since CPU kernels accept only NHWC."""
    global _shim
    if _shim is None:
        from tf_compat import tf
        nn = _ShimModule('tensorflow.nn', tf.nn)
        for op_name in ('conv2d', 'conv2d_transpose', 'avg_pool', 'max_pool', 'bias_add'):
            setattr(nn, op_name, _nchw_wrapper(getattr(tf.nn, op_name), op_name))
        shim = _ShimModule('tensorflow', tf)
        shim.nn = nn
        compat = _ShimModule('tensorflow.compat', tf.compat)
        compat.v1 = shim
        shim.compat = compat
        shim.__version__ = '1.15.0-compat-shim (TensorFlow %s)' % tf.VERSION
        _shim = shim
    return _shim


def _nhwc_order(values):
    """An NCHW-ordered 4-list (strides, ksize, dilations, paddings, shapes) in NHWC order."""
    return [values[0], values[2], values[3], values[1]]


def _is_4_list(value):
    return isinstance(value, (list, tuple)) and len(value) == 4


def _nchw_wrapper(op, op_name):
    from tf_compat import tf
    signature = inspect.signature(op)

    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        arguments = bound.arguments
        data_format = arguments.get('data_format')
        if data_format not in ('NCHW', b'NCHW'):
            return op(*args, **kwargs)
        # The input tensor: TF1 named it `value` for pools/bias_add/conv2d_transpose, `input` for conv2d.
        x_key = next(k for k in ('input', 'value') if arguments.get(k) is not None)
        x = tf.convert_to_tensor(arguments[x_key])
        if x.shape.ndims != 4:      # bias_add on NC tensors and the like.
            return op(*args, **kwargs)
        arguments[x_key] = tf.transpose(x, [0, 2, 3, 1])
        arguments['data_format'] = 'NHWC'
        for key in ('strides', 'ksize', 'dilations', 'padding'):
            if _is_4_list(arguments.get(key)):
                arguments[key] = _nhwc_order(list(arguments[key]))
        if op_name == 'conv2d_transpose':
            shape = arguments.get('output_shape')
            if isinstance(shape, (list, tuple)):
                arguments['output_shape'] = _nhwc_order([tf.compat.dimension_value(d) for d in shape])
            else:
                arguments['output_shape'] = tf.gather(shape, [0, 2, 3, 1])
        y = op(*bound.args, **bound.kwargs)
        return tf.transpose(y, [0, 3, 1, 2])

    wrapper.__name__ = op_name
    wrapper.__doc__ = 'NCHW-capable %s: NHWC between transposes (TF1 compatibility shim).' % op_name
    return wrapper
