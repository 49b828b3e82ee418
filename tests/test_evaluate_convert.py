import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convert
import evaluate
from conftest import GOLDEN
from fixtures import official_tiny_checkpoint, write_cifar10, write_image_folder
from checkpoints import is_subnet, read_weights, save_weights
from arch import SpaceError
from space import AutoformerSpace, load_model, sub_state_dict
from utils import UserError

ROOT = Path(__file__).parent.parent
ARCH = {'embed_dim': 112, 'depth': 3, 'mlp_ratio_0': 3.5, 'num_head_0': 1, 'mlp_ratio_1': 4.0, 'num_head_1': 2,
        'mlp_ratio_2': 3.0, 'num_head_2': 1}


@pytest.fixture(scope='module')
def demo_supernet(tmp_path_factory, golden):
    """The golden official weights as a supernet file of this project (32 px, 10 classes)."""
    path = tmp_path_factory.mktemp('weights') / 'supernet-golden.pth'
    space_kwargs = golden[0]
    save_weights(path, AutoformerSpace.load_supernet_weights(space_kwargs, GOLDEN / 'small-official.pth'), space_kwargs)
    return path


def test_evaluate_digits_with_supernet_and_arch(demo_supernet, tmp_path):
    results = evaluate.main(['--weights', str(demo_supernet), '--arch', json.dumps(ARCH), '--output', str(tmp_path),
                             '--num-workers', '0'])
    assert json.loads((tmp_path / 'results.json').read_text()) == results
    assert results['images'] == 360 and 0 <= results['top1'] <= results['top5'] <= 100
    assert results['params'] == sum(p.numel() for p in load_model(demo_supernet, arch=ARCH)[0].parameters())


@pytest.mark.slow
def test_evaluate_compiled_gives_the_same_outputs_and_accuracy(demo_supernet, caplog):
    # All 360 test images in one batch: one graph to compile (a last, smaller batch would compile a second,
    # dynamic one), and the outputs below reuse it from inductor's cache (the same shapes): 50 s, not 120.
    args = ['--weights', str(demo_supernet), '--arch', json.dumps(ARCH), '--num-workers', '0', '--batch-size', '360']
    eager = evaluate.main(args)
    compiled = evaluate.main(args + ['--compile'])
    assert compiled['top1'] == eager['top1'] and compiled['top5'] == eager['top5']
    model = load_model(demo_supernet, arch=ARCH)[0].eval()
    images = torch.randn(360, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model)(images), model(images), rtol=1e-4, atol=1e-5)
    bf16 = evaluate.main(args + ['--precision', 'bf16-mixed'])  # CPU autocast, with a note
    assert 'bf16-mixed on the CPU: evaluating under CPU autocast' in caplog.text
    assert abs(bf16['top1'] - eager['top1']) <= 2 * 100 / 360  # within two images of fp32


def test_evaluate_arch_from_file_on_image_folder(demo_supernet, tmp_path):
    write_image_folder(tmp_path / 'images' / 'val', [str(i) for i in range(10)], per_class=2, size=40)
    arch_file = tmp_path / 'arch.json'
    arch_file.write_text(json.dumps(ARCH))
    results = evaluate.main(['--weights', str(demo_supernet), '--arch', str(arch_file), '--dataset', 'folder',
                             '--datapath', str(tmp_path / 'images'), '--num-workers', '0'])
    assert results['images'] == 20


def test_evaluate_subnet_file_on_cifar10_folder(demo_supernet, tmp_path):
    supernet, meta = read_weights(demo_supernet)
    subnet = tmp_path / 'subnet.pth'
    save_weights(subnet, sub_state_dict(supernet, ARCH), meta['space'], arch=ARCH)
    write_cifar10(tmp_path / 'cifar', n_train_per_batch=2, n_test=30)
    results = evaluate.main(['--weights', str(subnet), '--dataset', 'cifar10', '--datapath', str(tmp_path / 'cifar'),
                             '--num-workers', '0'])
    assert results['images'] == 30 and results['arch'] == ARCH
    with pytest.raises(UserError, match='holds the weights of one subnet'):
        evaluate.main(['--weights', str(subnet), '--arch', json.dumps(dict(ARCH, embed_dim=96))])


@pytest.mark.parametrize('datapath, message', [('missing', 'does not exist'), ('empty', 'empty|no class')])
def test_evaluate_refuses_missing_or_empty_dataset_folder(demo_supernet, tmp_path, datapath, message):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match=message):
        evaluate.main(['--weights', str(demo_supernet), '--arch', json.dumps(ARCH), '--dataset', 'folder',
                       '--datapath', str(tmp_path / datapath)])


