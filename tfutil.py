"""The TensorFlow layer: sessions, import by name, autosummaries, the multi-device Optimizer and
the picklable Network wrapper.

Every module gets TensorFlow from here (`from tf_compat import tf`): TF 2.x run as TF 1.x graph
code through `tensorflow.compat.v1`, switched to graph mode once, in this one place.
"""

import importlib
import inspect
import sys
import weakref
from collections import OrderedDict

import numpy as np
from tf_compat import tf

# ----------------------------------------------------------------------------
# Small helpers.


def run(*args, **kwargs):
    """Run in the default session."""
    return tf.get_default_session().run(*args, **kwargs)


def is_tf_expression(x):
    return isinstance(x, (tf.Tensor, tf.Variable, tf.Operation))


def shape_to_list(shape):
    return tf.TensorShape(shape).as_list()


def flatten(x):
    with tf.name_scope('Flatten'):
        return tf.reshape(x, [-1])


def log2(x):
    with tf.name_scope('Log2'):
        return tf.log(x) * np.float32(1.0 / np.log(2.0))


def exp2(x):
    with tf.name_scope('Exp2'):
        return tf.exp(x * np.float32(np.log(2.0)))


def lerp(a, b, t):
    with tf.name_scope('Lerp'):
        return a + (b - a) * t


def lerp_clip(a, b, t):
    with tf.name_scope('LerpClip'):
        return a + (b - a) * tf.clip_by_value(t, 0.0, 1.0)


def absolute_name_scope(scope):
    """A name scope that ignores the surrounding one."""
    return tf.name_scope(scope + '/')


# ----------------------------------------------------------------------------
# Sessions and devices.

DEFAULT_TF_CONFIG = {
    'graph_options.place_pruned_graph': True,   # Only place ops that are actually run.
    'gpu_options.allow_growth': True,           # Do not grab all GPU memory at start.
}


def init_tf(config_dict=None):
    """Create the default session (once per process), seeding numpy and TF from config."""
    if tf.get_default_session() is None:
        seed = _config_value('random_seed', None)
        if seed is not None:
            np.random.seed(seed)
            tf.set_random_seed(np.random.randint(1 << 31))
        merged = dict(_config_value('tf_config', {}))
        merged.update(config_dict or {})
        create_session(merged, force_as_default=True)


def _config_value(name, default):
    config = sys.modules.get('config')
    return getattr(config, name, default) if config is not None else default


def create_session(config_dict=None, force_as_default=False):
    """A session from a dict of dotted ConfigProto fields, e.g. {'device_count.CPU': 2}."""
    fields = dict(DEFAULT_TF_CONFIG)
    fields.update(config_dict or {})
    config = tf.ConfigProto()
    for dotted, value in fields.items():
        _set_proto_field(config, dotted, value)
    session = tf.Session(config=config)
    if force_as_default:
        # Keep the session default for the rest of the process, like an entered `with`.
        session._default_session = session.as_default()
        session._default_session.enforce_nesting = False
        session._default_session.__enter__()
    return session


def _set_proto_field(proto, dotted, value):
    *parents, last = dotted.split('.')
    obj = proto
    for name in parents:
        obj = getattr(obj, name)
    if hasattr(obj, 'DESCRIPTOR'):
        setattr(obj, last, value)
    else:   # A proto map such as device_count.
        obj[last] = value


def num_gpus_available():
    return len(tf.config.list_physical_devices('GPU'))


def device_names(count):
    """One device per tower: GPUs where they exist, otherwise (virtual) CPU devices."""
    kind = 'gpu' if num_gpus_available() > 0 else 'cpu'
    return ['/%s:%d' % (kind, i) for i in range(count)]


