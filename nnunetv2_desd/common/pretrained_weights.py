"""Loading a pre-trained export into an nnU-Net-planned network: shape matching, stem adaptation, a report.

nnU-Net's own ``-pretrained_weights`` loader asserts on the first key whose shape differs. Here every tensor is
compared first, so a mismatch names all differing tensors and the command that fixes it, and an input-channel
difference in the stem is adapted instead of refused.
"""
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from nnunetv2_desd.common.checkpoint import file_sha256, load_checkpoint
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.export_record import ExportRecord
from nnunetv2_desd.common.nnssl import PLAN_KEY, record_from_plan

ENCODER = 'encoder.'
SEG_LAYERS = '.seg_layers.'  # nnU-Net never transfers the segmentation outputs


@dataclass
class PretrainedExport:
    file: str
    weights: Dict[str, torch.Tensor]
    record: Optional[ExportRecord]  # read_export's is complete and 3D; None only where made by hand
    file_sha256: str


def read_export(path: str) -> PretrainedExport:
    """An export (``{'network_weights': ..., 'desd_export': ...}``) or an nnssl checkpoint (``network_weights`` +
    ``nnssl_adaptation_plan``, read into the same record), loaded on CPU with ``weights_only=True``."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise DesdError(f'export file not found: {path}')
    checkpoint = load_checkpoint(path)
    weights = checkpoint.get('network_weights')
    if not isinstance(weights, dict) or not weights:
        raise DesdError(f'{path} is not an nnunetv2_desd export (no "network_weights"). Use the '
                        f'pretrained_export.pth that desd_pretrain writes.')
    odd = next((k for k, v in weights.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise DesdError(f'{path}: "network_weights" maps {odd!r} to a {type(weights[odd]).__name__}, not a tensor; '
                        f'the file is not a network\'s state dict.')
    if isinstance(checkpoint.get('desd_export'), dict):
        record = ExportRecord.from_dict(checkpoint['desd_export'], path)
    elif PLAN_KEY in checkpoint:  # an nnssl checkpoint (OpenMind, or nnssl's own runs)
        trainer = checkpoint.get('trainer_name')
        record = record_from_plan(checkpoint[PLAN_KEY], weights, trainer if isinstance(trainer, str) else None, path)
    else:
        raise DesdError(f'{path} has network_weights but neither "desd_export" (nnunetv2_desd) nor "{PLAN_KEY}" '
                        f'(nnssl) metadata: nothing says which network and preprocessing it was trained with.')
    return PretrainedExport(path, weights, record.check_3d(path), file_sha256(path))


def adapt_input_channels(weight: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Stem weights for another number of input channels: W'[:, j] = (1/C') * sum_i W[:, i], j = 1..C'.

    The pre-trained channels are summed and the sum is repeated over the C' new channels with weight 1/C', so an
    input whose C' channels all equal x gives the response the pre-trained stem gives to x in every channel.
    """
    summed = weight.sum(dim=1, keepdim=True) / num_channels
    return summed.expand(weight.shape[0], num_channels, *weight.shape[2:]).clone()


