"""The package's shape: imports run one way down the pipeline, no cycles, thin __init__ files, one-line module
docstrings, and every console script answers --help."""
import ast
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import nnunetv2_desd

PACKAGE = os.path.dirname(nnunetv2_desd.__file__)
ROOT = os.path.dirname(PACKAGE)
# the pipeline, first to last: a module imports from its own layer or earlier ones only
LAYERS = ['common', 'data', 'architectures',
          'pretraining.views', 'pretraining.heads', 'pretraining.network', 'pretraining.distributed',
          'pretraining.losses', 'pretraining.gradient_matching', 'pretraining.methods', 'pretraining.config',
          'pretraining.engine', 'pretraining.run',
          'trainers', 'planning', 'evaluation', 'benchmarks', 'cli']
NOT_IN_THE_PIPELINE = {'nnunetv2_desd', 'nnunetv2_desd.pretraining'}


def package_modules():
    """{dotted module name: file} of the package."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
                modules[dotted[:-len('.__init__')] if dotted.endswith('.__init__') else dotted] = path
    return modules


def import_graph(modules):
    """{module: set of package modules it imports} (every import statement, also those inside functions)."""
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(open(path).read())
        package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    parts = package.split('.')[:len(package.split('.')) - node.level + 1]
                    base = '.'.join(parts + ([node.module] if node.module else []))
                for alias in node.names:  # `from package import module` imports the module
                    targets.add(f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base)
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 'done'
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(module):
    """Index in LAYERS of the longest layer the module belongs to; None outside the pipeline."""
    if module in NOT_IN_THE_PIPELINE:
        return None
    relative = module[len('nnunetv2_desd.'):]
    matches = [i for i, layer in enumerate(LAYERS) if relative == layer or relative.startswith(layer + '.')]
    assert matches, f'{module} belongs to no layer: add its folder to LAYERS'
    return max(matches, key=lambda i: len(LAYERS[i]))


def upward_imports(graph):
    return sorted((m, t) for m, targets in graph.items() for t in targets
                  if layer_of(m) is not None and layer_of(t) is not None and layer_of(t) > layer_of(m))


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = {'nnunetv2_desd.data.raw': {'nnunetv2_desd.data.planning'},
             'nnunetv2_desd.data.planning': {'nnunetv2_desd.data.raw', 'nnunetv2_desd.cli.pretrain'},
             'nnunetv2_desd.cli.pretrain': set()}
    assert find_cycle(graph) == ['nnunetv2_desd.data.planning', 'nnunetv2_desd.data.raw',
                                 'nnunetv2_desd.data.planning']
    assert upward_imports(graph) == [('nnunetv2_desd.data.planning', 'nnunetv2_desd.cli.pretrain')]
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_imports_run_down_the_pipeline_without_cycles():
    modules = package_modules()
    graph = import_graph(modules)
    assert graph['nnunetv2_desd.pretraining.run'] >= {'nnunetv2_desd.pretraining.engine.loop'}  # the parser works
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))
    assert upward_imports(graph) == []


def test_the_engine_names_no_method():
    source = open(os.path.join(PACKAGE, 'pretraining', 'engine', 'loop.py')).read()
    for name in ('refs', 'cads', 'ReFs', 'CADS', 'reference_loss', 'drr_projection'):
        assert name not in source, name
    # of the methods, the engine imports the hooks' contract and the registry only
    imported = import_graph(package_modules())['nnunetv2_desd.pretraining.engine.loop']
    assert {m for m in imported if '.methods.' in m} <= {'nnunetv2_desd.pretraining.methods.base',
                                                         'nnunetv2_desd.pretraining.methods.registry'}


def test_init_files_hand_names_on_and_modules_say_what_they_own():
    for module, path in package_modules().items():
        tree = ast.parse(open(path).read())
        docstring = ast.get_docstring(tree)
        assert docstring and docstring.splitlines()[0].strip(), f'{path}: no opening docstring'
        if path.endswith('__init__.py'):
            body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body
            assert all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in body), f'{path} defines something'


def _console_scripts():
    """{name: entry point} of pyproject's [project.scripts] (read by hand: tomllib needs Python 3.11)."""
    text = open(os.path.join(ROOT, 'pyproject.toml')).read()
    section = text.split('[project.scripts]', 1)[1].split('\n[', 1)[0]
    return dict(re.findall(r'^(\w+)\s*=\s*"([^"]+)"', section, flags=re.M))


def test_every_console_script_answers_help():
    scripts = _console_scripts()
    assert {'desd_pretrain', 'desd_benchmark', 'desd_demo', 'desd_probe'} <= set(scripts) and len(scripts) == 16
    bin_dir = os.path.dirname(sys.executable)

    def help_of(name):
        return subprocess.run([os.path.join(bin_dir, name), '--help'], capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(scripts, pool.map(help_of, scripts)))
    for name, result in results.items():
        if name == 'desd_trainer_path':  # prints the variable's line, takes no options
            assert result.returncode == 0 and 'nnUNet_extTrainer' in result.stdout, result.stderr[-500:]
            continue
        assert result.returncode == 0, (name, result.stderr[-800:])
        assert 'usage:' in result.stdout.lower(), (name, result.stdout[:300])