def init_uninited_vars(variables=None):
    """Initialise the variables (default: all globals) that are not initialised yet."""
    if variables is None:
        variables = tf.global_variables()
    test_vars, test_ops = [], []
    with tf.control_dependencies(None):
        for var in variables:
            assert is_tf_expression(var)
            try:
                tf.get_default_graph().get_tensor_by_name(var.name.replace(':0', '/IsVariableInitialized:0'))
            except KeyError:
                test_vars.append(var)
                with absolute_name_scope(var.name.split(':')[0]):
                    test_ops.append(tf.is_variable_initialized(var))
    init_vars = [var for var, inited in zip(test_vars, run(test_ops)) if not inited]
    run([var.initializer for var in init_vars])


def set_vars(var_to_value_dict):
    """Assign numpy values to variables, reusing one assign op per variable."""
    ops, feed_dict = [], {}
    for var, value in var_to_value_dict.items():
        assert is_tf_expression(var)
        try:
            setter = tf.get_default_graph().get_tensor_by_name(var.name.replace(':0', '/setter:0'))
        except KeyError:
            with absolute_name_scope(var.name.split(':')[0]):
                with tf.control_dependencies(None):
                    setter = tf.assign(var, tf.placeholder(var.dtype, var.shape, 'new_value'), name='setter')
        ops.append(setter)
        feed_dict[setter.op.inputs[1]] = value
    run(ops, feed_dict)


# ----------------------------------------------------------------------------
# Import objects by dotted name ('networks.G_paper', 'tf.train.AdamOptimizer').


def import_module(name):
    """Split 'module.sub.obj' into (module, 'obj') by importing the longest module prefix.

    Names starting with 'tf.' resolve against tensorflow.compat.v1, so old configs that say
    'tf.train.AdamOptimizer' get the TF1 class.
    """
    parts = name.split('.')
    if parts[0] == 'tf':
        return tf, '.'.join(parts[1:])
    for i in range(len(parts) - 1, 0, -1):
        try:
            return importlib.import_module('.'.join(parts[:i])), '.'.join(parts[i:])
        except ImportError:
            continue
    raise ImportError('Cannot import "%s"' % name)


def find_obj_in_module(module, relative_name):
    obj = module
    for part in relative_name.split('.'):
        obj = getattr(obj, part)
    return obj


def import_obj(name):
    module, relative_name = import_module(name)
    return find_obj_in_module(module, relative_name)


def call_func_by_name(*args, func=None, **kwargs):
    assert func is not None
    return import_obj(func)(*args, **kwargs)


# ----------------------------------------------------------------------------
# Autosummaries: averages accumulated in the graph, written once a tick by save_summaries().


class _AutosummaryState:
    def __init__(self):
        self.vars = OrderedDict()          # name => [accumulator variable, ...]
        self.immediate = OrderedDict()     # name => (update_op, placeholder) for Python values
        self.finalized = False
        self.merge_op = None


_autosummary_states = weakref.WeakKeyDictionary()    # graph => _AutosummaryState


def _autosummary_state():
    graph = tf.get_default_graph()
    if graph not in _autosummary_states:
        _autosummary_states[graph] = _AutosummaryState()
    return _autosummary_states[graph]


def autosummary(name, value):
    """Record `value` (a tensor, or a Python number) under `name`; returns `value`."""
    state = _autosummary_state()
    scope_id = name.replace('/', '_')
    if is_tf_expression(value):
        with tf.name_scope('summary_' + scope_id), tf.device(value.device):
            update_op = _create_autosummary_var(state, name, value)
            with tf.control_dependencies([update_op]):
                return tf.identity(value)
    if name not in state.immediate:
        with absolute_name_scope('Autosummary/' + scope_id), tf.device(None), tf.control_dependencies(None):
            placeholder = tf.placeholder(tf.float32)
            state.immediate[name] = (_create_autosummary_var(state, name, placeholder), placeholder)
    update_op, placeholder = state.immediate[name]
    run(update_op, {placeholder: np.float32(value)})
    return value


