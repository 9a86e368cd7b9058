"""The units of work of a parallel run (conftest.work_unit): the modules that use one session fixture of conftest.py
are one unit, so that the fixture is prepared once per run."""
import ast
from pathlib import Path

from conftest import SHARED_FIXTURE_MODULES, TESTS, work_unit


def _session_fixtures() -> set:
    tree = ast.parse((TESTS / 'conftest.py').read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if isinstance(decorator, ast.Call) and any(
                        k.arg == 'scope' and getattr(k.value, 'value', None) == 'session' for k in decorator.keywords):
                    names.add(node.name)
    return names


def _parameters(path: Path) -> set:
    """Every parameter name of every function in the module (tests and fixtures)."""
    return {a.arg for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)
            for a in node.args.args}


def test_modules_sharing_a_session_fixture_are_one_unit():
    fixtures = _session_fixtures()
    assert {'finetune_datasets', 'pool_900', 'refs_data'} <= fixtures
    users = {name: sorted(p.name for p in TESTS.glob('test_*.py') if name in _parameters(p)) for name in fixtures}
    for name, modules in users.items():
        assert modules, f'session fixture {name} is used by no test module'
        units = {work_unit(f'tests/{m}::x') for m in modules}
        assert len(units) == 1, f'{name} is used by {modules}, which are in the units {units}: list them together ' \
                                f'in conftest.SHARED_FIXTURE_MODULES'
    listed = [m for modules in SHARED_FIXTURE_MODULES.values() for m in modules]
    assert len(listed) == len(set(listed)) and all((TESTS / m).is_file() for m in listed)
    assert work_unit('tests/test_masking.py::test_x[a::b]') == 'test_masking.py'