def test_evaluate_cli_prints_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, 'evaluate.py', '--weights', str(tmp_path / 'nope.pth')], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith('error: weights file')
    assert 'Traceback' not in result.stderr


def test_convert_wide_official_tiny_to_supernet_and_subnet(tmp_path):
    official = official_tiny_checkpoint(torch.Generator().manual_seed(0))
    torch.save(official, tmp_path / 'official.pth')
    convert.main(['--name', 'tiny', '--input', str(tmp_path / 'official.pth'), '--output', str(tmp_path / 's.pth'),
                  '--subnet-output', str(tmp_path / 'sub.pth')])
    supernet, meta = read_weights(tmp_path / 's.pth')
    assert meta['space']['search_embed_dim'] == [192, 216, 240]
    assert torch.equal(supernet['patch_embed.weight'], official['model']['patch_embed_super.proj.weight'][:240])
    assert torch.equal(supernet['blocks.blocks.13.attn.qkv.bias'], official['model']['blocks.13.attn.qkv.bias'])
    # The subnet file and slicing the supernet file give the same model.
    model = AutoformerSpace.load_searched_model('autoformer-tiny', weights=tmp_path / 'sub.pth').eval()
    from_supernet = AutoformerSpace.load_searched_model('autoformer-tiny', weights=tmp_path / 's.pth').eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), from_supernet(x))
    # Layer 10 of AutoFormer-T has 4 heads, the others 3: the official qkv bias is a prefix, not three.
    bias = model.state_dict()['blocks.0.attn.qkv.bias']
    assert torch.equal(bias, official['model']['blocks.0.attn.qkv.bias'][:3 * 3 * 64])
    # A second conversion does not overwrite what the first wrote, unless told to.
    written = (tmp_path / 's.pth').read_bytes()
    args = ['--name', 'tiny', '--input', str(tmp_path / 'official.pth'), '--output', str(tmp_path / 's.pth')]
    with pytest.raises(UserError, match=r's\.pth already exists: pass --force'):
        convert.main(args)
    assert (tmp_path / 's.pth').read_bytes() == written
    convert.main(args + ['--force'])