def _create_autosummary_var(state, name, value_expr):
    if state.finalized:
        raise RuntimeError('autosummary("%s") created after the summaries were finalized' % name)
    v = tf.cast(value_expr, tf.float32)
    if v.shape.ndims == 0:
        v = [v, np.float32(1.0)]
    else:
        v = [tf.reduce_sum(v), tf.reduce_prod(tf.cast(tf.shape(v), tf.float32))]
    v = tf.cond(tf.is_finite(v[0]), lambda: tf.stack(v), lambda: tf.zeros(2))
    with tf.control_dependencies(None):
        var = tf.Variable(tf.zeros(2), trainable=False)     # [sum, count]
    update_op = tf.cond(tf.is_variable_initialized(var), lambda: tf.assign_add(var, v), lambda: tf.assign(var, v))
    state.vars.setdefault(name, []).append(var)
    return update_op


def finalize_autosummaries():
    state = _autosummary_state()
    if state.finalized:
        return
    state.finalized = True
    init_uninited_vars([var for variables in state.vars.values() for var in variables])
    with tf.device(None), tf.control_dependencies(None):
        for name, variables in state.vars.items():
            with absolute_name_scope('Autosummary/' + name.replace('/', '_')):
                total = tf.add_n(variables)
                avg = total[0] / total[1]
                with tf.control_dependencies([avg]):    # Read before resetting.
                    reset_ops = [tf.assign(var, tf.zeros(2)) for var in variables]
                    with tf.name_scope(None), tf.control_dependencies(reset_ops):
                        tf.summary.scalar(name, avg)


def save_summaries(filewriter, global_step=None):
    """Write the averages accumulated since the last call, and reset them."""
    state = _autosummary_state()
    if state.merge_op is None:
        finalize_autosummaries()
        state.merge_op = tf.summary.merge_all()
    if state.merge_op is not None:
        filewriter.add_summary(state.merge_op.eval(), global_step)
    filewriter.flush()


# ----------------------------------------------------------------------------
# Optimizer: one tower per device, gradients summed across devices, one update per device,
# dynamic loss scaling for fp16, and steps with non-finite gradients skipped.


