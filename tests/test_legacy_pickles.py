"""Network pickles written elsewhere (the original ProGAN, WSI-ProGAN) and pickles nobody vouches for.

Legacy pickles are made here the way the original made them: a tuple (G, D, Gs) of objects whose
class is referenced as `tfutil.Network` and whose state dict holds the original's variable layout
(DESIGN 2b), the text of an NCHW TF1-style networks module (tests/fixtures/) and random weights.
They are built with numpy alone, loaded in fresh processes and checked against the independent
numpy forward pass in tests/reference_numpy.py.
"""

import ast
import json
import os
import pickle
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import config
import legacy
import misc
import reference_numpy as ref
import tfutil
import unpickler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, 'tests', 'fixtures', 'original_networks_nchw.py')
ORIGINAL_SOURCE = open(FIXTURE, encoding='utf-8').read()
# The fixture is our own rewrite in the original's layout, not the original's text, so its fingerprint
# is not a known one: tests that rebuild it locally vouch for it explicitly, as a user who reviewed a
# source would (trusted_sources / WSI_PROGAN_TRUSTED_SOURCES).
FIXTURE_FINGERPRINT = legacy.source_fingerprint(ORIGINAL_SOURCE)
LOCAL_SOURCE = open(os.path.join(REPO, 'networks.py'), encoding='utf-8').read()
# A fork of the original whose build functions have other names: nothing local matches them.
FORK_SOURCE = ORIGINAL_SOURCE.replace('def G_paper(', 'def G_histo(').replace('def D_paper(', 'def D_histo(')

SMALL = dict(num_channels=3, resolution=16, fmap_base=64, fmap_max=32)    # nf = 32, 32, 16, 8.
LATENT = 32
LODS = [0.0, 1.0, 0.35, 1.6]        # Integer and fractional (fading in 16x16, and 8x8).
NUM = 8                             # Minibatch: two minibatch-stddev groups of four.

# ----------------------------------------------------------------------------
# Making legacy pickles without TensorFlow.


def legacy_state(name, func_name, static_kwargs, variables, source=ORIGINAL_SOURCE):
    return {'version': 2, 'name': name, 'static_kwargs': static_kwargs, 'build_module_src': source,
            'build_func_name': func_name, 'variables': variables}


def write_legacy_pickle(path, obj_of_states, protocol=4, numpy1_names=False):
    """Pickle `obj_of_states` (states, or tuples of them) as the original did: each state is
    wrapped in an object of a class referenced as tfutil.Network, whose __getstate__ gives it.
    numpy1_names writes numpy's helpers under their numpy 1 module names (numpy.core...), as
    pickles from the original's time have them."""
    fake_tfutil = types.ModuleType('tfutil')

    class Network:
        def __init__(self, state):
            self.state = state

        def __getstate__(self):
            return self.state

    Network.__module__, Network.__qualname__ = 'tfutil', 'Network'
    fake_tfutil.Network = Network
    wrap = lambda obj: tuple(wrap(o) for o in obj) if isinstance(obj, (tuple, list)) else Network(obj)
    real_tfutil = sys.modules['tfutil']
    sys.modules['tfutil'] = fake_tfutil
    try:
        data = pickle.dumps(wrap(obj_of_states), protocol=protocol)
    finally:
        sys.modules['tfutil'] = real_tfutil
    if numpy1_names:
        assert protocol <= 3       # GLOBAL opcodes carry names as text lines.
        data = data.replace(b'cnumpy._core.', b'cnumpy.core.')
        assert b'cnumpy.core.multiarray\n_reconstruct\n' in data
    with open(path, 'wb') as file:
        file.write(data)
    return path


def make_networks(seed, label_size, fused_scale=True, g_name='G_paper', d_name='D_paper',
                  source=ORIGINAL_SOURCE, easydict=False):
    """States of (G, D, Gs) with random weights; Gs differs from G as a moving average does."""
    rng = np.random.default_rng(seed)
    kwargs = dict(SMALL, label_size=label_size)
    if not fused_scale:
        kwargs['fused_scale'] = False
    g_kwargs = dict(kwargs, latent_size=LATENT)
    if easydict:
        g_kwargs = config.EasyDict(g_kwargs)
    g_vars = ref.random_variables(ref.g_layout(**g_kwargs), rng)
    gs_vars = [(n, v if n == 'lod' else v + np.float32(0.05) * rng.standard_normal(v.shape).astype(np.float32))
               for n, v in g_vars]
    d_vars = ref.random_variables(ref.d_layout(**kwargs), rng)
    states = (legacy_state('G', g_name, g_kwargs, g_vars, source),
              legacy_state('D', d_name, dict(kwargs), d_vars, source),
              legacy_state('Gs', g_name, g_kwargs, gs_vars, source))
    return states, kwargs