def test_convert_refuses_checkpoint_of_another_space(tmp_path):
    result = subprocess.run([sys.executable, 'convert.py', '--name', 'tiny', '--input',
                             str(GOLDEN / 'small-official.pth'), '--output', str(tmp_path / 'out.pth')],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'not a tiny supernet' in result.stderr
    assert not (tmp_path / 'out.pth').exists()


def test_an_official_supernet_file_is_read_as_a_supernet_not_a_subnet(golden):
    """Official checkpoints keep blocks.0.attn.qkv at the top level, like a subnet: their layout decides. Given
    to evaluate.py with the wrong preset, the message is about fitting the supernet, not a missing tensor."""
    official, _ = read_weights(GOLDEN / 'small-official.pth')
    space_kwargs, _, cases = golden
    assert not is_subnet(official)
    assert is_subnet(AutoformerSpace(**space_kwargs).freeze(cases[0]['arch']).state_dict())
    with pytest.raises(UserError, match='needed by the space is missing.*not a supernet of this space'):
        load_model(GOLDEN / 'small-official.pth', 'tiny')


OFFICIAL_SPACES = Path(__file__).parent / 'official-spaces'


def test_official_space_and_retrain_files_load_with_exactly_their_choices():
    from cli import load_arch_arg, read_space_file
    space_kwargs = read_space_file(str(OFFICIAL_SPACES / 'supernet-T.yaml'))
    space = AutoformerSpace(**space_kwargs)
    choices = {label: list(mutable.values) for label, mutable in space.simplify().items()}
    assert choices['embed_dim'] == [192, 216, 240] and choices['depth'] == [12, 13, 14]
    assert all(choices[f'mlp_ratio_{i}'] == [3.5, 4.0] and choices[f'num_head_{i}'] == [3, 4] for i in range(14))
    assert space_kwargs['img_size'] == 224 and space_kwargs['patch_size'] == 16
    base = read_space_file(str(OFFICIAL_SPACES / 'supernet-B.yaml'))
    assert list(base['search_num_heads']) == [9, 10]  # the official file's, not the base preset's (8, 9, 10)
    released = load_arch_arg(str(OFFICIAL_SPACES / 'AutoFormer-T.yaml'))
    assert released == AutoformerSpace.searched_arch('tiny') == load_arch_arg('autoformer-tiny')
    with pytest.raises(SpaceError, match="mlp_ratio_2.*3.0"):  # the released T is outside supernet-T.yaml
        space.freeze(released)


@pytest.mark.parametrize('content, message', [
    ('SEARCH_SPACE: {EMBED_DIM: [96]}', 'no SEARCH_SPACE: section with EMBED_DIM, MLP_RATIO, NUM_HEADS, DEPTH'),
    ('SEARCH_SPACE: {EMBED_DIM: [96, x], MLP_RATIO: [3], NUM_HEADS: [1], DEPTH: [2]}',
     'EMBED_DIM must be a list of positive numbers'),
    ('SUPERNET: {EMBED_DIM: 64}\nSEARCH_SPACE: {EMBED_DIM: [96], MLP_RATIO: [3], NUM_HEADS: [1], DEPTH: [2]}',
     'SUPERNET: EMBED_DIM 64 is smaller than the largest choice 96'),
    ('SEARCH_SPACE: {EMBED_DIM: [96.5], MLP_RATIO: [3], NUM_HEADS: [1], DEPTH: [2]}',
     'search_embed_dim must be a non-empty list of positive integers'),
    ('[1, 2', 'is not YAML'),
    ('- 1', 'holds a list, not the sections of an official file'),
])
def test_a_damaged_space_file_is_refused_in_one_line(tmp_path, content, message):
    from cli import read_space_file
    path = tmp_path / 'space.yaml'
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        read_space_file(str(path), 'demo')


def test_a_space_file_works_for_conversion_evaluation_and_search(tmp_path):
    """A demo supernet converted under an official-format file of narrower choices: the file's space is
    stored with the weights and read back by evaluate.py without the YAML, and search.py searches it."""
    import search
    from arch import complete_space_kwargs
    from space import build_supernet
    demo = complete_space_kwargs(**AutoformerSpace.preset('demo'))
    save_weights(tmp_path / 'demo.pth', build_supernet(demo).state_dict(), demo)
    yaml_file = tmp_path / 'supernet-demo.yaml'
    yaml_file.write_text('SUPERNET: {MLP_RATIO: 4.0, NUM_HEADS: 2, EMBED_DIM: 128, DEPTH: 4}\n'
                         'SEARCH_SPACE: {MLP_RATIO: [3.5, 4], NUM_HEADS: [2], DEPTH: [3, 4], EMBED_DIM: [112, 128]}\n')
    weights = tmp_path / 'supernet.pth'
    convert.main(['--name', 'demo', '--space-file', str(yaml_file), '--input', str(tmp_path / 'demo.pth'),
                  '--output', str(weights)])
    stored = read_weights(weights)[1]['space']
    assert stored['search_mlp_ratio'] == [3.5, 4.0] and stored['search_num_heads'] == [2]
    assert stored['search_embed_dim'] == [112, 128] and stored['img_size'] == 32
    arch = {'embed_dim': 112, 'depth': 3, **{f'mlp_ratio_{i}': 3.5 for i in range(4)},
            **{f'num_head_{i}': 2 for i in range(4)}}
    results = evaluate.main(['--weights', str(weights), '--arch', json.dumps(arch), '--num-workers', '0'])
    assert results['images'] == 360
    with pytest.raises(SpaceError, match=r"num_head_0=1 is outside the space \(allowed values: \[2\]\)"):
        evaluate.main(['--weights', str(weights), '--arch', json.dumps({**arch, 'num_head_0': 1})])
    best = search.main(['--weights', str(weights), '--space-file', str(yaml_file), '--name', 'demo', '--strategy',
                        'random', '--trials', '2', '--engine', 'sequential', '--num-workers', '0',
                        '--output', str(tmp_path / 'search')])
    assert best['arch']['embed_dim'] in (112, 128) and best['arch']['num_head_0'] == 2
    # --space-file over a file storing another space: the trials read a copy fitted to the file's space
    narrower = tmp_path / 'narrower.yaml'
    narrower.write_text('SEARCH_SPACE: {MLP_RATIO: [3.5], NUM_HEADS: [1, 2], DEPTH: [2], EMBED_DIM: [104, 120]}\n')
    best = search.main(['--weights', str(tmp_path / 'demo.pth'), '--space-file', str(narrower), '--name', 'demo',
                        '--strategy', 'random', '--trials', '3', '--engine', 'sequential', '--num-workers', '0',
                        '--output', str(tmp_path / 'search-narrower')])
    records = json.loads((tmp_path / 'search-narrower' / 'candidates.json').read_text())
    assert len(records) == 3 and {r['arch']['embed_dim'] for r in records} <= {104, 120}
    assert best['arch']['depth'] == 2
