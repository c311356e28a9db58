"""The TensorFlow layer: sessions, import by name, autosummaries, the multi-device Optimizer and
the picklable Network wrapper.

Every module gets TensorFlow from `tf_compat` (`from tf_compat import tf`): TF 2.x run as TF 1.x
graph code through `tensorflow.compat.v1`. Pickles written elsewhere are legacy.py's business;
this module hands their states over to it and builds whatever it returns.
"""

import importlib
import inspect
import sys
import weakref
from collections import OrderedDict

import numpy as np

import legacy
from tf_compat import tf

# ----------------------------------------------------------------------------
# Small helpers.

_LN2 = np.log(2.0)


def run(*args, **kwargs):
    """Session.run in the default session."""
    session = tf.get_default_session()
    if session is None:
        raise RuntimeError('No default TensorFlow session: call tfutil.init_tf() first, '
                           'or run inside `with session.as_default():`')
    return session.run(*args, **kwargs)


def is_tf_expression(x):
    return isinstance(x, (tf.Tensor, tf.Variable, tf.Operation))


def _require_tf_expression(value, what):
    if not is_tf_expression(value):
        raise TypeError('%s must be a TensorFlow tensor, variable or operation, not %s'
                        % (what, type(value).__name__))


def shape_to_list(shape):
    return tf.TensorShape(shape).as_list()


def flatten(x):
    with tf.name_scope('Flatten'):
        return tf.reshape(x, [-1])


def log2(x):
    with tf.name_scope('Log2'):
        return tf.log(x) * np.float32(1 / _LN2)


def exp2(x):
    with tf.name_scope('Exp2'):
        scaled = x * np.float32(_LN2)
        return tf.exp(scaled)


def lerp(a, b, t):
    with tf.name_scope('Lerp'):
        return a + (b - a) * t


def lerp_clip(a, b, t):
    with tf.name_scope('LerpClip'):
        weight = tf.clip_by_value(t, 0.0, 1.0)
        return a + (b - a) * weight


def absolute_name_scope(scope):
    """A name scope that ignores the surrounding one (a trailing slash makes TF take it as is)."""
    return tf.name_scope('%s/' % scope)


def _no_dependencies():
    """A context in which new ops do not inherit the surrounding control dependencies: variables,
    their setters and summaries must not wait for whatever op happens to be built around them."""
    return tf.control_dependencies(None)


# ----------------------------------------------------------------------------
# Sessions and devices.

DEFAULT_TF_CONFIG = {
    'graph_options.place_pruned_graph': True,   # Only place ops that are actually run.
    'gpu_options.allow_growth': True,           # Do not grab all GPU memory at start.
}


def init_tf(config_dict=None, target='', random_seed=None):
    """Create the default session (once per process), seeding numpy and TF from config.random_seed,
    or from `random_seed` when given (each node of a multi-node run has its own). `target` is the
    TensorFlow server to run on; '' runs in this process."""
    if _has_default_session():
        return
    _seed(_config_value('random_seed', None) if random_seed is None else random_seed)
    settings = dict(_config_value('tf_config', {}))
    settings.update(config_dict or {})
    create_session(settings, force_as_default=True, target=target)


def _seed(seed):
    """Seed numpy, and TF's graph seed from numpy, so a run repeats (None: leave both alone)."""
    if seed is None:
        return
    np.random.seed(seed)
    graph_seed = np.random.randint(1 << 31)
    tf.set_random_seed(graph_seed)


def _config_value(name, default):
    """A setting of the config module if the program has imported one (tfutil never imports it)."""
    config = sys.modules.get('config')
    if config is None:
        return default
    return getattr(config, name, default)


def _ensure_default_session():
    """What unpickling needs: a default session. Unlike init_tf() it seeds nothing and reads no
    config, so loading a network leaves the program's random state alone."""
    if not _has_default_session():
        create_session(force_as_default=True)


def _has_default_session():
    return tf.get_default_session() is not None


def create_session(config_dict=None, force_as_default=False, target=''):
    """A session from a dict of dotted ConfigProto fields, e.g. {'device_count.CPU': 2}."""
    session = tf.Session(target, config=config_proto(config_dict))
    if force_as_default:
        _keep_default_for_process(session)
    return session


def config_proto(config_dict=None):
    """A ConfigProto with DEFAULT_TF_CONFIG and then config_dict's dotted fields set."""
    fields = dict(DEFAULT_TF_CONFIG, **(config_dict or {}))
    proto = tf.ConfigProto()
    for dotted, value in fields.items():
        _set_proto_field(proto, dotted, value)
    return proto


def _keep_default_for_process(session):
    """Make `session` the default as an entered `with session.as_default():` would, for the rest
    of the process. The context is kept on the session so that neither is garbage collected."""
    context = session.as_default()
    context.enforce_nesting = False     # Other code may enter and leave sessions around it.
    context.__enter__()
    session._default_session = context


def _set_proto_field(proto, dotted, value):
    *parents, last = dotted.split('.')
    obj = proto
    for name in parents:
        obj = getattr(obj, name)
    if isinstance(value, (list, tuple)):    # A repeated field such as device_filters.
        getattr(obj, last)[:] = list(value)
    elif hasattr(obj, 'DESCRIPTOR'):
        setattr(obj, last, value)
    else:   # A proto map such as device_count.
        obj[last] = value


