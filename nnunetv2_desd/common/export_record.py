"""The metadata of a pre-trained export (its ``desd_export`` entry): one record, written by the pre-training engine
and read by every command that takes an export; an nnssl checkpoint is read into the same record."""
from dataclasses import MISSING, dataclass, field, fields
from typing import List, Optional

from nnunetv2_desd.common.errors import DesdError

EXPORT_FORMAT = 'nnunetv2_desd.export'
NNSSL_FORMAT = 'nnssl'  # an nnssl checkpoint, read by common/nnssl.py


def _only(export_format: str):
    """A field that records of ``export_format`` alone hold (``to_dict`` leaves it out of the others)."""
    return {'format': export_format}


@dataclass(kw_only=True)
class ExportRecord:
    """Fields without a default are required: the network and the preprocessing an export was trained with. The
    fields stand in the order of the keys on disk; ``to_dict`` gives the dict the engine writes."""
    format: str = EXPORT_FORMAT
    version: int = field(default=1, metadata=_only(EXPORT_FORMAT))
    method: str
    source_dataset: Optional[str]
    plans_source: Optional[str] = field(default=None, metadata=_only(EXPORT_FORMAT))
    pool: Optional[dict] = field(default=None, metadata=_only(EXPORT_FORMAT))  # PreparedPool.summary()
    plans_name: Optional[str]
    configuration: Optional[str] = field(default=None, metadata=_only(EXPORT_FORMAT))
    architecture: dict  # network_class_name, arch_kwargs, _kw_requires_import (as nnU-Net's plans)
    num_input_channels: int
    channel_names: Optional[dict]  # None: not recorded (nnssl)
    spacing: List[float]
    transpose_forward: List[int]
    normalization_schemes: List[str]
    use_mask_for_norm: List[bool]
    foreground_intensity_properties_per_channel: dict
    patch_size: Optional[List[int]] = field(default=None, metadata=_only(EXPORT_FORMAT))
    plans_patch_size: Optional[List[int]] = field(default=None, metadata=_only(EXPORT_FORMAT))
    distilled_stages: Optional[List[int]] = field(default=None, metadata=_only(EXPORT_FORMAT))
    epochs: Optional[int] = field(default=None, metadata=_only(EXPORT_FORMAT))
    steps: Optional[int] = field(default=None, metadata=_only(EXPORT_FORMAT))
    method_settings: Optional[dict] = field(default=None, metadata=_only(EXPORT_FORMAT))
    initialised_from: Optional[dict] = field(default=None, metadata=_only(EXPORT_FORMAT))  # --init's record
    content_sha256: str
    trainer_name: Optional[str] = field(default=None, metadata=_only(NNSSL_FORMAT))
    recommended_downstream_patchsize: Optional[List[int]] = field(default=None, metadata=_only(NNSSL_FORMAT))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata.get('format', self.format) == self.format}

    @classmethod
    def from_dict(cls, data, file: str) -> 'ExportRecord':
        """The record of a stored ``desd_export`` (keys it does not know are left out); a one-line DesdError that
        names ``file`` and the missing key or the bad format otherwise."""
        if not isinstance(data, dict) or not data:
            raise DesdError(f'{file} is not an nnunetv2_desd export (no "desd_export" metadata). Use the '
                            f'pretrained_export.pth that desd_pretrain writes.')
        if data.get('format') not in (EXPORT_FORMAT, NNSSL_FORMAT):
            raise DesdError(f'{file} is not an nnunetv2_desd export (format {data.get("format")!r}, '
                            f'expected {EXPORT_FORMAT!r}).')
        missing = [f.name for f in fields(cls)
                   if f.default is MISSING and f.default_factory is MISSING and f.name not in data]
        if missing:
            raise DesdError(f'{file} is not an nnunetv2_desd export (incomplete: missing {missing}).')
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def check_3d(self, file: str) -> 'ExportRecord':
        """DesdError unless the record is of a 3D network (3 strides per stage, a 3-axis transpose); returns self."""
        arch_kwargs = self.architecture.get('arch_kwargs', {}) if isinstance(self.architecture, dict) else {}
        strides = arch_kwargs.get('strides')
        if not strides or any(len(s) != 3 for s in strides) or sorted(self.transpose_forward) != [0, 1, 2]:
            raise DesdError(f'{file} is not a 3D nnunetv2_desd export (strides {strides}, transpose '
                            f'{self.transpose_forward}).')
        return self