class _StateHolder:
    def __setstate__(self, state):
        self.state = state


class _StateReader(pickle.Unpickler):
    def find_class(self, module, name):
        return _StateHolder if (module, name) == ('tfutil', 'Network') else super().find_class(module, name)


def read_states(path):
    """The states in a network pickle, read without building anything."""
    with open(path, 'rb') as file:
        return [holder.state for holder in _StateReader(file).load()]


# ----------------------------------------------------------------------------
# Loading in fresh processes: one process loads every legacy pickle, evaluates and saves it
# again; a second process loads what the first saved.

LOAD_SCRIPT = textwrap.dedent('''
    import json, pickle, sys
    import numpy as np
    spec = json.load(open(sys.argv[1]))
    io = np.load(spec['io'])
    import os
    import legacy, misc, tfutil       # No init_tf(): unpickling must not need it.
    for case in spec['cases']:
        if case['loader'] == 'pickle.load':     # Its only opt-in is the environment variable.
            os.environ[legacy.ALLOW_CODE_ENV] = '1' if case['allow'] else '0'
            with open(case['path'], 'rb') as f:
                G, D, Gs = pickle.load(f)
        else:
            G, D, Gs = misc.load_pkl(case['path'], allow_unknown_source=case['allow'],
                                     trusted_sources=case['trusted'])
        out = {}
        for tag, net in [('G', G), ('D', D), ('Gs', Gs)]:
            out[tag + '_module'] = np.array(net._build_func.__module__)
            for name, value in zip(net.vars, tfutil.run(list(net.vars.values()))):
                out[tag + '_var/' + name] = value
        if case.get('resave'):
            misc.save_pkl((G, D, Gs), case['resave'])
        latents, labels = io['latents'], io['labels'][:, :Gs.input_shapes[1][1]]
        for i, lod in enumerate(spec['lods']):
            Gs.set_var('lod', np.float32(lod))
            D.set_var('lod', np.float32(lod))
            out['fakes_%d' % i] = Gs.run(latents, labels)
            out['scores_%d' % i], out['label_logits_%d' % i] = D.run(io['images'])
        np.savez(case['out'], **out)
''')