def num_gpus_available():
    return len(tf.config.list_physical_devices('GPU'))


def device_names(count):
    """One device per tower: GPUs where they exist, otherwise (virtual) CPU devices."""
    kind = 'gpu' if num_gpus_available() > 0 else 'cpu'
    return ['/%s:%d' % (kind, i) for i in range(count)]


# ----------------------------------------------------------------------------
# Variables: helper ops made once per variable, next to it, and found again by name.


def _var_op_name(var):
    return var.name.split(':')[0]


def _helper_tensor(var, helper):
    """The tensor `<variable>/<helper>:0` if an earlier call built it, else None."""
    try:
        return tf.get_default_graph().get_tensor_by_name('%s/%s:0' % (_var_op_name(var), helper))
    except KeyError:
        return None


def init_uninited_vars(variables=None):
    """Initialise the variables (default: all globals) that are not initialised yet.

    A variable is tested only the first time it comes by: once it has its IsVariableInitialized
    op it has been initialised, and testing it again would cost a session run per call.
    """
    candidates = tf.global_variables() if variables is None else list(variables)
    for var in candidates:
        _require_tf_expression(var, 'Each variable passed to init_uninited_vars')
    untested = [var for var in candidates if _helper_tensor(var, 'IsVariableInitialized') is None]
    with _no_dependencies():
        checks = [_initialized_check(var) for var in untested]
    flags = run(checks)
    run([var.initializer for var, initialized in zip(untested, flags) if not initialized])


def _initialized_check(var):
    with absolute_name_scope(_var_op_name(var)):
        return tf.is_variable_initialized(var)


def set_vars(var_to_value_dict):
    """Assign numpy values to variables, reusing one assign op per variable."""
    setters, feed = [], {}
    for var, new_value in var_to_value_dict.items():
        _require_tf_expression(var, 'Each key of set_vars')
        setter = _helper_tensor(var, 'setter')
        if setter is None:
            setter = _make_setter(var)
        setters.append(setter)
        new_value_placeholder = setter.op.inputs[1]
        feed[new_value_placeholder] = new_value
    run(setters, feed)


def _make_setter(var):
    with absolute_name_scope(_var_op_name(var)), _no_dependencies():
        new_value = tf.placeholder(var.dtype, var.shape, 'new_value')
        return tf.assign(var, new_value, name='setter')


# ----------------------------------------------------------------------------
# Import objects by dotted name ('networks.G_paper', 'tf.train.AdamOptimizer').


def import_module(name):
    """Split 'module.sub.obj' into (module, 'obj') by importing the longest module prefix.

    Names starting with 'tf.' resolve against tensorflow.compat.v1, so old configs that say
    'tf.train.AdamOptimizer' get the TF1 class.
    """
    if not isinstance(name, str) or '.' not in name:
        raise ImportError('Cannot import %r: give a dotted name such as "networks.G_paper"' % (name,))
    parts = name.split('.')
    if parts[0] == 'tf':
        return tf, '.'.join(parts[1:])
    for split in range(len(parts) - 1, 0, -1):
        module = _try_import('.'.join(parts[:split]))
        if module is not None:
            return module, '.'.join(parts[split:])
    raise ImportError('Cannot import "%s": no module named %s' % (name, parts[0]), name=parts[0])


def _try_import(module_name):
    """The module, or None when no module by that name exists. Errors raised while importing a
    module that does exist (a missing dependency, a syntax error) are the user's to see."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ''
        if module_name == missing or module_name.startswith(missing + '.'):
            return None
        raise


def find_obj_in_module(module, relative_name):
    obj = module
    found = _display_name(module)
    for attribute in relative_name.split('.'):
        if not hasattr(obj, attribute):
            kind = 'module' if inspect.ismodule(obj) else 'object'
            raise AttributeError('%s %s has no attribute %s' % (kind, found, attribute))
        obj = getattr(obj, attribute)
        found += '.' + attribute
    return obj


def _display_name(module):
    return 'tf' if module is tf else getattr(module, '__name__', repr(module))


def import_obj(name):
    module, relative_name = import_module(name)
    return find_obj_in_module(module, relative_name)


def call_func_by_name(*args, func=None, **kwargs):
    if func is None:
        raise TypeError('call_func_by_name: func is missing; pass func="module.function", '
                        'e.g. func="networks.G_paper"')
    function = import_obj(func)
    return function(*args, **kwargs)


# ----------------------------------------------------------------------------
# Autosummaries: averages accumulated in the graph, written once a tick by save_summaries().


class _AutosummaryState:
    def __init__(self):
        self.vars = OrderedDict()          # name => [accumulator variable, ...]
        self.immediate = OrderedDict()     # name => (update_op, placeholder) for Python values
        self.finalized = False
        self.merge_op = None

    def all_accumulators(self):
        return [var for accumulators in self.vars.values() for var in accumulators]


_autosummary_states = weakref.WeakKeyDictionary()    # graph => _AutosummaryState


def _autosummary_state():
    graph = tf.get_default_graph()
    state = _autosummary_states.get(graph)
    if state is None:
        state = _autosummary_states[graph] = _AutosummaryState()
    return state


def _scope_id(name):
    return name.replace('/', '_')


def autosummary(name, value):
    """Record `value` (a tensor, or a Python number) under `name`; returns `value`."""
    state = _autosummary_state()
    if is_tf_expression(value):
        with tf.name_scope('summary_' + _scope_id(name)), tf.device(value.device):
            update = _accumulate(state, name, value)
            return _passed_through_after(update, value)
    update, feed_slot = _python_value_feed(state, name)
    run(update, {feed_slot: np.float32(value)})
    return value


def _passed_through_after(update, value):
    """`value` again, as a tensor that is computed only after `update` ran."""
    with tf.control_dependencies([update]):
        return tf.identity(value)


def _python_value_feed(state, name):
    """(update op, placeholder) that accumulate Python numbers for `name`, made on first use."""
    if name not in state.immediate:
        with absolute_name_scope('Autosummary/' + _scope_id(name)), tf.device(None), _no_dependencies():
            slot = tf.placeholder(tf.float32)
            state.immediate[name] = (_accumulate(state, name, slot), slot)
    return state.immediate[name]


def _accumulate(state, name, value_expr):
    """An op adding [sum, count] of value_expr's elements to a new accumulator for `name`."""
    if state.finalized:
        raise RuntimeError('autosummary("%s") created after the summaries were finalized' % name)
    increment = _finite_sum_and_count(value_expr)
    with _no_dependencies():
        accumulator = tf.Variable(tf.zeros(2), trainable=False)     # [sum, count]
    # finalize_autosummaries() initialises the accumulators; updates that run before it assign.
    update = tf.cond(tf.is_variable_initialized(accumulator),
                     lambda: tf.assign_add(accumulator, increment),
                     lambda: tf.assign(accumulator, increment))
    state.vars.setdefault(name, []).append(accumulator)
    return update