@dataclass
class LoadPlan:
    """What goes from the export into ``network.encoder``, and what does not fit."""
    encoder_tensors: Dict[str, torch.Tensor]  # keys relative to the encoder, ready for encoder.load_state_dict
    num_encoder_tensors: int  # distinct tensors (nnU-Net's blocks register some under two names)
    num_loaded: int = 0
    stem_key: Optional[str] = None  # full key of the adapted stem weight, if adapted
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)  # key, export shape, network shape
    missing: List[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.mismatched and not self.missing


def plan_loading(network: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> LoadPlan:
    """Compares every non-segmentation tensor of ``network`` with the export (nnU-Net's loader checks the same set).

    The encoder is loaded; the stem's first convolution may differ in its input channels only and is then
    adapted. The decoder must have the export's shapes too, because nnU-Net's loader runs after this one.
    """
    state = network.state_dict(keep_vars=True)
    stem = next(p for p in network.encoder.parameters() if p.ndim >= 3)
    stem_keys = {k for k, v in state.items() if v is stem}  # the same tensor under several names
    encoder_ids = {id(v) for v in network.encoder.state_dict(keep_vars=True).values()}
    plan, loaded_ids = LoadPlan({}, len(encoder_ids)), set()
    for key, value in state.items():
        if SEG_LAYERS in key:
            continue
        if key not in weights:
            plan.missing.append(key)
            continue
        source = weights[key]
        if source.shape != value.shape:
            if key in stem_keys and source.shape[:1] + source.shape[2:] == value.shape[:1] + value.shape[2:]:
                source = adapt_input_channels(source, value.shape[1])
                plan.stem_key = next(k for k in state if k in stem_keys and k.startswith(ENCODER))
            else:
                plan.mismatched.append((key, tuple(source.shape), tuple(value.shape)))
                continue
        if key.startswith(ENCODER):
            plan.encoder_tensors[key[len(ENCODER):]] = source
            loaded_ids.add(id(value))
    plan.num_loaded = len(loaded_ids)
    return plan


def mismatch_message(plan: LoadPlan, export: PretrainedExport, dataset: str, plans_name: str,
                     network_class: str, limit: int = 8) -> str:
    lines = [f'{export.file} does not fit the {network_class} that plans \'{plans_name}\' build for {dataset}:']
    lines += [f'  {k}: export {tuple(a)}, network {tuple(b)}' for k, a, b in plan.mismatched[:limit]]
    if len(plan.mismatched) > limit:
        lines.append(f'  ... and {len(plan.mismatched) - limit} more tensors of other shapes')
    if plan.missing:
        lines.append(f'  missing from the export: {", ".join(plan.missing[:limit])}'
                     + (f' and {len(plan.missing) - limit} more' if len(plan.missing) > limit else ''))
    record = export.record
    if record:
        lines.append(f'The export was pre-trained with plans \'{record.plans_name}\' on '
                     f'{record.source_dataset} ({record.architecture.get("network_class_name")}).')
    lines.append(f'Fix: desd_plan_like_pretrained -d {dataset} -w {export.file}  (writes plans '
                 f'\'nnUNetPlans_pretrained\' with the export\'s architecture), then train with '
                 f'-p nnUNetPlans_pretrained.')
    return '\n'.join(lines)


def initialise_encoder(network, export: PretrainedExport, plans_identifier: str, dataset_name: str) -> dict:
    """Loads ``export``'s encoder into ``network`` (the planned network; the stem adapted to other input channels)
    and returns the record of where it came from; a different encoder ends with the differing tensors."""
    plan = plan_loading(network, export.weights)
    mismatched = [m for m in plan.mismatched if m[0].startswith(ENCODER)]
    missing = [k for k in plan.missing if k.startswith(ENCODER)]
    if mismatched or missing:
        lines = [f'--init {export.file}: its encoder is not the one plans \'{plans_identifier}\' build for '
                 f'{dataset_name}:']
        lines += [f'{k}: checkpoint {a}, network {b}' for k, a, b in mismatched[:8]]
        if missing:
            lines.append(f'missing from the checkpoint: {", ".join(missing[:8])}')
        lines.append('Pre-train with the checkpoint\'s plans (nnssl ResEnc-L: -pl nnUNetPlannerResEncL, or '
                     'plans made like it with desd_plan_like_pretrained).')
        raise DesdError('; '.join(lines))
    network.encoder.load_state_dict(plan.encoder_tensors)
    record = export.record
    return {'file': export.file, 'file_sha256': export.file_sha256, 'method': record.method,
            'format': record.format, 'source_dataset': record.source_dataset,
            'loaded_encoder_tensors': plan.num_loaded, 'adapted_stem': plan.stem_key}