class Optimizer:
    def __init__(self,
                 name='Train',
                 tf_optimizer='tf.train.AdamOptimizer',
                 learning_rate=0.001,
                 use_loss_scaling=False,
                 loss_scaling_init=64.0,       # log2 of the initial loss scale.
                 loss_scaling_inc=0.0005,      # log2 increase after a finite step.
                 loss_scaling_dec=1.0,         # log2 decrease after an overflow.
                 **kwargs):
        self.name = name
        self.learning_rate = tf.convert_to_tensor(learning_rate)
        self.id = self.name.replace('/', '.')
        self.scope = tf.get_default_graph().unique_name(self.id)
        self.optimizer_class = import_obj(tf_optimizer)
        self.optimizer_kwargs = dict(kwargs)
        self.use_loss_scaling = use_loss_scaling
        self.loss_scaling_init = loss_scaling_init
        self.loss_scaling_inc = loss_scaling_inc
        self.loss_scaling_dec = loss_scaling_dec
        self._grad_shapes = None
        self._dev_opt = OrderedDict()       # device => tf optimizer
        self._dev_grads = OrderedDict()     # device => [[(grad, var), ...], ...]
        self._dev_ls_var = OrderedDict()    # device => loss-scaling variable
        self._updates_applied = False

    def register_gradients(self, loss, variables):
        """Add the gradients of `loss` for `variables` (one call per device tower)."""
        assert not self._updates_applied
        if isinstance(variables, dict):
            variables = list(variables.values())
        assert isinstance(variables, list) and len(variables) >= 1
        assert all(is_tf_expression(expr) for expr in variables + [loss])
        if self._grad_shapes is None:
            self._grad_shapes = [shape_to_list(var.shape) for var in variables]
        assert [shape_to_list(var.shape) for var in variables] == self._grad_shapes
        dev = loss.device
        with tf.name_scope(self.id + '_grad'), tf.device(dev):
            if dev not in self._dev_opt:
                opt_name = self.scope.replace('/', '_') + '_opt%d' % len(self._dev_opt)
                self._dev_opt[dev] = self.optimizer_class(name=opt_name, learning_rate=self.learning_rate,
                                                          **self.optimizer_kwargs)
                self._dev_grads[dev] = []
            loss = self.apply_loss_scaling(tf.cast(loss, tf.float32))
            grads = self._dev_opt[dev].compute_gradients(loss, variables, gate_gradients=tf.train.Optimizer.GATE_NONE)
            grads = [(g, v) if g is not None else (tf.zeros_like(v), v) for g, v in grads]
            self._dev_grads[dev].append(grads)

    def apply_updates(self):
        """The training op: sum, unscale, check and apply the registered gradients."""
        assert not self._updates_applied
        self._updates_applied = True
        devices = list(self._dev_grads.keys())
        total_grads = sum(len(grads) for grads in self._dev_grads.values())
        assert len(devices) >= 1 and total_grads >= 1
        ops = []
        with absolute_name_scope(self.scope):
            dev_grads = self._sum_within_devices(devices)
            if len(devices) > 1:
                self._sum_across_devices(devices, dev_grads)
            for dev_idx, (dev, grads) in enumerate(dev_grads.items()):
                with tf.name_scope('ApplyGrads%d' % dev_idx), tf.device(dev):
                    ops += self._apply_device_updates(dev, grads, total_grads, report=(dev == devices[-1]))
            training_op = tf.group(*ops, name='TrainingOp')
        # Run only after the graph is complete: TF must not see nodes change after a run.
        self.reset_optimizer_state()
        init_uninited_vars(list(self._dev_ls_var.values()))
        return training_op

    def _sum_within_devices(self, devices):
        dev_grads = OrderedDict()
        for dev_idx, dev in enumerate(devices):
            with tf.name_scope('ProcessGrads%d' % dev_idx), tf.device(dev):
                sums = []
                for per_var in zip(*self._dev_grads[dev]):
                    var = per_var[0][1]
                    g = [tf.cast(g, tf.float32) for g, _ in per_var]
                    sums.append((g[0] if len(g) == 1 else tf.add_n(g), var))
                dev_grads[dev] = sums
        return dev_grads

    def _sum_across_devices(self, devices, dev_grads):
        on_gpus = all('gpu' in dev.lower() for dev in devices)
        with tf.name_scope('SumAcrossGPUs'):
            for var_idx, grad_shape in enumerate(self._grad_shapes):
                g = [dev_grads[dev][var_idx][0] for dev in devices]
                if on_gpus and np.prod(grad_shape):     # NCCL has no CPU kernel nor empty tensors.
                    from tensorflow.python.ops import nccl_ops
                    g = nccl_ops.all_sum(g)
                else:
                    total = tf.add_n(g)
                    g = []
                    for dev in devices:
                        with tf.device(dev):
                            g.append(tf.identity(total))
                for dev, gg in zip(devices, g):
                    dev_grads[dev][var_idx] = (gg, dev_grads[dev][var_idx][1])

    def _apply_device_updates(self, dev, grads, total_grads, report):
        ops = []
        if self.use_loss_scaling or total_grads > 1:
            with tf.name_scope('Scale'):
                coef = tf.constant(np.float32(1.0 / total_grads), name='coef')
                coef = self.undo_loss_scaling(coef)
                grads = [(g * coef, v) for g, v in grads]
        with tf.name_scope('CheckOverflow'):
            grad_ok = tf.reduce_all(tf.stack([tf.reduce_all(tf.is_finite(g)) for g, v in grads]))
        with tf.name_scope('UpdateWeights'):
            opt = self._dev_opt[dev]
            ls_var = self.get_loss_scaling_var(dev)
            if not self.use_loss_scaling:
                ops.append(tf.cond(grad_ok, lambda: opt.apply_gradients(grads), tf.no_op))
            else:
                ops.append(tf.cond(grad_ok,
                                   lambda: tf.group(tf.assign_add(ls_var, self.loss_scaling_inc), opt.apply_gradients(grads)),
                                   lambda: tf.group(tf.assign_sub(ls_var, self.loss_scaling_dec))))
        if report:
            with tf.name_scope('Statistics'):
                ops.append(autosummary(self.id + '/learning_rate', self.learning_rate))
                ops.append(autosummary(self.id + '/overflow_frequency', tf.where(grad_ok, 0, 1)))
                if self.use_loss_scaling:
                    ops.append(autosummary(self.id + '/loss_scaling_log2', ls_var))
        return ops

    def variables(self):
        """The optimizer's own state: its slots (e.g. Adam moments) and loss-scaling variables."""
        return [var for opt in self._dev_opt.values() for var in opt.variables()] + list(self._dev_ls_var.values())

    def reset_optimizer_state(self):
        run([var.initializer for opt in self._dev_opt.values() for var in opt.variables()])

    def get_loss_scaling_var(self, device):
        if not self.use_loss_scaling:
            return None
        if device not in self._dev_ls_var:
            with absolute_name_scope(self.scope + '/LossScalingVars'), tf.control_dependencies(None):
                self._dev_ls_var[device] = tf.Variable(np.float32(self.loss_scaling_init), name='loss_scaling_var')
        return self._dev_ls_var[device]

    def apply_loss_scaling(self, value):
        assert is_tf_expression(value)
        if not self.use_loss_scaling:
            return value
        return value * exp2(self.get_loss_scaling_var(value.device))

    def undo_loss_scaling(self, value):
        assert is_tf_expression(value)
        if not self.use_loss_scaling:
            return value
        return value * exp2(-self.get_loss_scaling_var(value.device))