def _finite_sum_and_count(value_expr):
    """[sum, number of elements] as a float32 pair; zeros when the sum is not finite, so that one
    bad minibatch leaves the tick's average alone."""
    values = tf.cast(value_expr, tf.float32)
    if values.shape.ndims == 0:
        pair = [values, np.float32(1.0)]
    else:
        num_elements = tf.reduce_prod(tf.cast(tf.shape(values), tf.float32))
        pair = [tf.reduce_sum(values), num_elements]
    return tf.cond(tf.is_finite(pair[0]), lambda: tf.stack(pair), lambda: tf.zeros(2))


def finalize_autosummaries():
    """Turn the accumulators into summary ops; after this no new autosummary names may appear."""
    state = _autosummary_state()
    if state.finalized:
        return
    state.finalized = True
    init_uninited_vars(state.all_accumulators())
    with tf.device(None), _no_dependencies():
        for name, accumulators in state.vars.items():
            with absolute_name_scope('Autosummary/' + _scope_id(name)):
                _average_summary(name, accumulators)


def _average_summary(name, accumulators):
    """A scalar summary of the mean since the last read, which zeroes the accumulators."""
    totals = tf.add_n(accumulators)
    mean = totals[0] / totals[1]
    with tf.control_dependencies([mean]):      # The mean is read before the reset zeroes it.
        resets = [tf.assign(accumulator, tf.zeros(2)) for accumulator in accumulators]
        with tf.name_scope(None), tf.control_dependencies(resets):
            tf.summary.scalar(name, mean)      # The tag is exactly `name`.


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
    # The loss scale is 2**v with v a variable per device: it starts at loss_scaling_init, goes up
    # by loss_scaling_inc after each finite step and down by loss_scaling_dec after an overflow.
    # In a multi-node run `cluster_node` (a cluster.Node) sums the gradients over the nodes as well;
    # every node then applies the same mean, and an overflow on any node is an overflow everywhere.
    def __init__(self, name='Train', tf_optimizer='tf.train.AdamOptimizer', learning_rate=0.001,
                 use_loss_scaling=False, loss_scaling_init=64.0, loss_scaling_inc=0.0005, loss_scaling_dec=1.0,
                 cluster_node=None, **kwargs):
        self.name = name
        self.id = name.replace('/', '.')       # Summary tags and name scopes use the id.
        graph = tf.get_default_graph()
        self.scope = graph.unique_name(self.id)
        self.learning_rate = tf.convert_to_tensor(learning_rate, name='learning_rate')
        self.optimizer_class = import_obj(tf_optimizer)
        self.optimizer_kwargs = kwargs          # For the TF optimizer: beta1, epsilon...
        self.use_loss_scaling = bool(use_loss_scaling)
        self.cluster_node = cluster_node if cluster_node is not None and cluster_node.count > 1 else None
        # Numbers, checked here rather than deep inside graph building.
        self.loss_scaling_init, self.loss_scaling_inc, self.loss_scaling_dec = (
            float(loss_scaling_init), float(loss_scaling_inc), float(loss_scaling_dec))
        self._grad_shapes = None                # Variable shapes, the same for every tower.
        self._tf_opts = OrderedDict()           # device => TF optimizer
        self._tower_grads = OrderedDict()       # device => one [(grad, var), ...] per tower
        self._ls_vars = OrderedDict()           # device => log2 of the loss scale
        self._updates_applied = False

    def register_gradients(self, loss, variables):
        """Add the gradients of `loss` for `variables` (one call per device tower)."""
        self._refuse_after_apply('register_gradients')
        variables = _variable_list(variables)
        _require_tf_expression(loss, 'The loss')
        for var in variables:
            _require_tf_expression(var, 'Each variable passed to register_gradients')
        self._check_tower_shapes(variables)
        device = loss.device
        with tf.name_scope(self.id + '_grad'), tf.device(device):
            tf_opt = self._device_optimizer(device)
            scaled_loss = self.apply_loss_scaling(tf.cast(loss, tf.float32))
            pairs = tf_opt.compute_gradients(scaled_loss, variables, gate_gradients=tf.train.Optimizer.GATE_NONE)
            self._tower_grads[device].append([(_zeros_if_none(grad, var), var) for grad, var in pairs])

    def _refuse_after_apply(self, method):
        if self._updates_applied:
            raise RuntimeError('Optimizer %s: %s() after apply_updates(); register every tower first'
                               % (self.name, method))

    def _check_tower_shapes(self, variables):
        shapes = [shape_to_list(var.shape) for var in variables]
        if self._grad_shapes is None:
            self._grad_shapes = shapes
        elif shapes != self._grad_shapes:
            raise ValueError('Optimizer %s: every tower must register variables of the same shapes, in the '
                             'same order (first %s, now %s)' % (self.name, self._grad_shapes, shapes))

    def _device_optimizer(self, device):
        """The TF optimizer of `device`, made on the device's first tower."""
        if device not in self._tf_opts:
            optimizer_name = '%s_opt%d' % (self.scope.replace('/', '_'), len(self._tf_opts))
            self._tf_opts[device] = self.optimizer_class(
                name=optimizer_name, learning_rate=self.learning_rate, **self.optimizer_kwargs)
            self._tower_grads[device] = []
        return self._tf_opts[device]

    def apply_updates(self):
        """The training op: sum, unscale, check and apply the registered gradients."""
        self._refuse_after_apply('apply_updates')
        self._updates_applied = True
        devices = list(self._tower_grads)
        if not devices:
            raise RuntimeError('Optimizer %s: apply_updates() without any register_gradients()' % self.name)
        num_towers = sum(len(towers) for towers in self._tower_grads.values())
        with absolute_name_scope(self.scope):
            device_grads = self._sum_within_devices(devices)
            if len(devices) > 1:
                self._sum_across_devices(devices, device_grads)
            if self.cluster_node is not None:
                self._sum_across_nodes(devices, device_grads)
                num_towers *= self.cluster_node.count
            update_ops = []
            for index, device in enumerate(devices):
                with tf.name_scope('ApplyGrads%d' % index), tf.device(device):
                    is_last = index == len(devices) - 1
                    update_ops += self._device_update_ops(device, device_grads[device], num_towers, is_last)
            training_op = tf.group(*update_ops, name='TrainingOp')
        # Only now, with the graph complete: TF must not see nodes change after a session run.
        self.reset_optimizer_state()
        init_uninited_vars(self._ls_vars.values())
        return training_op

    def _sum_within_devices(self, devices):
        """device => [(float32 sum of the device's towers' gradients, var), ...]."""
        summed = OrderedDict()
        for index, device in enumerate(devices):
            with tf.name_scope('ProcessGrads%d' % index), tf.device(device):
                towers = self._tower_grads[device]
                summed[device] = [(_sum_of([tf.cast(tower[i][0], tf.float32) for tower in towers]), var)
                                  for i, (_, var) in enumerate(towers[0])]
        return summed

    def _sum_across_devices(self, devices, device_grads):
        """Replace each device's gradients by the sum over all devices (in place)."""
        nccl = all('gpu' in device.lower() for device in devices)
        with tf.name_scope('SumAcrossGPUs'):
            for i, shape in enumerate(self._grad_shapes):
                grads = [device_grads[device][i][0] for device in devices]
                # NCCL has neither a CPU kernel nor support for empty tensors.
                totals = _nccl_all_sum(grads) if nccl and np.prod(shape) else _sum_copied_to(grads, devices)
                for device, total in zip(devices, totals):
                    device_grads[device][i] = (total, device_grads[device][i][1])

    def _sum_across_nodes(self, devices, device_grads):
        """Replace each device's gradients by their sum over all nodes (in place): one packed
        all-reduce from the first device, whose sums already hold this node's towers."""
        with tf.name_scope('SumAcrossNodes'), tf.device(devices[0]):
            totals = self.cluster_node.all_reduce_sum([grad for grad, _ in device_grads[devices[0]]])
        for device in devices:
            with tf.device(device):
                device_grads[device] = [(tf.identity(total), var) for total, (_, var) in zip(totals, device_grads[device])]

    def _device_update_ops(self, device, grads, num_towers, report):
        """Scale the summed gradients to a mean, then apply them unless one is not finite."""
        if self.use_loss_scaling or num_towers > 1:
            with tf.name_scope('Scale'):
                factor = tf.constant(np.float32(1.0 / num_towers), name='coef')
                factor = self.undo_loss_scaling(factor)
                grads = [(grad * factor, var) for grad, var in grads]
        with tf.name_scope('CheckOverflow'):
            finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.is_finite(grad)) for grad, _ in grads]))
        with tf.name_scope('UpdateWeights'):
            ops = [self._guarded_step(device, grads, finite)]
        if report:
            with tf.name_scope('Statistics'):
                ops += self._statistics(device, finite)
        return ops

    def _guarded_step(self, device, grads, finite):
        """Apply the gradients if all are finite. With loss scaling, a finite step raises the
        scale a little and an overflow lowers it: fp16 then runs near its largest safe scale."""
        tf_opt = self._tf_opts[device]
        ls_var = self.get_loss_scaling_var(device)
        if not self.use_loss_scaling:
            return tf.cond(finite, lambda: tf_opt.apply_gradients(grads), tf.no_op)

        def step():
            return tf.group(tf.assign_add(ls_var, self.loss_scaling_inc), tf_opt.apply_gradients(grads))

        def back_off():
            return tf.group(tf.assign_sub(ls_var, self.loss_scaling_dec))

        return tf.cond(finite, step, back_off)

    def _statistics(self, device, finite):
        tag = lambda what: '%s/%s' % (self.id, what)
        ops = [autosummary(tag('learning_rate'), self.learning_rate),
               autosummary(tag('overflow_frequency'), tf.where(finite, 0, 1))]
        if self.use_loss_scaling:
            ops.append(autosummary(tag('loss_scaling_log2'), self.get_loss_scaling_var(device)))
        return ops

    def variables(self):
        """The optimizer's own state: its slots (e.g. Adam moments) and loss-scaling variables."""
        return self._slot_variables() + list(self._ls_vars.values())

    def _slot_variables(self):
        return [var for tf_opt in self._tf_opts.values() for var in tf_opt.variables()]

    def reset_optimizer_state(self):
        _initialize(self._slot_variables())

    def get_loss_scaling_var(self, device):
        """The variable holding log2 of the loss scale on `device` (None without loss scaling)."""
        if not self.use_loss_scaling:
            return None
        ls_var = self._ls_vars.get(device)
        if ls_var is None:
            # train.py recognises these variables by the LossScalingVars scope.
            with absolute_name_scope(self.scope + '/LossScalingVars'), _no_dependencies():
                initial = np.float32(self.loss_scaling_init)
                ls_var = self._ls_vars[device] = tf.Variable(initial, name='loss_scaling_var')
        return ls_var

    def apply_loss_scaling(self, value):
        _require_tf_expression(value, 'apply_loss_scaling\'s value')
        if not self.use_loss_scaling:
            return value
        log2_scale = self.get_loss_scaling_var(value.device)
        return value * exp2(log2_scale)

    def undo_loss_scaling(self, value):
        _require_tf_expression(value, 'undo_loss_scaling\'s value')
        if not self.use_loss_scaling:
            return value
        log2_scale = self.get_loss_scaling_var(value.device)
        return value * exp2(-log2_scale)


