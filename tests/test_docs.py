"""The documentation's shape: a short README whose command table names every console script, links that resolve
(files and heading anchors) in the README and docs/, and module docstrings of about 10 lines at most."""
import ast
import glob
import os
import re

import nnunetv2_desd

ROOT = os.path.dirname(os.path.dirname(nnunetv2_desd.__file__))
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')


def _read(path):
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        return f.read()


def _anchors(text):
    """GitHub's heading anchors of a Markdown text (code blocks skipped)."""
    anchors, in_code = set(), False
    for line in text.splitlines():
        if line.startswith('```'):
            in_code = not in_code
        elif not in_code and line.startswith('#'):
            title = line.lstrip('#').strip().lower()
            anchors.add(re.sub(r'[^\w\- ]', '', title).replace(' ', '-'))
    return anchors


def _markdown_files():
    return ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def test_the_readme_is_short_and_its_command_table_names_every_console_script():
    readme = _read('README.md')
    assert len(readme.splitlines()) <= 150
    pyproject = _read('pyproject.toml')
    section = pyproject.split('[project.scripts]', 1)[1].split('\n[', 1)[0]
    scripts = re.findall(r'^(\w+)\s*=', section, flags=re.M)
    table = readme.split('## Commands', 1)[1].split('\n## ', 1)[0]
    assert len(scripts) >= 16 and [s for s in scripts if f'`{s}`' not in table] == []
    assert 'bash scripts/demo.sh' in readme and 'bash scripts/test.sh' in readme


def test_every_relative_link_resolves():
    broken = []
    for path in _markdown_files():
        folder = os.path.dirname(os.path.join(ROOT, path))
        for target in LINK.findall(_read(path)):
            if re.match(r'[a-z]+://', target):
                continue
            file, _, anchor = target.partition('#')
            full = os.path.normpath(os.path.join(folder, file)) if file else os.path.join(ROOT, path)
            if not os.path.exists(full):
                broken.append(f'{path}: {target}')
            elif anchor and full.endswith('.md') and anchor not in _anchors(open(full, encoding='utf-8').read()):
                broken.append(f'{path}: {target} (no such heading)')
    assert broken == []


def test_the_docs_index_lists_every_page():
    index = _read('docs/README.md')
    pages = [os.path.basename(p) for p in _markdown_files() if p.startswith('docs') and not p.endswith('README.md')]
    assert [p for p in pages if p not in index] == []


def test_module_docstrings_stay_short():
    long = []
    for path in glob.glob(os.path.join(ROOT, 'nnunetv2_desd', '**', '*.py'), recursive=True):
        docstring = ast.get_docstring(ast.parse(open(path, encoding='utf-8').read())) or ''
        if len(docstring.splitlines()) > 12:
            long.append(f'{os.path.relpath(path, ROOT)}: {len(docstring.splitlines())} lines')
    assert long == []