def run_load_script(tmp, cases, io_path, tag):
    spec = os.path.join(tmp, 'spec-%s.json' % tag)
    with open(spec, 'w') as f:
        json.dump({'cases': cases, 'io': io_path, 'lods': LODS}, f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    env.pop(legacy.TRUSTED_SOURCES_ENV, None)
    proc = subprocess.run([sys.executable, '-c', LOAD_SCRIPT, spec], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


CASES = {
    # Original-layout source (vouched for), fused layers, labels, EasyDict static kwargs: rebuilt from this
    # project's networks.
    'local': dict(seed=1, label_size=2, easydict=True, protocol=4, expect='local', allow=False,
                  trusted=[FIXTURE_FINGERPRINT]),
    # Unfused layers (nearest upscale + Conv0, Conv1 + box downscale): also rebuilt locally.
    'local_unfused': dict(seed=2, label_size=0, fused_scale=False, protocol=4, expect='local', allow=False,
                          trusted=[FIXTURE_FINGERPRINT]),
    # A fork with unknown build functions, pickled with numpy 1 names: its NCHW source runs under the shim.
    'shim': dict(seed=3, label_size=2, g_name='G_histo', d_name='D_histo', source=FORK_SOURCE, protocol=2,
                 numpy1_names=True, expect='shim', allow=True, trusted=[]),
}


@pytest.fixture(scope='module')
def loaded(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp('legacy'))
    rng = np.random.default_rng(0)
    io = dict(latents=rng.standard_normal((NUM, LATENT)).astype(np.float32),
              labels=np.eye(2, dtype=np.float32)[rng.integers(0, 2, NUM)],
              images=rng.standard_normal((NUM, 3, 16, 16)).astype(np.float32))
    io_path = os.path.join(tmp, 'io.npz')
    np.savez(io_path, **io)
    first, second, info = [], [], {}
    for name, case in CASES.items():
        net_args = {k: case[k] for k in ('seed', 'label_size', 'fused_scale', 'g_name', 'd_name', 'source', 'easydict')
                    if k in case}
        states, kwargs = make_networks(**net_args)
        pkl = write_legacy_pickle(os.path.join(tmp, '%s.pkl' % name), states, protocol=case['protocol'],
                                  numpy1_names=case.get('numpy1_names', False))
        resaved = os.path.join(tmp, '%s-resaved.pkl' % name)
        first.append(dict(path=pkl, allow=case['allow'], trusted=case['trusted'], loader='load_pkl', resave=resaved,
                          out=os.path.join(tmp, '%s-first.npz' % name)))
        # The second load uses plain pickle.load, as a notebook does, for the resaved files.
        second.append(dict(path=resaved, allow=case['allow'], trusted=[], loader='pickle.load',
                           out=os.path.join(tmp, '%s-second.npz' % name)))
        info[name] = dict(states=states, kwargs=kwargs, pkl=pkl, resaved=resaved, case=case)
    stdout_first = run_load_script(tmp, first, io_path, 'first')
    stdout_second = run_load_script(tmp, second, io_path, 'second')
    for name, spec_first, spec_second in zip(info, first, second):
        info[name]['first'] = dict(np.load(spec_first['out']))
        info[name]['second'] = dict(np.load(spec_second['out']))
    return dict(info=info, io=io, stdout=[stdout_first, stdout_second])


def module_kind(module_name):
    if module_name == 'networks':
        return 'local'
    assert module_name.startswith('_tfutil_network_import_module_'), module_name
    return 'shim'


@pytest.mark.parametrize('name', list(CASES))
def test_legacy_pickle_matches_numpy_reference(loaded, name):
    info, io = loaded['info'][name], loaded['io']
    out, kwargs = info['first'], info['kwargs']
    for tag in ('G', 'D', 'Gs'):
        assert module_kind(str(out[tag + '_module'])) == info['case']['expect']
    g_vars, d_vars, gs_vars = (state['variables'] for state in info['states'])
    labels = io['labels'][:, :kwargs['label_size']]
    for i, lod in enumerate(LODS):
        expected_fakes = ref.generator(gs_vars, io['latents'], labels, lod, **kwargs)
        expected_scores, expected_labels = ref.discriminator(d_vars, io['images'], lod, **kwargs)
        assert out['fakes_%d' % i].shape == (NUM, 3, 16, 16)
        np.testing.assert_allclose(out['fakes_%d' % i], expected_fakes, atol=1e-4, rtol=1e-4,
                                   err_msg='Gs at lod %s' % lod)
        np.testing.assert_allclose(out['scores_%d' % i], expected_scores, atol=1e-4, rtol=1e-4,
                                   err_msg='D scores at lod %s' % lod)
        assert out['label_logits_%d' % i].shape == (NUM, kwargs['label_size'])
        np.testing.assert_allclose(out['label_logits_%d' % i], expected_labels, atol=1e-4, rtol=1e-4,
                                   err_msg='D label logits at lod %s' % lod)
    # Each LOD really gives a different picture (the lod variable is used).
    assert not np.allclose(out['fakes_0'], out['fakes_2'], atol=1e-3)
    assert not np.allclose(out['scores_0'], out['scores_3'], atol=1e-3)


def test_shim_is_announced_and_local_rebuilds_are_silent(loaded):
    stdout = loaded['stdout'][0]
    assert stdout.count('TensorFlow 1 compatibility shim') == 3, stdout
    assert 'network "G" (build function G_histo)' in stdout
    assert 'no build function \'G_histo\'' in stdout
    assert 'G_paper' not in stdout and 'D_paper' not in stdout


@pytest.mark.parametrize('name', list(CASES))
def test_load_save_load_is_faithful(loaded, name):
    info = loaded['info'][name]
    first, second = info['first'], info['second']
    # The variables loaded are the pickle's, and survive a save and a load in a fresh process.
    for tag, state in zip(('G', 'D', 'Gs'), info['states']):
        loaded_vars = {k.split('/', 1)[1]: v for k, v in first.items() if k.startswith(tag + '_var/')}
        assert set(loaded_vars) == {n for n, _ in state['variables']}
        for var_name, value in state['variables']:
            np.testing.assert_array_equal(loaded_vars[var_name], value, err_msg='%s %s' % (tag, var_name))
    assert set(first) == set(second)
    for key in first:
        if key.endswith('_module'):
            assert module_kind(str(first[key])) == module_kind(str(second[key]))
        elif '_var/' in key:
            np.testing.assert_array_equal(second[key], first[key], err_msg=key)
        else:
            np.testing.assert_allclose(second[key], first[key], rtol=0, atol=1e-6, err_msg=key)
    # What was saved again is the legacy state: same function, names, kwargs, values; the source is this
    # project's once rebuilt locally, and the pickle's own when it was executed under the shim.
    for original, resaved in zip(info['states'], read_states(info['resaved'])):
        assert resaved['version'] == 2
        expected_source = LOCAL_SOURCE if info['case']['expect'] == 'local' else original['build_module_src']
        assert resaved['build_module_src'] == expected_source
        assert resaved['build_func_name'] == original['build_func_name']
        assert resaved['name'] == original['name']
        assert dict(resaved['static_kwargs']) == dict(original['static_kwargs'])
        assert [n for n, _ in resaved['variables']] == [n for n, _ in original['variables']]
        for (_, a), (_, b) in zip(resaved['variables'], original['variables']):
            np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# The restricted loader.


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_restricted_loader_refuses_os_system(tmp_path):
    marker = tmp_path / 'marker'
    pkl = tmp_path / 'network-snapshot-000001.pkl'
    states, _ = make_networks(seed=4, label_size=0)
    # A network tuple with one more element that runs a command when unpickled.
    with open(pkl, 'wb') as f:
        pickle.dump((_RunsCommand('touch %s' % marker),) + tuple(states), f, protocol=4)
    with pytest.raises(unpickler.RefusedPickleError) as excinfo:
        misc.load_pkl(str(pkl))
    message = str(excinfo.value)
    assert '%s.system' % os.system.__module__ in message      # posix.system on Linux.
    assert str(pkl) in message and 'pickle.load' in message
    assert not marker.exists()
    # The file really is hostile: a plain pickle.load runs the command.
    with open(pkl, 'rb') as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize('gadget', ['builtins.eval', 'builtins.getattr', 'subprocess.Popen', 'numpy.load'])
def test_restricted_loader_refuses_other_globals(tmp_path, gadget):
    module, name = gadget.rsplit('.', 1)
    pkl = tmp_path / 'evil.pkl'
    # GLOBAL, an argument tuple, REDUCE: calls module.name('x') when unpickled.
    pkl.write_bytes(b'c%s\n%s\n(Vx\ntR.' % (module.encode(), name.encode()))
    with pytest.raises(unpickler.RefusedPickleError, match='Refused to load %s' % gadget.replace('.', r'\.')):
        misc.load_pkl(str(pkl))


def test_unknown_source_needs_opt_in(tmp_path, tf_session, monkeypatch):
    marker = tmp_path / 'source-ran'
    # Module-level code in the embedded source shows whether the file's code ran.
    source = 'open(%r, "a").close()\n' % str(marker) + FORK_SOURCE
    states, _ = make_networks(seed=5, label_size=0, g_name='G_histo', d_name='D_histo', source=source)
    pkl = write_legacy_pickle(str(tmp_path / 'fork.pkl'), states)
    monkeypatch.delenv(unpickler.ALLOW_CODE_ENV, raising=False)
    for env_value in [None, '0']:
        if env_value is not None:
            monkeypatch.setenv(unpickler.ALLOW_CODE_ENV, env_value)
        with pytest.raises(unpickler.UnknownSourceError) as excinfo:
            misc.load_pkl(pkl)
        message = str(excinfo.value)
        for part in [pkl, 'network "G" (build function G_histo)', 'no build function \'G_histo\'',
                     'running the Python code stored in the file', 'allow_unknown_source=True',
                     'WSI_PROGAN_ALLOW_PICKLE_CODE=1', legacy.source_fingerprint(source),
                     'WSI_PROGAN_TRUSTED_SOURCES']:
            assert part in message, (part, message)
        assert not marker.exists()
    monkeypatch.setenv(unpickler.ALLOW_CODE_ENV, '1')
    G, D, Gs = misc.load_pkl(pkl)
    assert marker.exists()
    assert G._build_func.__module__.startswith('_tfutil_network_import_module_')
    marker.unlink()
    monkeypatch.delenv(unpickler.ALLOW_CODE_ENV)
    G, D, Gs = misc.load_pkl(pkl, allow_unknown_source=True)
    assert Gs.output_shape == [None, 3, 16, 16]
    # The policy applied to that one load only.
    with pytest.raises(unpickler.UnknownSourceError):
        misc.load_pkl(pkl)
    assert not marker.exists()
    # Plain pickle.load does not run unknown networks source either, unless the environment allows it.
    with open(pkl, 'rb') as f, pytest.raises(unpickler.UnknownSourceError, match='the pickle being loaded'):
        pickle.load(f)
    assert not marker.exists()
    monkeypatch.setenv(unpickler.ALLOW_CODE_ENV, '1')
    with open(pkl, 'rb') as f:
        G, D, Gs = pickle.load(f)
    assert D.output_shapes == [[None, 1], [None, 0]]


def test_this_projects_pickles_load_through_the_restricted_loader(tf_session, tmp_path):
    G = tfutil.Network('G', func='networks.G_paper', latent_size=LATENT, label_size=2, **SMALL)
    D = tfutil.Network('D', func='networks.D_paper', label_size=2, **SMALL)
    Gs = G.clone('Gs')
    pkl = str(tmp_path / 'network-snapshot-000002.pkl')
    misc.save_pkl((G, D, Gs), pkl)
    G2, D2, Gs2 = misc.load_pkl(pkl)
    assert G2._build_func is sys.modules['networks'].G_paper
    for a, b in [(G, G2), (D, D2), (Gs, Gs2)]:
        assert list(a.vars) == list(b.vars)
        for name in a.vars:
            np.testing.assert_array_equal(a.get_var(name), b.get_var(name))


# ----------------------------------------------------------------------------
# When is embedded source recognised as this project's build function?


def recognised(state, trust=True):
    """Whether the state is rebuilt locally; trust: vouch for its source's fingerprint, as these
    checks are about what the source means, not where it comes from."""
    fingerprints = [legacy.source_fingerprint(state['build_module_src'])] if trust else []
    with legacy.source_policy(legacy.SourcePolicy(trusted=fingerprints)):
        func, reason = legacy.recognise_local_build(state)
    return func is not None, reason


def test_recognition_by_name_signature_and_variables(tf_session):
    states, _ = make_networks(seed=6, label_size=0)
    g = states[0]
    ok, _ = recognised(g)
    assert ok
    with legacy.source_policy(legacy.SourcePolicy(trusted=[FIXTURE_FINGERPRINT])):
        assert legacy.recognise_local_build(states[1])[0] is sys.modules['networks'].D_paper

    # The same state, with its source not vouched for: not rebuilt, however well it fits.
    ok, reason = recognised(g, trust=False)
    assert not ok and 'not one this project knows' in reason and FIXTURE_FINGERPRINT in reason

    # A variable of another shape (the fused weight stored [k, k, in, out] instead of [k, k, out, in]).
    variables = [(n, v.transpose(0, 1, 3, 2) if n == '16x16/Conv0_up/weight' else v) for n, v in g['variables']]
    ok, reason = recognised(dict(g, variables=variables))
    assert not ok and '16x16/Conv0_up/weight' in reason and 'shapes differ' in reason

    # A variable the local build does not make, and one it makes that the pickle lacks.
    variables = [(n.replace('ToRGB_lod0', 'ToRGB_final'), v) for n, v in g['variables']]
    ok, reason = recognised(dict(g, variables=variables))
    assert not ok and 'ToRGB_final/weight' in reason and 'ToRGB_lod0/weight' in reason

    # A static argument only the pickle's function knows (the local one would ignore it).
    source = ORIGINAL_SOURCE.replace('    use_leakyrelu       = True,', '    use_leakyrelu       = True,\n'
                                     '    use_stain_norm      = False,')
    assert source != ORIGINAL_SOURCE
    ok, reason = recognised(dict(g, build_module_src=source, static_kwargs=dict(g['static_kwargs'], use_stain_norm=True)))
    assert not ok and 'use_stain_norm' in reason
    # ... and one only this project's function knows (the pickle's ignored it).
    d = states[1]
    ok, reason = recognised(dict(d, static_kwargs=dict(d['static_kwargs'], use_batchnorm=True)))
    assert not ok and 'use_batchnorm' in reason

    # A different default for an argument the pickle does not set.
    source = ORIGINAL_SOURCE.replace('pixelnorm_epsilon   = 1e-8', 'pixelnorm_epsilon   = 1e-4')
    assert source != ORIGINAL_SOURCE
    ok, reason = recognised(dict(g, build_module_src=source))
    assert not ok and 'pixelnorm_epsilon' in reason

    # Names that reach beyond the module's own functions are never called.
    for name in ['np.load', 'tf.io.write_file', 'nchw_to_nhwc.__globals__', 'G_histo', '']:
        ok, reason = recognised(dict(g, build_func_name=name))
        assert not ok and 'no build function' in reason


def test_import_handlers_convert_states(tf_session, tmp_path, monkeypatch):
    states, _ = make_networks(seed=7, label_size=0)
    # A made-up older format: variables as a dict, and version 1.
    old = [dict(s, version=1, variables=dict(s['variables'])) for s in states]
    pkl = write_legacy_pickle(str(tmp_path / 'old.pkl'), old)
    with pytest.raises(ValueError, match='Unsupported Network pickle version 1.*network_import_handlers'):
        misc.load_pkl(pkl)

    def from_version_1(state):
        if state['version'] == 1:
            state = dict(state, version=2, variables=list(state['variables'].items()))
        return state

    monkeypatch.setattr(tfutil, 'network_import_handlers', [from_version_1])
    G, D, Gs = misc.load_pkl(pkl, trusted_sources=[FIXTURE_FINGERPRINT])
    np.testing.assert_array_equal(Gs.get_var('4x4/Dense/weight'), dict(states[2]['variables'])['4x4/Dense/weight'])
    assert G._build_func is sys.modules['networks'].G_paper


# ----------------------------------------------------------------------------
# Resuming training from a legacy pickle.

RESUME_CONFIG = '''
# A config of the shape of config.py: resume from a legacy pickle, train a little, snapshot.
from config import EasyDict

data_dir = {data_dir!r}
result_dir = {result_dir!r}
inception_dir = None
tf_config = EasyDict()
tf_config['graph_options.place_pruned_graph'] = True
env = EasyDict()
env.TF_CPP_MIN_LOG_LEVEL = '2'

desc = 'resume-legacy'
random_seed = 1000
dataset = EasyDict(class_name='dataset.SyntheticDataset', resolution=16, num_channels=3)
train = EasyDict(func='train.train_progressive_gan', resume_run_id={pkl!r}, total_kimg=5,
                 network_snapshot_ticks=1, image_snapshot_ticks=1)
G = EasyDict(func='networks.G_paper', fmap_base=64, fmap_max=32, latent_size=32)
D = EasyDict(func='networks.D_paper', fmap_base=64, fmap_max=32)
G_opt = EasyDict(beta1=0.0, beta2=0.99, epsilon=1e-8)
D_opt = EasyDict(beta1=0.0, beta2=0.99, epsilon=1e-8)
G_loss = EasyDict(func='loss.G_wgan_acgan')
D_loss = EasyDict(func='loss.D_wgangp_acgan')
sched = EasyDict(lod_initial_resolution=8, lod_training_kimg=3, lod_transition_kimg=3, minibatch_base=16,
                 tick_kimg_base=0.5, tick_kimg_dict={{}})
grid = EasyDict(size='4x2', layout='random')
num_gpus = 1
'''


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['local', 'shim'])
def test_resume_from_a_legacy_pickle(tmp_path, kind):
    # 'local': the original's G_paper/D_paper (layout vouched for by fingerprint), rebuilt from this project's
    # networks module.
    # 'shim': a fork's unknown source, allowed by the environment variable, trained under the shim.
    source = ORIGINAL_SOURCE if kind == 'local' else FORK_SOURCE
    names = dict(g_name='G_paper', d_name='D_paper') if kind == 'local' else dict(g_name='G_histo', d_name='D_histo')
    states, _ = make_networks(seed=8, label_size=0, easydict=True, source=source, **names)
    legacy_dir = tmp_path / 'from-elsewhere'
    legacy_dir.mkdir()
    pkl = write_legacy_pickle(str(legacy_dir / 'network-snapshot-000004.pkl'), states)
    result_dir = tmp_path / 'results'
    cfg = tmp_path / 'resume_config.py'
    cfg.write_text(RESUME_CONFIG.format(data_dir=str(tmp_path), result_dir=str(result_dir), pkl=pkl))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    env.pop(unpickler.ALLOW_CODE_ENV, None)
    env[legacy.TRUSTED_SOURCES_ENV] = FIXTURE_FINGERPRINT
    if kind == 'shim':
        env[unpickler.ALLOW_CODE_ENV] = '1'
    proc = subprocess.run([sys.executable, 'train.py', str(cfg)], cwd=REPO, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = sorted(result_dir.iterdir())
    assert len(runs) == 1
    run = runs[0]
    log = (run / 'log.txt').read_text()
    assert 'Loading networks from "%s"' % pkl in log
    assert 'Resuming at kimg 4.0' in log
    assert log.count('TensorFlow 1 compatibility shim') == (0 if kind == 'local' else 3), log
    ticks = misc.read_tick_lines(str(run))
    assert ticks and all(4.0 < tick.kimg <= 5.1 for tick in ticks), ticks
    # Between kimg 4 and 5 the schedule fades in 16x16: lod = 1 - (kimg - 3) / 3 goes from 0.67 to 0.33.
    lods = [tick.lod for tick in ticks]
    assert all(0.3 <= lod <= 0.67 for lod in lods) and lods == sorted(lods, reverse=True), ticks
    assert (run / 'fakes000004.png').exists() and (run / 'fakes000005.png').exists()
    assert (run / 'network-snapshot-000005.pkl').exists() and (run / '_training-done.txt').exists()

    # Training went on from the legacy weights: Gs moved a little from them (moving average of G),
    # G and D more; the layout was kept, and the source is this project's once rebuilt locally.
    snapshot = read_states(str(run / 'network-snapshot-000005.pkl'))
    for before, after in zip(states, snapshot):
        assert after['build_module_src'] == (LOCAL_SOURCE if kind == 'local' else source)
        assert after['build_func_name'] == before['build_func_name']
        old, new = dict(before['variables']), dict(after['variables'])
        assert set(old) == set(new)
        w = '4x4/Conv/weight'
        change = np.linalg.norm(new[w] - old[w]) / np.linalg.norm(old[w])
        assert 0 < change < (0.2 if after['name'] == 'Gs' else 1.0), (after['name'], change)
        assert 0.3 <= float(new['lod']) < 0.4     # The lod the last step trained at.


# ----------------------------------------------------------------------------
# Source laundering: a pickle carrying this project's real networks source plus a payload.


def payload_source(marker):
    """The real networks.py with a payload appended, as in the attack: build functions, signatures and
    variables are exactly this project's, so only the source's fingerprint tells them apart."""
    return LOCAL_SOURCE + '\nimport os; os.system(%r)\n' % ('touch %s' % marker)


def test_fingerprints_ignore_formatting_and_see_changes():
    fingerprint = legacy.source_fingerprint(LOCAL_SOURCE)
    assert fingerprint == legacy.source_fingerprint(LOCAL_SOURCE.replace('\n\n\n', '\n\n# A comment.\n\n'))
    reformatted = ast.unparse(ast.parse(LOCAL_SOURCE))    # Other layout and quotes, no comments.
    assert reformatted != LOCAL_SOURCE and legacy.source_fingerprint(reformatted) == fingerprint
    redocumented = LOCAL_SOURCE.replace('"""Images [minibatch,', '"""Pictures [minibatch,')
    assert redocumented != LOCAL_SOURCE and legacy.source_fingerprint(redocumented) == fingerprint
    changed_default = LOCAL_SOURCE.replace('pixelnorm_epsilon=1e-8,', 'pixelnorm_epsilon=1e-6,')
    assert changed_default != LOCAL_SOURCE and legacy.source_fingerprint(changed_default) != fingerprint
    assert legacy.source_fingerprint(payload_source('/tmp/x')) != fingerprint
    assert legacy.source_fingerprint('def broken(:') is None
    assert legacy.source_fingerprint('x = ' + '-' * 100000 + '1') is None     # Too deep to read: unknown.


def test_every_state_of_networks_py_is_known():
    # If this fails after an edit of networks.py, add the new fingerprint to legacy.KNOWN_SOURCES
    # (legacy.source_fingerprint(open('networks.py').read())), so that pickles written by it stay known.
    commits = subprocess.run(['git', 'log', '--format=%H', '--', 'networks.py'], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    assert commits
    sources = {commit[:7]: subprocess.run(['git', 'show', '%s:networks.py' % commit], cwd=REPO, capture_output=True,
                                          text=True, check=True).stdout for commit in commits}
    sources['working tree'] = LOCAL_SOURCE
    unknown = [name for name, source in sources.items() if legacy.source_fingerprint(source) not in legacy.KNOWN_SOURCES]
    assert not unknown, unknown


def test_payload_in_real_networks_source_is_refused_or_rebuilt_clean(tmp_path, tf_session, monkeypatch):
    monkeypatch.delenv(unpickler.ALLOW_CODE_ENV, raising=False)
    monkeypatch.delenv(legacy.TRUSTED_SOURCES_ENV, raising=False)
    marker = tmp_path / 'payload-ran'
    source = payload_source(marker)
    states, _ = make_networks(seed=10, label_size=0, source=source)
    pkl = write_legacy_pickle(str(tmp_path / 'network-final.pkl'), states)
    with pytest.raises(unpickler.UnknownSourceError) as excinfo:
        misc.load_pkl(pkl)
    message = str(excinfo.value)
    assert pkl in message and 'not one this project knows' in message
    assert legacy.source_fingerprint(source) in message
    with open(pkl, 'rb') as f, pytest.raises(unpickler.UnknownSourceError):
        pickle.load(f)
    assert not marker.exists()
    # Vouched for by fingerprint, it is rebuilt with this project's code, and saved with this project's source.
    G, D, Gs = misc.load_pkl(pkl, trusted_sources=[legacy.source_fingerprint(source)])
    assert G._build_func is sys.modules['networks'].G_paper and D._build_func is sys.modules['networks'].D_paper
    resaved = str(tmp_path / 'resaved.pkl')
    misc.save_pkl((G, D, Gs), resaved)
    assert [state['build_module_src'] for state in read_states(resaved)] == [LOCAL_SOURCE] * 3
    assert not marker.exists()


@pytest.mark.slow
def test_laundering_chain_payload_never_runs_from_a_snapshot(tmp_path):
    marker = tmp_path / 'payload-ran'
    source = payload_source(marker)
    states, _ = make_networks(seed=11, label_size=0, easydict=True, source=source)
    legacy_dir = tmp_path / 'from-elsewhere'
    legacy_dir.mkdir()
    pkl = write_legacy_pickle(str(legacy_dir / 'network-snapshot-000004.pkl'), states)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    env.pop(unpickler.ALLOW_CODE_ENV, None)
    env.pop(legacy.TRUSTED_SOURCES_ENV, None)

    def resume(result_dir, run_env):
        cfg = tmp_path / ('%s.py' % result_dir.name)
        cfg.write_text(RESUME_CONFIG.format(data_dir=str(tmp_path), result_dir=str(result_dir), pkl=pkl))
        return subprocess.run([sys.executable, 'train.py', str(cfg)], cwd=REPO, capture_output=True, text=True,
                              timeout=900, env=run_env)

    # The user vouches for the file's source (the opt-in this design asks for) and trains from it.
    proc = resume(tmp_path / 'trusted', dict(env, **{legacy.TRUSTED_SOURCES_ENV: legacy.source_fingerprint(source)}))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    final = tmp_path / 'trusted' / os.listdir(tmp_path / 'trusted')[0] / 'network-final.pkl'
    # Later, in a notebook: plain pickle.load of that run's own network-final.pkl, with a networks.py
    # whose default differs (so the snapshot's networks cannot be rebuilt locally).
    checkout = tmp_path / 'checkout'
    checkout.mkdir()
    for name in os.listdir(REPO):
        if name.endswith('.py'):
            text = open(os.path.join(REPO, name), encoding='utf-8').read()
            if name == 'networks.py':
                text = text.replace('pixelnorm_epsilon=1e-8,', 'pixelnorm_epsilon=1e-6,')
                assert text != LOCAL_SOURCE
            (checkout / name).write_text(text, encoding='utf-8')
    notebook = 'import pickle\nG, D, Gs = pickle.load(open(%r, "rb"))\nprint(Gs.output_shape)\n' % str(final)
    proc = subprocess.run([sys.executable, '-c', notebook], cwd=str(checkout), capture_output=True, text=True,
                          timeout=300, env=env)
    assert not marker.exists(), 'the payload ran'
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert '[None, 3, 16, 16]' in proc.stdout
    assert [state['build_module_src'] for state in read_states(str(final))] == [LOCAL_SOURCE] * 3

    # Without the opt-in the run stops at loading, says why, and writes no network pickle at all.
    proc = resume(tmp_path / 'refused', env)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert 'Refused to execute the networks source embedded in the pickle "%s"' % pkl in output, output[-5000:]
    assert legacy.TRUSTED_SOURCES_ENV in output
    written = [name for _, _, names in os.walk(tmp_path / 'refused') for name in names if name.endswith('.pkl')]
    assert not written and not marker.exists()