def _variable_list(variables):
    """A list of variables from a list or a {name: variable} dict such as Network.trainables."""
    if isinstance(variables, dict):
        variables = list(variables.values())
    if not isinstance(variables, list) or not variables:
        raise TypeError('register_gradients needs a non-empty list or dict of variables, not %r' % (variables,))
    return variables


def _zeros_if_none(grad, var):
    """A variable the loss does not depend on gets a zero gradient, so every tower sums alike."""
    return tf.zeros_like(var) if grad is None else grad


def _sum_of(tensors):
    return tensors[0] if len(tensors) == 1 else tf.add_n(tensors)


def _sum_copied_to(tensors, devices):
    """The sum of `tensors`, one copy on each device."""
    total = tf.add_n(tensors)
    copies = []
    for device in devices:
        with tf.device(device):
            copies.append(tf.identity(total))
    return copies


def _nccl_all_sum(tensors):
    # Imported here: only multi-GPU runs need it.
    from tensorflow.python.ops import nccl_ops

    return nccl_ops.all_sum(tensors)


# ----------------------------------------------------------------------------
# Network: a build function's template graph plus its variables; picklable by value.

network_import_handlers = []      # Functions state => state, applied when unpickling (see legacy.py).

_LAYER_ROW = '%-28s%-12s%-24s%-24s'
# Ops that set variables or compute shapes and casts around a layer; print_layers skips them.
_BOOKKEEPING_PATTERNS = ('/Setter', '/new_value', '/Shape', '/strided_slice', '/Cast', '/concat')


