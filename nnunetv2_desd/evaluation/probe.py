"""The frozen-encoder linear probe of ``desd_probe``: per-stage features of each encoder, the probe, its report.

``nnunetv2_desd.cli.probe`` documents the method for its users: which cases and windows, which network and
weights, and how exports given one label form a group.
"""
import copy
import csv
import io
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch.nn import functional as F
from tqdm import tqdm

from nnunetv2_desd.common.checkpoint import atomic_write, atomic_write_text
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.export_record import ExportRecord
from nnunetv2_desd.common.pretrained_weights import ENCODER, read_export
from nnunetv2_desd.data.preprocessing_match import preprocessing_differences
from nnunetv2_desd.data.raw import resolve_dataset_name
from nnunetv2_desd.pretraining.network import build_planned_network, planned_encoder

DEFAULT_RANDOM_SEEDS = 3


# ----------------------------------------------------------------------------------------------------------------
# the probe itself: features in, Dice out (no nnU-Net needed, so it can be checked on known features)
# ----------------------------------------------------------------------------------------------------------------
def sample_features(feature_map: torch.Tensor, voxels: torch.Tensor, full_shape: Sequence[int]) -> torch.Tensor:
    """Trilinear upsampling of ``feature_map`` (C, *s) to the grid ``full_shape``, read at ``voxels`` (N, 3) only:
    the values ``F.interpolate(..., size=full_shape, mode='trilinear', align_corners=False)`` has there. -> (N, C)."""
    shape = torch.tensor(list(full_shape), dtype=torch.float32)
    normalised = (2 * voxels.float() + 1) / shape - 1                        # voxel centres in [-1, 1]
    grid = normalised.flip(-1).view(1, -1, 1, 1, 3)                          # grid_sample wants (x, y, z) = (W, H, D)
    values = F.grid_sample(feature_map[None].float(), grid, mode='bilinear', padding_mode='border',
                           align_corners=False)
    return values.view(feature_map.shape[0], -1).T


@dataclass
class LinearProbe:
    """logits = W (x - mean) / std + b, per voxel."""
    weight: torch.Tensor   # (K, C)
    bias: torch.Tensor     # (K,)
    mean: torch.Tensor     # (C,)
    std: torch.Tensor      # (C,)

    def logits_map(self, feature_map: torch.Tensor, full_shape: Sequence[int]) -> torch.Tensor:
        """(C, *s) -> (K, *full_shape). The probe is affine and trilinear weights sum to 1, so scoring at the stage's
        resolution and upsampling the logits equals scoring the upsampled features."""
        w = self.weight / self.std
        b = self.bias - w @ self.mean
        logits = torch.einsum('kc,c...->k...', w, feature_map.float()) + b.view(-1, *([1] * (feature_map.dim() - 1)))
        if tuple(logits.shape[1:]) != tuple(full_shape):
            logits = F.interpolate(logits[None], size=tuple(full_shape), mode='trilinear', align_corners=False)[0]
        return logits


