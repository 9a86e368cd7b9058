"""--deterministic: two runs with the same seed and two loader workers give the same losses and the same export."""
import pytest
import torch

from conftest import TINY, nnunet_env, run_command, with_results
from nnunetv2_desd.data.sources import write_synthetic_dataset

pytestmark = pytest.mark.e2e

RUN = 'desd__nnUNetPlans__3d_fullres'
WORKERS = [a if a != '0' or TINY[i - 1] != '--num-workers' else '2' for i, a in enumerate(TINY)]


def _run(env: dict, results, seed: int):
    """A --deterministic run on the prepared dataset, written into its own nnUNet_results."""
    run_command(['desd_pretrain', '-d', '900', '--epochs', '3', '--iters-per-epoch', '3', '--seed', seed,
                 '--deterministic', *WORKERS], with_results(env, results))
    out = results / 'Dataset900_Synthetic' / RUN
    final = torch.load(out / 'checkpoint_final.pth', map_location='cpu', weights_only=True)
    export = torch.load(out / 'pretrained_export.pth', map_location='cpu', weights_only=True)
    return final['progress']['loss']['value'], export


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    assert WORKERS[WORKERS.index('--num-workers') + 1] == '2'
    env = nnunet_env(tmp_path)  # prepared once; each run has its own nnUNet_results
    write_synthetic_dataset(env['nnUNet_raw'], 900, n_cases=4, shape=(32, 32, 32))
    run_command(['desd_pretrain', '-d', '900', '--preprocess-only', *WORKERS], env)
    losses_a, export_a = _run(env, tmp_path / 'a', 7)
    losses_b, export_b = _run(env, tmp_path / 'b', 7)
    assert len(losses_a) == 3
    assert losses_a == losses_b  # exactly, not to 4 digits
    assert export_a['desd_export']['content_sha256'] == export_b['desd_export']['content_sha256']
    for key, value in export_a['network_weights'].items():
        assert torch.equal(value, export_b['network_weights'][key]), key
    # the comparison can fail: another seed gives another run
    losses_c, export_c = _run(env, tmp_path / 'c', 8)
    assert losses_c != losses_a
    assert export_c['desd_export']['content_sha256'] != export_a['desd_export']['content_sha256']
