import json
import os
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from checkpoints import save_weights
from conftest import GOLDEN
from fixtures import max_relative_error
from arch import (SpaceError, check_arch, complete_space_kwargs, count_flops, count_params, layer_dims, make_arch,
                  extreme_arch, sample_arch)
from space import (AutoformerSpace, build_supernet, init_weights, load_supernet_file, set_active_arch,
                   sub_state_dict)
from utils import UserError

pytestmark = pytest.mark.fast  # make test-fast


@pytest.mark.parametrize('checkpoint', ['small-official.pth', 'small-nnihub.pth'])
def test_golden_logits_and_params_for_every_case(golden, checkpoint):
    space_kwargs, inputs, cases = golden
    supernet = AutoformerSpace.load_supernet_weights(space_kwargs, GOLDEN / checkpoint)
    space = AutoformerSpace(**space_kwargs)
    for case in cases:
        subnet = space.freeze(case['arch']).eval()
        subnet.load_state_dict(sub_state_dict(supernet, case['arch']))
        with torch.no_grad():
            logits = subnet(inputs)
        assert max_relative_error(logits, torch.tensor(case['logits'])) < 1e-4, case['arch']
        assert count_params(case['arch'], **space_kwargs) == case['params']
        assert sum(p.numel() for p in subnet.parameters()) == case['params']


def test_wider_checkpoint_is_sliced_to_a_narrower_space(golden):
    space_kwargs, inputs, cases = golden
    narrow = {**space_kwargs, 'search_embed_dim': [96, 112]}
    supernet = AutoformerSpace.load_supernet_weights(narrow, GOLDEN / 'small-official.pth')
    assert supernet['patch_embed.weight'].shape[0] == 112
    space = AutoformerSpace(**narrow)
    checked = 0
    for case in cases:
        if case['arch']['embed_dim'] <= 112:
            subnet = space.freeze(case['arch']).eval()
            subnet.load_state_dict(sub_state_dict(supernet, case['arch']))
            assert max_relative_error(subnet(inputs).detach(), torch.tensor(case['logits'])) < 1e-4
            checked += 1
    assert checked > 0


@pytest.mark.parametrize('name, params', [('tiny', 5_867_944), ('small', 22_891_432), ('base', 53_691_688)])
def test_searched_models_have_the_published_parameter_counts(name, params):
    model = AutoformerSpace.load_searched_model(f'autoformer-{name}')
    assert sum(p.numel() for p in model.parameters()) == params
    assert count_params(AutoformerSpace.searched_arch(name), **AutoformerSpace.preset(name)) == params


def test_oneshot_supernet_runs_the_same_subnet_as_freeze(golden):
    space_kwargs, inputs, _ = golden
    supernet = build_supernet(space_kwargs).eval()
    supernet.load_state_dict(AutoformerSpace.load_supernet_weights(space_kwargs, GOLDEN / 'small-official.pth'))
    space = AutoformerSpace(**space_kwargs)
    rng = random.Random(0)
    for _ in range(6):
        arch = sample_arch(space.space_kwargs, rng)
        set_active_arch(supernet, arch)
        subnet = space.freeze(arch).eval()
        subnet.load_state_dict(sub_state_dict(supernet.state_dict(), arch))
        with torch.no_grad():
            assert max_relative_error(supernet(inputs), subnet(inputs)) < 1e-5
            # NNI's own freeze of the mixed operations gives the same weights as sub_state_dict.
            assert max_relative_error(supernet.freeze(arch)(inputs), subnet(inputs)) < 1e-5


def test_oneshot_supernet_trains_through_the_mixed_qkv(golden):
    space_kwargs, inputs, _ = golden
    supernet = build_supernet(space_kwargs)
    arch = sample_arch(supernet.space_kwargs, random.Random(1))
    arch['num_head_0'] = 1
    set_active_arch(supernet, arch)
    supernet(inputs).sum().backward()
    grad = supernet.blocks.blocks[0].attn.qkv.bias.grad
    # One head uses the first 3 x 64 bias entries (q, k, v in contiguous thirds); the rest stay untouched.
    assert grad[:192].abs().sum() > 0 and grad[192:].abs().sum() == 0


