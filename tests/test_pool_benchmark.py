"""desd_pool_benchmark end to end: two tiny synthetic pools, the report's files and its ratios."""
import csv
import math

import pytest

from conftest import nnunet_env, run_command

pytestmark = pytest.mark.e2e

SIZES = (3, 6)
MEASURES = ('preparation_seconds_per_case', 'startup_seconds', 'desd_worker_peak_rss_mib', 'cads_worker_peak_rss_mib',
            'desd_seconds_per_step', 'cads_seconds_per_step')


def test_pool_benchmark_command_writes_a_column_per_size_and_the_ratios(tmp_path):
    env = nnunet_env(tmp_path / 'unused')  # each pool gets its own folders; these stay empty
    out = tmp_path / 'report'
    proc = run_command(['desd_pool_benchmark', '--sizes', *SIZES, '-o', out, '--shape', '24', '24', '24',
                        '--shape-jitter', '2', '--num-workers', '1', '-np', '1', '--warmup-steps', '1', '--steps', '1'],
                       env, timeout=300)
    for ending in ('md', 'csv', 'png', 'json'):
        assert (out / f'pool_benchmark.{ending}').stat().st_size > 0
    assert not (out / 'pools').exists()  # removed without --keep

    with open(out / 'pool_benchmark.csv') as f:
        rows = list(csv.DictReader(f))
    columns = [f'N={n}' for n in SIZES]
    assert [row['measure'] for row in rows] == list(MEASURES)
    values = {row['measure']: [float(row[c]) for c in columns] for row in rows}
    for measure, per_size in values.items():
        assert all(math.isfinite(v) and v > 0 for v in per_size), (measure, per_size)

    # the Markdown table: a column per size, and each ratio = value(largest N) / value(smallest N) from the CSV
    text = (out / 'pool_benchmark.md').read_text()
    assert proc.stdout.count('| measure | unit |') == 1 and text in proc.stdout
    header = next(line for line in text.splitlines() if line.startswith('| measure |'))
    cells = [c.strip() for c in header.strip('|').split('|')]
    assert cells[2:2 + len(SIZES)] == [f'N = {n}' for n in SIZES] and cells[2 + len(SIZES)] == 'ratio'
    table = text.split(header, 1)[1].split('\n\n', 1)[0].strip().splitlines()[1:]  # after the |---| line
    assert len(table) == len(MEASURES)
    for line, measure in zip(table, MEASURES):
        cells = [c.strip() for c in line.strip('|').split('|')]
        largest, smallest = values[measure][-1], values[measure][0]
        assert float(cells[2 + len(SIZES)]) == pytest.approx(largest / smallest, abs=6e-4), (measure, line)
        target = 1.15 if measure.startswith('preparation') else 1.1
        assert cells[3 + len(SIZES)] == f'<= {target}'
    assert 'desd_pool_benchmark --sizes 3 6' in text and 'torch' in text
