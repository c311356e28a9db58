"""Network pickles from elsewhere: the original ProGAN's, WSI-ProGAN's, and files you did not write.

A network pickle holds `(G, D, Gs)`, three `tfutil.Network` objects whose state is a dict
`{'version': 2, 'name', 'static_kwargs', 'build_module_src', 'build_func_name', 'variables'}`.
`build_module_src` is the full source of the networks module that built them. This module
decides how such a state is rebuilt here (`tfutil.Network.__setstate__` calls into it):

1. The import handlers registered in `tfutil.network_import_handlers` convert the state first
   (each is a function state => state, as in the original).
2. If this project's `networks` module has the build function by that name, the pickle's
   static kwargs mean the same to both, and the local build creates exactly the pickle's
   variables (names and shapes), the network is built from the local module (NHWC inside) and
   no code from the file runs. The embedded source is kept, so saving again stays faithful.
3. Otherwise the embedded source is executed under a TensorFlow 1 compatibility shim (a stand-in
   for `tensorflow` that maps TF1 names onto `tensorflow.compat.v1` and runs NCHW convolutions
   and pools through NHWC transposes, which CPUs require), and a line says so.

Executing embedded source runs Python code from the file. Whoever unpickles decides whether it
may, through `embedded_source_gate`: `misc.load_pkl` (unpickler.py) refuses unless asked, plain
`pickle.load` is for files you trust and runs it without asking.

Imports go one way: tfutil and unpickler use this module; it uses only the standard library,
numpy, and (when a network is actually rebuilt, so importing it stays light) tf_compat and networks.
"""

import ast
import builtins
import contextlib
import contextvars
import inspect
import types

import numpy as np

# ----------------------------------------------------------------------------
# Who may execute embedded source. Plain pickle.load runs it (the caller trusts the file); a
# loader that does not trust it sets a gate for the duration of its load. Context variables
# follow the call into Network.__setstate__ and are private to each thread.

_source_gate = contextvars.ContextVar('wsi_progan_embedded_source_gate', default=None)


@contextlib.contextmanager
def embedded_source_gate(gate):
    """Within the block, gate(what, reason) is called before any networks source embedded in a
    pickle is executed, and refuses by raising; None lets the source run."""
    token = _source_gate.set(gate)
    try:
        yield
    finally:
        _source_gate.reset(token)


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
    """The function to build the state's network with: this project's, when it is recognised
    (see recognise_local_build), else the embedded source's, executed under the TF1 shim once
    the current embedded_source_gate lets it."""
    func, reason = recognise_local_build(state)
    if func is not None:
        return func
    what = 'network "%s" (build function %s)' % (state['name'], state['build_func_name'])
    gate = _source_gate.get()
    if gate is not None:
        gate(what, reason)
    print('Loading %s: %s; executing the networks source embedded in the pickle under the TensorFlow 1 '
          'compatibility shim.' % (what, reason))
    module = module_from_source(state['build_module_src'])
    func = getattr(module, state['build_func_name'], None)
    if not callable(func):
        raise ValueError('The networks source embedded in the pickle defines no function %s' % state['build_func_name'])
    return func


def recognise_local_build(state):
    """(local build function, None) when this project's networks module can rebuild the state
    faithfully, else (None, reason)."""
    import networks
    name = state['build_func_name']
    func = getattr(networks, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (inspect.isfunction(func) and func.__module__ == networks.__name__):
        return None, 'this project\'s networks module has no build function %r' % (name,)
    if state['build_module_src'] == _module_source(networks):
        return func, None       # Written by this very networks module.
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
    """The state's (name, value) pairs, after checking that the built network has each of them
    with the same shape (a clear error instead of a KeyError deep in set_vars)."""
    problems = []
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