def fit_linear_probe(features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, num_classes: int,
                     l2: float = 1e-3, max_iter: int = 100) -> LinearProbe:
    """Weighted multinomial logistic regression: min_W,b  sum_i w_i CE(W z_i + b, y_i) / sum_i w_i + l2 ||W||^2,
    z = standardised features (N, C); targets (N,) in [0, num_classes). Full-batch L-BFGS."""
    features = features.float()
    weights = weights.float() / weights.sum()
    mean = (weights[:, None] * features).sum(0)
    std = ((weights[:, None] * (features - mean) ** 2).sum(0)).sqrt().clamp_min(1e-6)
    z = (features - mean) / std
    w = torch.zeros(num_classes, z.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad()
        loss = (F.cross_entropy(z @ w.T + b, targets, reduction='none') * weights).sum() + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(w.detach(), b.detach(), mean, std)


def stratified_voxels(label: torch.Tensor, classes: Sequence[int], per_class: int,
                      generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to ``per_class`` voxels of each class present, each weighted by (class voxels / sampled voxels), so the
    weighted sample keeps the case's class frequencies. -> voxels (N, 3), class indices (N,), weights (N,)."""
    voxels, targets, weights = [], [], []
    for index, value in enumerate(classes):
        where = (label == value).nonzero()
        if len(where) == 0:
            continue
        take = where[torch.randperm(len(where), generator=generator)[:per_class]]
        voxels.append(take)
        targets.append(torch.full((len(take),), index, dtype=torch.long))
        weights.append(torch.full((len(take),), len(where) / len(take)))
    return torch.cat(voxels), torch.cat(targets), torch.cat(weights)


def dice_scores(prediction: torch.Tensor, label: torch.Tensor, foreground: Sequence[int]) -> List[float]:
    """Dice 2|P∩L| / (|P| + |L|) per foreground class index, NaN where the class is in neither; ``prediction`` and
    ``label`` hold class indices, voxels outside the valid region already removed (1D tensors)."""
    scores = []
    for c in foreground:
        p, t = prediction == c, label == c
        denominator = int(p.sum() + t.sum())
        scores.append(float('nan') if denominator == 0 else 2 * int((p & t).sum()) / denominator)
    return scores


def probe_stage(features: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor], folds: List[dict],
                num_classes: int, voxels_per_class: int = 2000, seed: int = 0) -> List[Tuple[float, float]]:
    """One stage: ``features[case]`` (C, *s), ``labels[case]`` (*S) of class indices (-1: ignored voxels), ``folds``
    nnU-Net-style [{'train': [...], 'val': [...]}]. -> (Dice, accuracy) per fold; Dice is the mean over held-out
    cases of the mean over the foreground classes present (class 0 is background)."""
    generator = torch.Generator().manual_seed(seed)
    classes = list(range(num_classes))
    results = []
    for fold in folds:
        xs, ys, ws = [], [], []
        for case in fold['train']:
            voxels, targets, weights = stratified_voxels(labels[case], classes, voxels_per_class, generator)
            xs.append(sample_features(features[case], voxels, labels[case].shape))
            ys.append(targets)
            ws.append(weights)
        probe = fit_linear_probe(torch.cat(xs), torch.cat(ys), torch.cat(ws), num_classes)
        case_dice, correct, counted = [], 0, 0
        for case in fold['val']:
            label = labels[case]
            prediction = probe.logits_map(features[case], label.shape).argmax(0)
            valid = label >= 0
            p, t = prediction[valid], label[valid]
            correct, counted = correct + int((p == t).sum()), counted + int(valid.sum())
            scores = [s for s in dice_scores(p, t, classes[1:]) if not np.isnan(s)]
            if scores:
                case_dice.append(float(np.mean(scores)))
        results.append((float(np.mean(case_dice)) if case_dice else float('nan'), correct / max(counted, 1)))
    return results


# ----------------------------------------------------------------------------------------------------------------
# nnU-Net side: plans, cases, encoders
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Encoder:
    name: str               # row label
    group: str              # exports of one recipe share a group; random inits are group 'random'
    state: Optional[dict]   # encoder.* tensors; None: nnU-Net's initialisation with ``seed``
    seed: int = 0
    distilled_stages: Tuple[int, ...] = ()


def export_plans_differences(record: ExportRecord, plans: dict, configuration: str) -> List[str]:
    """What in ``plans`` (configuration) differs from the export's: architecture, then preprocessing (spacing,
    axis order, normalisation, CT statistics), each as 'ENTRY ACTUAL instead of EXPORTED'."""
    if configuration not in plans['configurations']:
        return [f'no configuration {configuration!r}']
    cm = PlansManager(plans).get_configuration(configuration)
    differences = []
    arch = record.architecture
    if cm.network_arch_class_name != arch['network_class_name']:
        differences.append(f'architecture {cm.network_arch_class_name} instead of {arch["network_class_name"]}')
    elif dict(cm.network_arch_init_kwargs) != dict(arch['arch_kwargs']):
        keys = sorted(k for k in set(arch['arch_kwargs']) | set(cm.network_arch_init_kwargs)
                      if arch['arch_kwargs'].get(k) != cm.network_arch_init_kwargs.get(k))
        differences.append(f'architecture arguments {keys} differ')
    exported = copy.deepcopy(plans)
    exported['transpose_forward'] = record.transpose_forward
    exported['foreground_intensity_properties_per_channel'] = record.foreground_intensity_properties_per_channel
    exported_cfg = exported['configurations'][configuration]
    exported_cfg.pop('inherits_from', None)
    exported_cfg.update(PlansManager(plans).get_configuration(configuration).configuration,
                        spacing=record.spacing, normalization_schemes=record.normalization_schemes,
                        use_mask_for_norm=record.use_mask_for_norm)
    return differences + preprocessing_differences(exported, plans, configuration)


def find_export_plans(dataset_name: str, exports: Sequence, plans_name: Optional[str], configuration: str) -> dict:
    """The plans of ``dataset_name`` that every export fits, with preprocessed data; ``plans_name`` or, by default,
    the first fitting one in nnUNet_preprocessed (the exports' own plans name first). DesdError naming the fixing
    command otherwise."""
    folder = join(nnUNet_preprocessed, dataset_name)
    if plans_name is not None:
        candidates = [plans_name]
    else:
        names = sorted(f[:-5] for f in os.listdir(folder) if f.endswith('.json') and
                       f not in ('dataset.json', 'dataset_fingerprint.json', 'splits_final.json')) \
            if isdir(folder) else []
        own = [e.record.plans_name for e in exports]
        candidates = sorted(names, key=lambda n: (n not in own, n))
    fix = (f'make plans that fit it: desd_plan_like_pretrained -d {dataset_name} -w {exports[0].file} '
           f'(then pass -p nnUNetPlans_pretrained)')
    reasons = []
    for name in candidates:
        file = join(folder, name + '.json')
        if not isfile(file):
            reasons.append(f'{name}: no {file}')
            continue
        plans = load_json(file)
        if 'configurations' not in plans:
            continue
        problems = [f'{os.path.basename(e.file)}: {d}' for e in exports
                    for d in export_plans_differences(e.record, plans, configuration)]
        if problems:
            reasons.append(f'{name}: ' + '; '.join(problems[:3]))
            continue
        data = join(folder, plans['configurations'][configuration].get('data_identifier', ''))
        if not isdir(data):
            reasons.append(f'{name}: not preprocessed ({data} missing; run nnUNetv2_preprocess -d '
                           f'{dataset_name[7:10]} -plans_name {name} -c {configuration})')
            continue
        return plans
    if not candidates:
        raise DesdError(f'{dataset_name} has no plans in {folder}; {fix}.')
    raise DesdError(f'no plans of {dataset_name} fit the export(s) ({" | ".join(reasons)}); {fix}.')


def load_probe_cases(plans: dict, dataset_json: dict, dataset_name: str, configuration: str,
                     patch_size: Sequence[int]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], List[int]]:
    """Each preprocessed case, through nnU-Net's dataset class, cropped to one ``patch_size`` window centred on its
    foreground bounding box. -> images (C, *patch), labels (*patch) as class indices (-1: padding, ignore label or
    nnU-Net's outside-mask), and the label values the class indices stand for."""
    label_manager = PlansManager(plans).get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise DesdError(f'{dataset_name} is region-based; the probe needs plain integer labels.')
    values = [int(v) for v in label_manager.all_labels if v != label_manager.ignore_label]
    folder = join(nnUNet_preprocessed, dataset_name, plans['configurations'][configuration]['data_identifier'])
    dataset = infer_dataset_class(folder)(folder)
    if len(dataset.identifiers) < 2:
        raise DesdError(f'{folder} holds {len(dataset.identifiers)} case(s); the probe needs at least 2.')
    lookup = torch.full((max(values) + 2,), -1, dtype=torch.long)
    lookup[torch.tensor(values)] = torch.arange(len(values))
    images, labels = {}, {}
    for case in sorted(dataset.identifiers):
        data, seg, _, _ = dataset.load_case(case)
        seg = np.asarray(seg[0])
        foreground = np.argwhere(seg > 0)
        centre = (foreground.min(0) + foreground.max(0)) // 2 if len(foreground) else np.array(seg.shape) // 2
        bbox = [[int(c) - p // 2, int(c) - p // 2 + p] for c, p in zip(centre, patch_size)]
        images[case] = torch.from_numpy(np.ascontiguousarray(crop_and_pad_nd(np.asarray(data), [[0, data.shape[0]]]
                                                                               + bbox, pad_value=0))).float()
        crop = torch.from_numpy(crop_and_pad_nd(seg, bbox, pad_value=-1).astype(np.int64))
        crop[(crop < 0) | (crop > max(values))] = max(values) + 1   # -> lookup's last entry, -1
        labels[case] = lookup[crop]
    return images, labels, values


@torch.no_grad()
def encoder_features(encoder_spec: Encoder, plans: dict, dataset_json: dict, configuration: str,
                     images: Dict[str, torch.Tensor], device: torch.device) -> Dict[int, Dict[str, torch.Tensor]]:
    """stage -> case -> features (C_s, *s) of the frozen encoder (eval mode), on CPU."""
    pm = PlansManager(plans)
    label_manager = pm.get_label_manager(dataset_json)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(encoder_spec.seed)
        network = build_planned_network(pm, pm.get_configuration(configuration), len(dataset_json['channel_names']),
                                        label_manager.num_segmentation_heads)
    encoder = planned_encoder(network, drr_path=False)
    if encoder_spec.state is not None:
        try:
            encoder.load_state_dict(encoder_spec.state)
        except RuntimeError as e:
            raise DesdError(f'{encoder_spec.name}: the export\'s encoder does not fit the plans\' network '
                            f'({str(e).splitlines()[0]}).') from None
    encoder.to(device).eval()
    features: Dict[int, Dict[str, torch.Tensor]] = {}
    for case, image in images.items():
        with torch.autocast(device.type, enabled=device.type == 'cuda'):
            outputs = encoder(image[None].to(device))
        for stage, output in enumerate(outputs):
            features.setdefault(stage, {})[case] = output[0].float().cpu()
    return features


def read_exports(files: Sequence[str], groups: Optional[Sequence[str]]) -> Tuple[list, List[Encoder]]:
    if groups is not None and len(groups) != len(files):
        raise DesdError(f'--labels: {len(groups)} label(s) for {len(files)} export(s); give one per export.')
    exports, encoders = [], []
    for i, file in enumerate(files):
        export = read_export(file)
        state = {k[len(ENCODER):]: v for k, v in export.weights.items() if k.startswith(ENCODER)}
        if not state:
            raise DesdError(f'{file} holds no encoder.* tensors.')
        group = groups[i] if groups is not None else export.record.method
        run = os.path.basename(os.path.dirname(export.file))
        name = f'{group}: {run}' if len(files) == 1 or groups is None else f'{group} #{groups[:i + 1].count(group)}'
        exports.append(export)
        encoders.append(Encoder(name, group, state, distilled_stages=tuple(export.record.distilled_stages or ())))
    names = [e.name for e in encoders]
    for i, e in enumerate(encoders):
        if names.count(e.name) > 1:
            e.name = f'{e.name} ({i + 1})'
    return exports, encoders


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    encoders: List[Encoder]
    rows: List[dict]        # encoder, group, stage, fold, dice, accuracy
    num_stages: int
    setup: dict

    def per_fold(self, name: str, stage: int, key: str = 'dice') -> np.ndarray:
        return np.array([r[key] for r in self.rows if r['encoder'] == name and r['stage'] == stage], dtype=float)

    def encoder_mean(self, name: str, stage: int, key: str = 'dice') -> float:
        return float(np.nanmean(self.per_fold(name, stage, key)))

    def groups(self) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        for e in self.encoders:
            out.setdefault(e.group, []).append(e.name)
        return out

    def group_stats(self, group: str, stage: int, key: str = 'dice') -> Tuple[float, float]:
        """Mean and sd (ddof 1; 0 for one encoder) over the group's encoders of their fold means."""
        values = np.array([self.encoder_mean(n, stage, key) for n in self.groups()[group]])
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0

    def best_random(self, stage: int) -> float:
        return max(self.encoder_mean(n, stage) for n in self.groups()['random'])

    def distilled_stages(self, group: str) -> Tuple[int, ...]:
        return next(e.distilled_stages for e in self.encoders if e.group == group)


def _mean_plus_minus_sd(values: np.ndarray) -> str:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return 'n/a'
    return f'{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}'


def probe_markdown(result: ProbeResult) -> str:
    s = result.setup
    stages = range(result.num_stages)
    header = '| encoder | ' + ' | '.join(f'stage {i}' for i in stages) + ' |\n|---|' + '---|' * result.num_stages
    lines = [f'# Encoder probe: {s["dataset"]}', '',
             f'Frozen encoders, a linear (logistic-regression) probe per stage on upsampled features; '
             f'{s["folds"]}-fold over {s["cases"]} cases (patch {s["patch_size"]}, plans {s["plans"]}); '
             f'{s["voxels_per_class"]} training voxels per class and case. Values: mean ± sd over folds. '
             f'"random": the same network at nnU-Net\'s initialisation (seeds {s["random_seeds"]}).', '',
             '## Dice (mean over foreground labels)', '', header]
    for key, title in (('dice', None), ('accuracy', '## Voxel accuracy')):
        if title:
            lines += ['', title, '', header]
        for e in result.encoders:
            lines.append(f'| {e.name} | ' + ' | '.join(_mean_plus_minus_sd(result.per_fold(e.name, i, key))
                                                      for i in stages) + ' |')
    groups = [g for g in result.groups() if g != 'random']
    if groups:
        lines += ['', '## Gain in Dice over random initialisation', '',
                  'Per group of exports: mean (± sd over its exports) of their fold-mean Dice, minus the best and '
                  'the mean random initialisation. Distilled stages are marked *.', '', header]
        random_mean = [result.group_stats('random', i)[0] for i in stages]
        for g in groups:
            distilled = result.distilled_stages(g)
            cells, gains = [], []
            for i in stages:
                mean, sd = result.group_stats(g, i)
                gain = mean - result.best_random(i)
                if i in distilled:
                    gains.append(gain)
                cells.append(f'{gain:+.3f} (vs mean {mean - random_mean[i]:+.3f}; ± {sd:.3f})'
                             + ('*' if i in distilled else ''))
            n = len(result.groups()[g])
            lines.append(f'| {g} − best random (n = {n}) | ' + ' | '.join(cells) + ' |')
            if gains:
                wins = sum(x > 0 for x in gains)
                lines.append(f'| {g}: mean gain over distilled stages | {np.mean(gains):+.3f}; beats the best random '
                             f'initialisation at {wins} of {len(gains)} distilled stages |' + ' |' * (len(stages) - 1))
    return '\n'.join(lines) + '\n'


def seed_spread(result: ProbeResult, group: str) -> dict:
    """How the exports of ``group`` (one per seed) fare against the best random initialisation, at the group's
    distilled stages: ``gains`` {export: [gain per stage]}, ``stage_mean`` and ``stage_sd`` (ddof 1) over exports,
    ``seed_mean`` (each export's mean over stages), ``mean`` over exports and stages and ``sd`` (ddof 1) of
    ``seed_mean``, ``every_seed_wins`` (every export above the best random at every stage)."""
    stages = result.distilled_stages(group)
    names = result.groups()[group]
    gains = {n: [result.encoder_mean(n, i) - result.best_random(i) for i in stages] for n in names}
    table = np.array(list(gains.values()))
    several = len(names) > 1
    return dict(stages=list(stages), gains=gains, stage_mean=table.mean(0).tolist(),
                stage_sd=(table.std(0, ddof=1) if several else np.zeros(len(stages))).tolist(),
                seed_mean=table.mean(1).tolist(), mean=float(table.mean()),
                sd=float(table.mean(1).std(ddof=1)) if several else 0.0, every_seed_wins=bool((table > 0).all()))


def probe_csv(result: ProbeResult) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=['encoder', 'group', 'stage', 'fold', 'dice', 'accuracy'])
    writer.writeheader()
    writer.writerows(result.rows)
    return buffer.getvalue()


def probe_figure(result: ProbeResult, file) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: matplotlib is slow to import
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    stages = np.arange(result.num_stages)
    for e in result.encoders:
        values = [result.encoder_mean(e.name, i) for i in stages]
        if e.group == 'random':
            ax.plot(stages, values, color='0.6', linestyle='--', linewidth=1, marker='.',
                    label=e.name)
        else:
            ax.plot(stages, values, marker='o', linewidth=1.5, label=e.name)
    ax.set_xticks(stages)
    ax.set_xlabel('encoder stage (0 = full resolution)')
    ax.set_ylabel('linear-probe Dice (mean over folds)')
    ax.set_title(f'Encoder probe on {result.setup["dataset"]}')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, format='png', dpi=110)