def test_count_flops_matches_torch_flop_counter(golden):
    space_kwargs, inputs, _ = golden
    space = AutoformerSpace(**space_kwargs)
    rng = random.Random(2)
    for _ in range(3):
        arch = sample_arch(space.space_kwargs, rng)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            space.freeze(arch)(inputs[:1])
        side = inputs.shape[-1] // space_kwargs['patch_size']
        tokens = side * side + 1
        buckets = 2 + 2 * side + (-(66 + 2 * side) % 8)  # padded so that head dim + buckets is a multiple of 8
        bucket_columns = sum(2 * tokens * tokens * (q // 64) * buckets for _, q, _ in layer_dims(arch))
        assert counter.get_total_flops() == 2 * (count_flops(arch, **space_kwargs) + bucket_columns)


def test_a_conv_stem_is_counted_sliced_and_stored_exactly(tmp_path):
    """With a convolutional stem: the parameter and FLOP counts are the module's, a subnet sliced from a
    trained supernet (its BatchNorm statistics included) gives the supernet's logits, and its weights file
    (with BatchNorm's int64 batch counter) reads back as it was written."""
    space_kwargs = complete_space_kwargs(**{**AutoformerSpace.preset('demo'), 'img_size': 64, 'conv_stem': 16})
    supernet = build_supernet(space_kwargs)
    set_active_arch(supernet, extreme_arch(space_kwargs, max))
    supernet(torch.randn(4, 3, 64, 64))  # moves the BatchNorm statistics off their initial values
    supernet.eval()
    inputs = torch.randn(2, 3, 64, 64)
    for seed in range(3):
        arch = sample_arch(space_kwargs, random.Random(seed))
        set_active_arch(supernet, arch)
        subnet = AutoformerSpace(**space_kwargs).freeze(arch).eval()
        subnet.load_state_dict(sub_state_dict(supernet.state_dict(), arch))
        assert count_params(arch, **space_kwargs) == sum(p.numel() for p in subnet.parameters())
        with torch.no_grad():
            assert max_relative_error(supernet(inputs), subnet(inputs)) < 1e-5
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            subnet(inputs[:1])
        side, tokens = 8, 65
        buckets = 2 + 2 * side + (-(66 + 2 * side) % 8)
        bucket_columns = sum(2 * tokens * tokens * (q // 64) * buckets for _, q, _ in layer_dims(arch))
        assert counter.get_total_flops() == 2 * (count_flops(arch, **space_kwargs) + bucket_columns)
    save_weights(tmp_path / 'stem.pth', supernet.state_dict(), space_kwargs)
    state_dict, stored, _ = load_supernet_file(tmp_path / 'stem.pth')
    assert stored['conv_stem'] == 16 and all(torch.equal(state_dict[k], v) for k, v in supernet.state_dict().items())
    with pytest.raises(SpaceError, match='patch_size 6 is not a multiple of 4'):
        complete_space_kwargs(**{**space_kwargs, 'patch_size': 6, 'img_size': 48})


def test_arch_outside_the_space_is_refused_with_label_and_values(golden):
    space_kwargs, _, cases = golden
    space = AutoformerSpace(**space_kwargs)
    arch = dict(cases[0]['arch'], embed_dim=100)
    with pytest.raises(SpaceError, match=r"embed_dim=100 .*\[96, 112, 128\]"):
        space.freeze(arch)
    arch = dict(cases[0]['arch'])
    del arch['mlp_ratio_1']
    with pytest.raises(SpaceError, match="missing the label 'mlp_ratio_1'"):
        count_params(arch, **space_kwargs)


def test_labels_past_depth_are_optional(golden):
    space_kwargs, inputs, _ = golden
    arch = {'embed_dim': 96, 'depth': 2, 'mlp_ratio_0': 3.0, 'num_head_0': 1, 'mlp_ratio_1': 4.0, 'num_head_1': 2}
    assert len(AutoformerSpace(**space_kwargs).freeze(arch).blocks) == 2


def test_checkpoint_of_another_preset_names_the_tensor_and_shapes():
    with pytest.raises(UserError, match=r'tensor blocks.blocks.4.* needed by tiny is missing.*not a tiny supernet'):
        AutoformerSpace.load_supernet_weights('tiny', GOLDEN / 'small-official.pth')


def test_checkpoint_with_other_head_count_is_refused(golden):
    space_kwargs, _, _ = golden
    with pytest.raises(UserError, match=r'blocks.blocks.0.attn.qkv.weight has shape \(384, 128\) but'):
        AutoformerSpace.load_supernet_weights({**space_kwargs, 'search_num_heads': [1]}, GOLDEN / 'small-official.pth')


def test_bad_checkpoint_files_give_one_clear_error(tmp_path, golden):
    space_kwargs, _, _ = golden
    with pytest.raises(UserError, match='does not exist'):
        AutoformerSpace.load_supernet_weights(space_kwargs, tmp_path / 'missing.pth')
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes((GOLDEN / 'small-official.pth').read_bytes()[:100_000])
    with pytest.raises(UserError, match='corrupt or truncated'):
        AutoformerSpace.load_supernet_weights(space_kwargs, truncated)
    empty = tmp_path / 'empty.pth'
    empty.write_bytes(b'')
    with pytest.raises(UserError, match='empty'):
        AutoformerSpace.load_supernet_weights(space_kwargs, empty)
    garbage = tmp_path / 'garbage.pth'  # not an archive: read as a legacy pickle, whose first byte is no opcode
    garbage.write_bytes(b'garbage\n')
    with pytest.raises(UserError, match='corrupt or truncated') as refused:
        AutoformerSpace.load_supernet_weights(space_kwargs, garbage)
    assert '\n' not in str(refused.value) and 'weights_only' not in str(refused.value)  # one line, no bad advice


class Payload:
    def __reduce__(self):
        return (print, ('pickle code ran',))


class SystemPayload:
    def __reduce__(self):
        return (os.system, ('echo pickle code ran',))


class EvalPayload:
    def __reduce__(self):
        return (eval, ('print("pickle code ran")',))


@pytest.mark.parametrize('content', [{'model': Payload()}, {'state_dict': SystemPayload()},
                                     {'state_dict': EvalPayload()}, SystemPayload()])
def test_checkpoint_needing_pickle_code_is_refused_without_unsafe_advice(tmp_path, golden, capfd, content):
    """The message says the file needs to run code and is refused; it never advises
    weights_only=False (or allow-listing the code)."""
    space_kwargs, _, _ = golden
    path = tmp_path / 'evil.pth'
    torch.save(content, path)
    with pytest.raises(UserError, match=r'needs to run code to load \(it calls [\w.]+\), which is refused') as err:
        AutoformerSpace.load_supernet_weights(space_kwargs, path)
    message = str(err.value)
    assert 'weights_only' not in message and 'safe_globals' not in message and '\n' not in message
    assert 'pickle code ran' not in capfd.readouterr().out


def test_load_strategy_checkpoint_as_the_seed_uses_it(tmp_path, golden):
    """``load_strategy_checkpoint(name, weights=path)``: ``.model`` (the trained supernet, any arch activated)
    and ``.sub_state_dict(arch)`` (a subnet's weights) both give the official logits."""
    space_kwargs, inputs, cases = golden  # the demo preset's search space at 32 px, patch 4
    official = AutoformerSpace.load_supernet_weights(space_kwargs, GOLDEN / 'small-official.pth')
    save_weights(tmp_path / 'supernet.pth', official, space_kwargs)
    checkpoint = AutoformerSpace.load_strategy_checkpoint('random-one-shot-demo', weights=tmp_path / 'supernet.pth')
    for case in cases[:4]:
        subnet = AutoformerSpace(**space_kwargs).freeze(case['arch']).eval()
        subnet.load_state_dict(checkpoint.sub_state_dict(case['arch']))
        set_active_arch(checkpoint.model.eval(), case['arch'])
        with torch.no_grad():
            for logits in (subnet(inputs), checkpoint.model(inputs)):
                assert max_relative_error(logits, torch.tensor(case['logits'])) < 1e-4


def test_nni_download_offline_names_file_and_place(monkeypatch):
    import nni.nas.hub.pytorch.utils.pretrained as pretrained
    import space

    def offline(*args, **kwargs):
        raise OSError('Network is unreachable')
    monkeypatch.setattr(pretrained, 'load_pretrained_weight', offline)
    with pytest.raises(UserError, match=r'autoformer-tiny-subnet-12ed42ff\.pth.*put it at .*nashub'):
        space.AutoformerSpace.load_searched_model('autoformer-tiny', weights='nni')


def test_labels_past_the_depth_are_ignored_and_unknown_labels_refused():
    """design.md: labels of layers past depth may be present; a label that is no label (a typo) is refused,
    as is a non-integer embed_dim / depth / heads."""
    config = complete_space_kwargs(**AutoformerSpace.preset('demo'))
    arch = make_arch(96, [3.0, 3.0], [1, 1])
    check_arch({**arch, 'mlp_ratio_3': 4.0, 'num_head_9': 7}, config)
    for bad, message in (({'embed_dims': 112}, "label 'embed_dims' is not a label"),
                         ({'depth': 2.0}, 'depth=2.0 must be an integer'),
                         ({'num_head_1': True}, 'num_head_1=True must be an integer'),
                         ({'mlp_ratio_0': '3.0'}, "mlp_ratio_0='3.0' must be a number")):
        with pytest.raises(SpaceError, match=message):
            check_arch({**arch, **bad}, config)


STANDALONE = '''
import json, sys, torch
from arch import count_params
from space import AutoformerSpace, build_supernet, set_active_arch, sub_state_dict
cases = json.load(open('small-cases.json'))
space_kwargs = json.load(open('space_kwargs.json'))
inputs = torch.load('small-input.pt', weights_only=True)['input']
supernet = torch.load('supernet.pt', weights_only=True)
space = AutoformerSpace(**space_kwargs)
worst = 0.0
for case in cases['cases']:
    subnet = space.freeze(case['arch']).eval()
    subnet.load_state_dict(sub_state_dict(supernet, case['arch']))
    with torch.no_grad():
        logits, golden = subnet(inputs), torch.tensor(case['logits'])
    worst = max(worst, ((logits - golden).abs().max() / golden.abs().max()).item())
    assert count_params(case['arch'], **space_kwargs) == case['params']
trained = build_supernet(space_kwargs)
trained.load_state_dict(supernet)
set_active_arch(trained, cases['cases'][0]['arch'])
reloaded = AutoformerSpace.load_supernet_weights(space_kwargs, 'supernet.pt')
assert reloaded.keys() == supernet.keys() and all(reloaded[k].equal(supernet[k]) for k in supernet)
print(json.dumps({'cases': len(cases['cases']), 'worst': worst, 'modules': sorted(
    m for m in sys.modules if m in ('cli', 'data', 'engine', 'lightning', 'strategy', 'candidates'))}))
'''


def test_space_py_copied_with_the_files_it_names_gives_the_golden_logits_and_loads_weights(tmp_path, golden):
    """space.py with layers.py, arch.py, checkpoints.py and utils.py, and nothing else of this project (with only
    the pinned packages), builds the space, freezes subnets, slices a converted supernet to the official logits
    and loads a weights file."""
    import shutil
    import subprocess
    import sys
    space_kwargs, _, _ = golden
    for name in ('space.py', 'layers.py', 'arch.py', 'checkpoints.py', 'utils.py'):
        shutil.copy(GOLDEN.parent.parent / name, tmp_path)
    for name in ('small-cases.json', 'small-input.pt'):
        shutil.copy(GOLDEN / name, tmp_path)
    (tmp_path / 'space_kwargs.json').write_text(json.dumps(space_kwargs))
    supernet = AutoformerSpace.load_supernet_weights(space_kwargs, GOLDEN / 'small-official.pth')
    torch.save(supernet, tmp_path / 'supernet.pt')
    (tmp_path / 'standalone.py').write_text(STANDALONE)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    result = subprocess.run([sys.executable, 'standalone.py'], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {'cases': len(golden[2]), 'worst': report['worst'], 'modules': []} and report['worst'] < 1e-4
    assert 'Traceback' not in result.stderr and 'is found to be not a nn.Module' not in result.stderr


@pytest.mark.parametrize('make', ['supernet', 'subnet'])
def test_new_weights_follow_the_official_init(make):
    """Linear weights: truncated normal of std 0.02 and zero biases; LayerNorms 1 / 0 (official ``_init_weights``)."""
    space_kwargs = complete_space_kwargs(**AutoformerSpace.preset('tiny'))
    model = build_supernet(space_kwargs) if make == 'supernet' else \
        init_weights(AutoformerSpace(**space_kwargs).freeze(AutoformerSpace.searched_arch('tiny')))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(linears) > 40 and len(norms) > 20
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    # ~4.6M samples: the std's sampling error is ~1e-5; a truncation at +-2 (100 std) changes nothing
    assert abs(weights.std().item() - 0.02) < 2e-4 and abs(weights.mean().item()) < 1e-4
    assert weights.abs().max() < 0.2
    assert all(not m.bias.any() for m in linears if m.bias is not None)
    assert all(m.weight.eq(1).all() and not m.bias.any() for m in norms)
    tables = [p for n, p in model.named_parameters()
              if 'embeddings_table' in n or n.endswith(('cls_token', 'pos_embed'))]
    # A sample std of n normal draws has a standard error of std / sqrt(2(n - 1)); 6 of them for each of the ~60
    # tensors fail a correct init with a probability of about 1e-7 (the subnet's class token, 192 entries: +-0.006)
    assert tables and all(abs(p.std().item() - 0.02) < 6 * 0.02 / (2 * (p.numel() - 1)) ** 0.5 for p in tables)


def test_defaults_are_the_constructors_own():
    """space.DEFAULTS (what complete_space_kwargs fills in) holds exactly AutoformerSpace.__init__'s defaults
    (read from the source: NNI's wrapper hides the signature)."""
    import ast
    import inspect

    import space

    tree = ast.parse(inspect.getsource(space.AutoformerSpace))
    init = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == '__init__')
    names = [arg.arg for arg in init.args.args[1:]]
    defaults = dict(zip(names, (ast.literal_eval(value) for value in init.args.defaults)))
    assert defaults == space.DEFAULTS