class Network:
    def __init__(self, name=None, func=None, **static_kwargs):
        if func is None:
            raise TypeError('Network needs func, the build function by name, e.g. func="networks.G_paper"')
        self._init_fields()
        module, func_name = import_module(func)
        build_func = find_obj_in_module(module, func_name)
        self._adopt(name, static_kwargs, func_name, inspect.getsource(module), build_func)
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

    def _adopt(self, name, static_kwargs, func_name, module_src, build_func):
        """Take on what defines the network; the source is what pickles carry along."""
        self.name = name
        self.static_kwargs = {**static_kwargs}     # A copy: the caller's dict may change later.
        self._build_func_name = func_name
        self._build_module_src = module_src
        self._build_func = build_func

    def _init_graph(self):
        """Build the template graph (placeholders in, outputs out) and collect its variables."""
        inputs = _required_inputs(self._build_func)
        if not inputs:
            raise ValueError('Build function %s has no inputs (positional parameters without defaults)'
                             % self._build_func_name)
        self.input_names, self.num_inputs = inputs, len(inputs)
        self.name = self._build_func_name if self.name is None else self.name
        self.scope = _free_scope_name(self.name)
        with tf.variable_scope(self.scope, reuse=tf.AUTO_REUSE):
            self._check_variable_scope()
            with absolute_name_scope(self.scope), _no_dependencies():
                self.input_templates = [tf.placeholder(tf.float32, name=input_name) for input_name in self.input_names]
                built = self._build_func(*self.input_templates, is_template_graph=True, **self.static_kwargs)
        outputs = self._outputs_as_list(built)
        self.output_templates, self.num_outputs = outputs, len(outputs)
        self.output_names = [_op_basename(tensor) for tensor in outputs]
        self.input_shapes = [shape_to_list(tensor.shape) for tensor in self.input_templates]
        self.output_shapes = [shape_to_list(tensor.shape) for tensor in self.output_templates]
        self.input_shape, self.output_shape = self.input_shapes[0], self.output_shapes[0]
        self.vars = self._by_local_name(tf.global_variables(self.scope + '/'))
        self.trainables = self._by_local_name(tf.trainable_variables(self.scope + '/'))

    def _check_variable_scope(self):
        actual = tf.get_variable_scope().name
        if actual != self.scope:
            raise RuntimeError('Network %s: variables would land in scope "%s" instead of "%s"; build networks '
                               'outside other variable scopes' % (self.name, actual, self.scope))

    def _outputs_as_list(self, built):
        if is_tf_expression(built):
            return [built]
        if isinstance(built, tuple) and all(is_tf_expression(x) for x in built):
            return list(built)
        raise TypeError('Build function %s must return a tensor or a tuple of tensors, not %s'
                        % (self._build_func_name, type(built).__name__))

    def _by_local_name(self, variables):
        return OrderedDict((self.get_var_localname(var), var) for var in variables)

    def reset_vars(self):
        _initialize(self.vars.values())

    def reset_trainables(self):
        _initialize(self.trainables.values())

    def get_output_for(self, *in_expr, return_as_list=False, **dynamic_kwargs):
        """The network's output for the given input expressions, sharing its variables."""
        if len(in_expr) != self.num_inputs:
            raise TypeError('Network %s takes %d inputs (%s), got %d'
                            % (self.name, self.num_inputs, ', '.join(self.input_names), len(in_expr)))
        kwargs = dict(self.static_kwargs, **dynamic_kwargs)
        with tf.variable_scope(self.scope, reuse=True):
            self._check_variable_scope()
            named = [tf.identity(expr, name=input_name) for expr, input_name in zip(in_expr, self.input_names)]
            built = self._build_func(*named, **kwargs)
        as_list = self._outputs_as_list(built)
        return as_list if return_as_list else built

    def get_var_localname(self, var_or_globalname):
        """A variable's name inside the network, e.g. 'G/4x4/Conv/weight:0' -> '4x4/Conv/weight'."""
        full_name = var_or_globalname if isinstance(var_or_globalname, str) else var_or_globalname.name
        prefix = self.scope + '/'
        if not full_name.startswith(prefix):
            raise ValueError('%s is not a variable of network %s (scope %s)' % (full_name, self.name, self.scope))
        return full_name[len(prefix):].split(':')[0]

    def find_var(self, var_or_localname):
        if not isinstance(var_or_localname, str):
            return var_or_localname
        if var_or_localname not in self.vars:
            raise KeyError('Network %s has no variable %r; its variables are %s'
                           % (self.name, var_or_localname, ', '.join(self.vars)))
        return self.vars[var_or_localname]

    def get_var(self, var_or_localname):
        return run(self.find_var(var_or_localname))

    def set_var(self, var_or_localname, new_value):
        set_vars({self.find_var(var_or_localname): new_value})

    # Pickling.

    def __getstate__(self):
        # The pickle format (version 2) that the original ProGAN and legacy.py read too.
        names = list(self.vars)
        values = run([self.vars[name] for name in names])
        return dict(version=2, name=self.name, static_kwargs=self.static_kwargs,
                    build_module_src=self._build_module_src, build_func_name=self._build_func_name,
                    variables=list(zip(names, values)))

    def __setstate__(self, state):
        _ensure_default_session()       # Unpickling needs no ceremony, and changes no global state.
        self._init_fields()
        # Pickles from elsewhere: legacy.py converts the state and picks the build function.
        state = legacy.import_state(state, network_import_handlers)
        # Rebuilt locally, the network carries this project's source from now on (never code that
        # was not run); executed under the shim, its own.
        build_func, module_src = legacy.build_func_for_state(state)
        self._adopt(state['name'], state['static_kwargs'], state['build_func_name'], module_src, build_func)
        self._init_graph()
        variables = legacy.checked_variables(self, state)     # Before any variable is allocated.
        self.reset_vars()
        set_vars({self.find_var(name): value for name, value in variables})

    def clone(self, name=None):
        twin = object.__new__(Network)
        twin._init_fields()
        twin._adopt(self.name if name is None else name, self.static_kwargs, self._build_func_name,
                    self._build_module_src, self._build_func)
        twin._init_graph()
        twin.copy_vars_from(self)
        return twin

    def copy_vars_from(self, src_net):
        self._copy_from(src_net, [name for name in self.vars if name in src_net.vars])

    def copy_trainables_from(self, src_net):
        self._copy_from(src_net, [name for name in self.trainables if name in src_net.trainables])

    def _copy_from(self, src_net, names):
        values = run([src_net.vars[name] for name in names])
        set_vars({self.vars[name]: value for name, value in zip(names, values)})

    def convert(self, name=None, func=None, **static_kwargs):
        """A new network from another build function, taking over the variables that match."""
        converted = Network(name, func, **static_kwargs)
        converted.copy_vars_from(self)
        return converted

    def setup_as_moving_average_of(self, src_net, beta=0.99, beta_nontrainable=0.0):
        """An op that moves this network's variables towards src_net's (Gs from G)."""
        with absolute_name_scope(self.scope), tf.name_scope('MovingAvg'):
            updates = []
            for name in self.vars:
                if name in src_net.vars:
                    # beta is the share of the old value kept; lerp(new, old, beta) blends.
                    keep = beta if name in self.trainables else beta_nontrainable
                    target = self.vars[name]
                    updates.append(target.assign(lerp(src_net.vars[name], target, keep)))
            return tf.group(*updates)

    # Running on numpy arrays.

    def run(self, *in_arrays, return_as_list=False, print_progress=False, minibatch_size=None, num_gpus=1,
            out_mul=1.0, out_add=0.0, out_shrink=1, out_dtype=None, **dynamic_kwargs):
        """Evaluate on numpy inputs in minibatches; outputs optionally scaled, shrunk and cast."""
        if len(in_arrays) != self.num_inputs:
            raise TypeError('Network %s takes %d input arrays (%s), got %d'
                            % (self.name, self.num_inputs, ', '.join(self.input_names), len(in_arrays)))
        total = in_arrays[0].shape[0]
        step = total if minibatch_size is None else minibatch_size
        outputs = self._run_outputs(num_gpus, out_mul, out_add, out_shrink, out_dtype, dynamic_kwargs)
        results = [np.empty([total] + shape_to_list(out.shape)[1:], out.dtype.name) for out in outputs]
        for begin in range(0, total, step):
            if print_progress:
                print('\r%d / %d' % (begin, total), end='')
            end = min(begin + step, total)
            feed = {template: array[begin:end] for template, array in zip(self.input_templates, in_arrays)}
            for result, part in zip(results, run(outputs, feed)):
                result[begin:end] = part
        if print_progress:
            print('\r%d / %d' % (total, total))
        if return_as_list:
            return results
        return results[0] if len(results) == 1 else tuple(results)

    def _run_outputs(self, num_gpus, out_mul, out_add, out_shrink, out_dtype, dynamic_kwargs):
        """The output tensors for run(), built once per combination of options."""
        key = str([sorted(dynamic_kwargs.items()), num_gpus, out_mul, out_add, out_shrink, out_dtype])
        if key not in self._run_cache:
            with absolute_name_scope(self.scope + '/Run'), _no_dependencies():
                per_tower = list(zip(*[tf.split(template, num_gpus) for template in self.input_templates]))
                tower_outputs = []
                for device, tower_inputs in zip(device_names(num_gpus), per_tower):
                    with tf.device(device):
                        raw = self.get_output_for(*tower_inputs, return_as_list=True, **dynamic_kwargs)
                        tower_outputs.append([_postprocess(x, out_mul, out_add, out_shrink, out_dtype) for x in raw])
                self._run_cache[key] = [tf.concat(parts, axis=0) for parts in zip(*tower_outputs)]
        return self._run_cache[key]

    # Inspection.

    def list_layers(self):
        """[(layer name, output tensor, [trainables])] for the template graph's top-level scopes."""
        return [(name, _op_output(ops[-1]), trainables) for name, ops, trainables in self._layers()]

    def _layers(self):
        """[(layer name, its ops, its trainables)]. A layer is the outermost scope that holds ops
        of its own (not only sub-scopes), e.g. '4x4/Conv' or 'ToRGB_lod0'."""
        ops = [op for op in _ops_in_scope(self.scope) if not any(p in op.name for p in _BOOKKEEPING_PATTERNS)]
        layers = []
        pending = [(self.scope, ops, True)]
        while pending:
            scope, scope_ops, is_network = pending.pop(0)
            prefix = scope + '/'
            if not is_network and any('/' not in op.name[len(prefix):] for op in scope_ops):
                name = scope[len(self.scope) + 1:]
                trainables = [var for local, var in self.trainables.items() if local.startswith(name + '/')]
                layers.append((name, scope_ops, trainables))
            else:
                children = [(prefix + child, child_ops, False) for child, child_ops in _group_by_child(scope_ops, prefix)]
                pending[0:0] = children     # Depth first, in the order the ops were made.
        return layers

    def print_layers(self, title=None, hide_layers_with_no_params=False):
        """A table of the layers, their parameter counts, output shapes and weight shapes.

        Shapes are NCHW, as the network's inputs and outputs are: the layers compute in NHWC,
        and the transposes between the two layouts are not layers, so they get no rows.
        """
        nhwc = _nhwc_tensor_names(_ops_in_scope(self.scope))
        print()
        print(_LAYER_ROW % (title if title is not None else self.name, 'Params', 'OutputShape', 'WeightShape'))
        print(_LAYER_ROW % (('---',) * 4))
        total_params = 0
        for name, ops, trainables in self._layers():
            params = sum(int(np.prod(shape_to_list(var.shape))) for var in trainables)
            total_params += params
            if _is_layout_conversion(ops) or (hide_layers_with_no_params and params == 0):
                continue
            print(_LAYER_ROW % (name, params or '-', _nchw_shape_text(_op_output(ops[-1]), nhwc),
                                _weight_shape_text(trainables)))
        print(_LAYER_ROW % (('---',) * 4))
        print(_LAYER_ROW % ('Total', total_params, '', ''))
        print()

    def setup_weight_histograms(self, title=None):
        """A histogram summary per trainable, tagged '<scopes>_<title>_<variable>'."""
        title = self.name if title is None else title
        with tf.name_scope(None), tf.device(None), _no_dependencies():
            for local_name, var in self.trainables.items():
                *scopes, leaf = local_name.split('/')
                tf.summary.histogram('_'.join(scopes + ['%s_%s' % (title, leaf)]), var)