# ----------------------------------------------------------------------------
# Network: a build function's template graph plus its variables; picklable by value.

network_import_handlers = []      # Functions state => state, applied when unpickling (see legacy.py).
_network_import_modules = []      # Modules made from embedded source, kept alive.


class Network:
    def __init__(self, name=None, func=None, **static_kwargs):
        self._init_fields()
        self.name = name
        self.static_kwargs = dict(static_kwargs)
        module, self._build_func_name = import_module(func)
        self._build_module_src = inspect.getsource(module)
        self._build_func = find_obj_in_module(module, self._build_func_name)
        self._init_graph()
        self.reset_vars()

    def _init_fields(self):
        self.name = None
        self.scope = None
        self.static_kwargs = dict()
        self.num_inputs = 0
        self.num_outputs = 0
        self.input_shapes = [[]]
        self.output_shapes = [[]]
        self.input_shape = []
        self.output_shape = []
        self.input_templates = []
        self.output_templates = []
        self.input_names = []
        self.output_names = []
        self.vars = OrderedDict()
        self.trainables = OrderedDict()
        self._build_func = None
        self._build_func_name = None
        self._build_module_src = None
        self._run_cache = dict()

    def _init_graph(self):
        # The inputs are the build function's positional parameters without defaults.
        self.input_names = [p.name for p in inspect.signature(self._build_func).parameters.values()
                            if p.kind == p.POSITIONAL_OR_KEYWORD and p.default is p.empty]
        self.num_inputs = len(self.input_names)
        assert self.num_inputs >= 1
        if self.name is None:
            self.name = self._build_func_name
        self.scope = tf.get_default_graph().unique_name(self.name.replace('/', '_'), mark_as_used=False)
        with tf.variable_scope(self.scope, reuse=tf.AUTO_REUSE):
            assert tf.get_variable_scope().name == self.scope
            with absolute_name_scope(self.scope), tf.control_dependencies(None):
                self.input_templates = [tf.placeholder(tf.float32, name=name) for name in self.input_names]
                out_expr = self._build_func(*self.input_templates, is_template_graph=True, **self.static_kwargs)
        assert is_tf_expression(out_expr) or isinstance(out_expr, tuple)
        self.output_templates = [out_expr] if is_tf_expression(out_expr) else list(out_expr)
        self.output_names = [t.name.split('/')[-1].split(':')[0] for t in self.output_templates]
        self.num_outputs = len(self.output_templates)
        self.input_shapes = [shape_to_list(t.shape) for t in self.input_templates]
        self.output_shapes = [shape_to_list(t.shape) for t in self.output_templates]
        self.input_shape = self.input_shapes[0]
        self.output_shape = self.output_shapes[0]
        self.vars = OrderedDict([(self.get_var_localname(var), var) for var in tf.global_variables(self.scope + '/')])
        self.trainables = OrderedDict([(self.get_var_localname(var), var) for var in tf.trainable_variables(self.scope + '/')])

    def reset_vars(self):
        run([var.initializer for var in self.vars.values()])

    def reset_trainables(self):
        run([var.initializer for var in self.trainables.values()])

    def get_output_for(self, *in_expr, return_as_list=False, **dynamic_kwargs):
        """The network's output for the given input expressions, sharing its variables."""
        assert len(in_expr) == self.num_inputs
        all_kwargs = dict(self.static_kwargs)
        all_kwargs.update(dynamic_kwargs)
        with tf.variable_scope(self.scope, reuse=True):
            assert tf.get_variable_scope().name == self.scope
            named_inputs = [tf.identity(expr, name=name) for expr, name in zip(in_expr, self.input_names)]
            out_expr = self._build_func(*named_inputs, **all_kwargs)
        assert is_tf_expression(out_expr) or isinstance(out_expr, tuple)
        if return_as_list:
            out_expr = [out_expr] if is_tf_expression(out_expr) else list(out_expr)
        return out_expr

    def get_var_localname(self, var_or_globalname):
        globalname = var_or_globalname if isinstance(var_or_globalname, str) else var_or_globalname.name
        assert globalname.startswith(self.scope + '/')
        return globalname[len(self.scope) + 1:].split(':')[0]

    def find_var(self, var_or_localname):
        return self.vars[var_or_localname] if isinstance(var_or_localname, str) else var_or_localname

    def get_var(self, var_or_localname):
        return self.find_var(var_or_localname).eval()

    def set_var(self, var_or_localname, new_value):
        return set_vars({self.find_var(var_or_localname): new_value})

    # Pickling.

    def __getstate__(self):
        return {
            'version': 2,
            'name': self.name,
            'static_kwargs': self.static_kwargs,
            'build_module_src': self._build_module_src,
            'build_func_name': self._build_func_name,
            'variables': list(zip(self.vars.keys(), run(list(self.vars.values())))),
        }

    def __setstate__(self, state):
        init_tf()     # Unpickling in a fresh process needs no ceremony.
        import legacy     # Pickles from elsewhere: import handlers, local rebuild or the TF1 shim.
        self._init_fields()
        state = legacy.import_state(state, network_import_handlers)
        self.name = state['name']
        self.static_kwargs = dict(state['static_kwargs'])
        self._build_module_src = state['build_module_src']     # Kept as is, so saving again is faithful.
        self._build_func_name = state['build_func_name']
        self._build_func = legacy.build_func_for_state(state)
        self._init_graph()
        self.reset_vars()
        set_vars({self.find_var(name): value for name, value in legacy.checked_variables(self, state)})

    def clone(self, name=None):
        net = object.__new__(Network)
        net._init_fields()
        net.name = name if name is not None else self.name
        net.static_kwargs = dict(self.static_kwargs)
        net._build_module_src = self._build_module_src
        net._build_func_name = self._build_func_name
        net._build_func = self._build_func
        net._init_graph()
        net.copy_vars_from(self)
        return net

    def copy_vars_from(self, src_net):
        names = [name for name in self.vars.keys() if name in src_net.vars]
        set_vars(dict(zip([self.vars[n] for n in names], run([src_net.vars[n] for n in names]))))

    def copy_trainables_from(self, src_net):
        names = [name for name in self.trainables.keys() if name in src_net.trainables]
        set_vars(dict(zip([self.vars[n] for n in names], run([src_net.vars[n] for n in names]))))

    def convert(self, name=None, func=None, **static_kwargs):
        """A new network from another build function, taking over the variables that match."""
        net = Network(name, func, **static_kwargs)
        net.copy_vars_from(self)
        return net

    def setup_as_moving_average_of(self, src_net, beta=0.99, beta_nontrainable=0.0):
        """An op that moves this network's variables towards src_net's (Gs from G)."""
        with absolute_name_scope(self.scope), tf.name_scope('MovingAvg'):
            ops = []
            for name, var in self.vars.items():
                if name in src_net.vars:
                    cur_beta = beta if name in self.trainables else beta_nontrainable
                    ops.append(var.assign(lerp(src_net.vars[name], var, cur_beta)))
            return tf.group(*ops)

    # Running on numpy arrays.

    def run(self, *in_arrays, return_as_list=False, print_progress=False, minibatch_size=None, num_gpus=1,
            out_mul=1.0, out_add=0.0, out_shrink=1, out_dtype=None, **dynamic_kwargs):
        """Evaluate on numpy inputs in minibatches; outputs optionally scaled, shrunk and cast."""
        assert len(in_arrays) == self.num_inputs
        num_items = in_arrays[0].shape[0]
        if minibatch_size is None:
            minibatch_size = num_items
        out_expr = self._run_outputs(num_gpus, out_mul, out_add, out_shrink, out_dtype, dynamic_kwargs)
        out_arrays = [np.empty([num_items] + shape_to_list(expr.shape)[1:], expr.dtype.name) for expr in out_expr]
        for mb_begin in range(0, num_items, minibatch_size):
            if print_progress:
                print('\r%d / %d' % (mb_begin, num_items), end='')
            mb_end = min(mb_begin + minibatch_size, num_items)
            mb_in = [src[mb_begin:mb_end] for src in in_arrays]
            mb_out = run(out_expr, dict(zip(self.input_templates, mb_in)))
            for dst, src in zip(out_arrays, mb_out):
                dst[mb_begin:mb_end] = src
        if print_progress:
            print('\r%d / %d' % (num_items, num_items))
        if not return_as_list:
            out_arrays = out_arrays[0] if len(out_arrays) == 1 else tuple(out_arrays)
        return out_arrays

    def _run_outputs(self, num_gpus, out_mul, out_add, out_shrink, out_dtype, dynamic_kwargs):
        key = str([sorted(dynamic_kwargs.items()), num_gpus, out_mul, out_add, out_shrink, out_dtype])
        if key not in self._run_cache:
            with absolute_name_scope(self.scope + '/Run'), tf.control_dependencies(None):
                in_split = list(zip(*[tf.split(x, num_gpus) for x in self.input_templates]))
                out_split = []
                for device, tower_in in zip(device_names(num_gpus), in_split):
                    with tf.device(device):
                        out_expr = self.get_output_for(*tower_in, return_as_list=True, **dynamic_kwargs)
                        out_split.append([_postprocess(x, out_mul, out_add, out_shrink, out_dtype) for x in out_expr])
                self._run_cache[key] = [tf.concat(outputs, axis=0) for outputs in zip(*out_split)]
        return self._run_cache[key]

    # Inspection.

    def list_layers(self):
        """[(layer name, output tensor, [trainables])] for the template graph's top-level scopes."""
        patterns_to_ignore = ['/Setter', '/new_value', '/Shape', '/strided_slice', '/Cast', '/concat']
        all_ops = tf.get_default_graph().get_operations()
        all_ops = [op for op in all_ops if not any(p in op.name for p in patterns_to_ignore)]
        layers = []

        def recurse(scope, parent_ops, level):
            prefix = scope + '/'
            ops = [op for op in parent_ops if op.name == scope or op.name.startswith(prefix)]
            if level == 0 or all('/' in op.name[len(prefix):] for op in ops):   # Does not contain leaf ops?
                visited = set()
                for op in ops:
                    suffix = op.name[len(prefix):]
                    if '/' in suffix:
                        suffix = suffix[:suffix.index('/')]
                    if suffix not in visited:
                        recurse(prefix + suffix, ops, level + 1)
                        visited.add(suffix)
            else:
                layer_name = scope[len(self.scope) + 1:]
                layer_output = ops[-1].outputs[0] if ops[-1].outputs else ops[-1]
                layer_trainables = [var for name, var in self.trainables.items()
                                    if name.startswith(layer_name + '/')]
                layers.append((layer_name, layer_output, layer_trainables))

        recurse(self.scope, all_ops, 0)
        return layers

    def print_layers(self, title=None, hide_layers_with_no_params=False):
        title = title if title is not None else self.name
        print()
        print('%-28s%-12s%-24s%-24s' % (title, 'Params', 'OutputShape', 'WeightShape'))
        print('%-28s%-12s%-24s%-24s' % (('---',) * 4))
        total_params = 0
        for layer_name, layer_output, layer_trainables in self.list_layers():
            weights = [var for var in layer_trainables if var.name.endswith('/weight:0')]
            num_params = sum(int(np.prod(shape_to_list(var.shape))) for var in layer_trainables)
            total_params += num_params
            if hide_layers_with_no_params and num_params == 0:
                continue
            print('%-28s%-12s%-24s%-24s' % (
                layer_name,
                num_params if num_params else '-',
                getattr(layer_output, 'shape', ''),
                weights[0].shape if len(weights) == 1 else '-'))
        print('%-28s%-12s%-24s%-24s' % (('---',) * 4))
        print('%-28s%-12s%-24s%-24s' % ('Total', total_params, '', ''))
        print()

    def setup_weight_histograms(self, title=None):
        title = title if title is not None else self.name
        with tf.name_scope(None), tf.device(None), tf.control_dependencies(None):
            for localname, var in self.trainables.items():
                if '/' in localname:
                    p = localname.split('/')
                    name = '_'.join(p[:-1] + [title + '_' + p[-1]])
                else:
                    name = title + '_' + localname
                tf.summary.histogram(name, var)


def _postprocess(x, out_mul, out_add, out_shrink, out_dtype):
    if out_mul != 1.0:
        x = x * out_mul
    if out_add != 0.0:
        x = x + out_add
    if out_shrink > 1:
        ksize = [1, out_shrink, out_shrink, 1]
        x = tf.transpose(x, [0, 2, 3, 1])   # avg_pool on CPU wants NHWC.
        x = tf.nn.avg_pool(x, ksize=ksize, strides=ksize, padding='VALID')
        x = tf.transpose(x, [0, 3, 1, 2])
    if out_dtype is not None:
        if tf.as_dtype(out_dtype).is_integer:
            x = tf.round(x)
        x = tf.saturate_cast(x, out_dtype)
    return x


def _module_from_source(source):
    """A module made by executing a pickle's embedded networks source under the TF1 compatibility
    shim (legacy.py); one per distinct source, kept alive for the rest of the process."""
    import legacy
    for module in _network_import_modules:
        if module.__dict__.get('__network_pickle_source__') == source:
            return module
    module = legacy.exec_source_module(source, '_tfutil_network_import_module_%d' % len(_network_import_modules))
    module.__network_pickle_source__ = source
    _network_import_modules.append(module)
    return module