def write_probe_report(result: ProbeResult, out: str) -> Dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f'probe.{k}') for k in ('md', 'csv', 'png')}
    atomic_write_text(probe_markdown(result), paths['md'])
    atomic_write_text(probe_csv(result), paths['csv'])
    atomic_write(paths['png'], lambda f: probe_figure(result, f))
    return paths


# ----------------------------------------------------------------------------------------------------------------
# the whole probe: a labelled dataset and exports in, the report out
# ----------------------------------------------------------------------------------------------------------------
def run_probe(dataset: str, exports: Sequence[str], labels: Optional[Sequence[str]] = None, plans: Optional[str] = None,
              configuration: str = '3d_fullres', folds: int = 5, random_seeds: int = DEFAULT_RANDOM_SEEDS,
              voxels_per_class: int = 2000, patch_size: Optional[Sequence[int]] = None, device: str = 'auto',
              output: Optional[str] = None, progress: bool = True) -> Tuple[ProbeResult, Dict[str, str]]:
    """Probes each export in ``exports`` (one group per entry of ``labels``; default: the export's method) and
    ``random_seeds`` random initialisations on ``dataset``'s preprocessed cases, k-fold with k = ``folds`` (at most
    the number of cases); ``plans``: the plans identifier (default: the first that fits the exports); ``device``
    auto, cuda or cpu. Writes the report to ``output`` (default nnUNet_results/<Dataset>/desd_probe); returns the
    result and the report's paths."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split  # here: it imports sklearn (seconds)
    if device == 'cuda' and not torch.cuda.is_available():
        raise DesdError('no CUDA device is visible. Use -device cpu.')
    torch_device = torch.device('cuda' if device != 'cpu' and torch.cuda.is_available() else 'cpu')
    if not nnUNet_preprocessed:
        raise DesdError('nnUNet_preprocessed must be set.')
    dataset_name = resolve_dataset_name(dataset)
    read, encoders = read_exports(exports, labels)
    if 'random' in {e.group for e in encoders}:
        raise DesdError('--labels: "random" names the random initialisations; choose another label.')
    found = find_export_plans(dataset_name, read, plans, configuration)
    dataset_json = load_json(join(nnUNet_preprocessed, dataset_name, 'dataset.json'))
    patch = list(patch_size or found['configurations'][configuration].get('patch_size')
                 or read[0].record.plans_patch_size)
    images, case_labels, values = load_probe_cases(found, dataset_json, dataset_name, configuration, patch)
    k = min(folds, len(images))
    splits = generate_crossval_split(sorted(images), seed=12345, n_splits=k)
    encoders += [Encoder(f'random (seed {s})', 'random', None, seed=s) for s in range(random_seeds)]
    rows, num_stages = [], 0
    for spec in tqdm(encoders, desc='desd_probe: encoders', disable=not progress):
        features = encoder_features(spec, found, dataset_json, configuration, images, torch_device)
        num_stages = len(features)
        for stage, stage_features in features.items():
            for fold, (dice, accuracy) in enumerate(probe_stage(stage_features, case_labels, splits, len(values),
                                                                voxels_per_class)):
                rows.append(dict(encoder=spec.name, group=spec.group, stage=stage, fold=fold, dice=dice,
                                 accuracy=accuracy))
    setup = dict(dataset=dataset_name, plans=found['plans_name'], folds=k, cases=len(images), patch_size=patch,
                 voxels_per_class=voxels_per_class, random_seeds=list(range(random_seeds)),
                 exports=[e.file for e in read])
    result = ProbeResult(encoders, rows, num_stages, setup)
    out = output or join(nnUNet_results or '.', dataset_name, 'desd_probe')
    return result, write_probe_report(result, out)