def _required_inputs(build_func):
    """The build function's inputs: its positional parameters without defaults."""
    return [param.name for param in inspect.signature(build_func).parameters.values()
            if param.kind == param.POSITIONAL_OR_KEYWORD and param.default is param.empty]


def _free_scope_name(name):
    """The network's scope: its name, made unique in the graph ('G', 'G_1', ...)."""
    return tf.get_default_graph().unique_name(name.replace('/', '_'), mark_as_used=False)


def _initialize(variables):
    run([var.initializer for var in variables])


def _weight_shape_text(trainables):
    """The shape of the layer's weight, '-' for none or several."""
    weights = [var for var in trainables if var.name.endswith('/weight:0')]
    return weights[0].shape if len(weights) == 1 else '-'


def _op_basename(tensor):
    return tensor.name.split('/')[-1].split(':')[0]


def _op_output(op):
    return op.outputs[0] if op.outputs else op


def _ops_in_scope(scope):
    prefix = scope + '/'
    return [op for op in tf.get_default_graph().get_operations() if op.name.startswith(prefix)]


def _group_by_child(ops, prefix):
    """[(child scope, its ops)] by the first name component after `prefix`, in order of appearance."""
    groups = OrderedDict()
    for op in ops:
        child = op.name[len(prefix):].split('/')[0]
        groups.setdefault(child, []).append(op)
    return list(groups.items())


_LAYOUT_PERMUTATIONS = {(0, 2, 3, 1): 'NHWC', (0, 3, 1, 2): 'NCHW'}


def _layout_after(op):
    """'NHWC' or 'NCHW' if `op` transposes between the two image layouts, else None."""
    if op.type != 'Transpose':
        return None
    perm = tf.get_static_value(op.inputs[1])
    if perm is None:
        return None
    return _LAYOUT_PERMUTATIONS.get(tuple(int(axis) for axis in perm))


def _is_layout_conversion(ops):
    """A layer that only transposes between the layouts (by op type: scope names vary)."""
    return any(_layout_after(op) for op in ops) and all(op.type in ('Transpose', 'Const') for op in ops)


def _nhwc_tensor_names(ops):
    """Names of the tensors computed from NHWC data. Ops come in creation order, which is
    topological, so one pass suffices: a layout transpose decides, other ops inherit from
    their inputs."""
    nhwc = set()
    for op in ops:
        layout = _layout_after(op)
        from_nhwc = layout == 'NHWC' if layout else any(tensor.name in nhwc for tensor in op.inputs)
        if from_nhwc:
            nhwc.update(tensor.name for tensor in op.outputs)
    return nhwc


def _nchw_shape_text(output, nhwc):
    shape = getattr(output, 'shape', '')
    if isinstance(output, tf.Tensor) and output.name in nhwc and shape.ndims == 4:
        n, h, w, c = shape.dims
        shape = tf.TensorShape([n, c, h, w])
    return shape


def _postprocess(x, out_mul, out_add, out_shrink, out_dtype):
    """Network.run's output options: scale, offset, box-downscale, then round and cast."""
    if out_mul != 1.0:
        x = x * out_mul
    if out_add != 0.0:
        x = x + out_add
    if out_shrink > 1:
        x = _box_downscale_nchw(x, out_shrink)
    if out_dtype is not None:
        target = tf.as_dtype(out_dtype)
        if target.is_integer:
            x = tf.round(x)     # Round to nearest; a plain cast would truncate.
        x = tf.saturate_cast(x, target)
    return x


def _box_downscale_nchw(x, factor):
    window = [1, factor, factor, 1]
    nhwc = tf.transpose(x, [0, 2, 3, 1])      # CPU pooling kernels take NHWC only.
    pooled = tf.nn.avg_pool(nhwc, ksize=window, strides=window, padding='VALID')
    return tf.transpose(pooled, [0, 3, 1, 2])
