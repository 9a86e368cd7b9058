"""Module paths of the previous release, importable for one more release with a DeprecationWarning.

``MOVED`` maps an old module to the module(s) whose names it now hands on (an old package whose modules all moved
maps to its new package, or to ``()``). Plans and user code that name an old path, e.g. a plans file's
``network_class_name`` 'nnunetv2_desd.models.pvt_unet.PVTUNet', keep working: the objects are the same.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_P = 'nnunetv2_desd.'
MOVED = {_P + old: tuple(_P + n for n in new) for old, new in {
    'errors': ('common.errors',),
    'preprocessing_match': ('data.preprocessing_match',),
    'demo': ('cli.demo',),
    'gpu_check_report': ('benchmarks.gpu_check', 'cli.gpu_check_report'),
    'models': ('architectures',),
    'models.pvt_unet': ('architectures.pvt_unet',),
    'models.memory': ('architectures.memory',),
    'models.benchmark': ('benchmarks.pvt', 'cli.pvt_benchmark'),
    'semisupervised': (),
    'semisupervised.pool': ('data.pool',),
    'semisupervised.unlabelled': ('data.unlabelled', 'cli.preprocess_unlabelled'),
    'semisupervised.dmd_loss': ('trainers.dmd_loss',),
    'semisupervised.measure': ('benchmarks.dmd', 'cli.dmd_benchmark'),
    'evaluation.fractions': ('data.fractions',),
    'pretraining.data': ('data',),
    'pretraining.data.raw': ('data.raw',),
    'pretraining.data.planning': ('data.planning',),
    'pretraining.data.reference': ('data.reference',),
    'pretraining.data.drrs': ('data.drrs',),
    'pretraining.data.sources': ('data.sources',),
    'pretraining.data.loader': ('pretraining.views.loader',),
    'pretraining.views.drr': ('data.drr_projection',),
    'pretraining.models': (),
    'pretraining.models.heads': ('pretraining.heads',),
    'pretraining.models.network': ('pretraining.network',),
    'pretraining.engine.checkpoint': ('common.checkpoint',),
    'pretraining.engine.pretrained_weights': ('common.pretrained_weights',),
    'pretraining.engine.nnssl': ('common.nnssl',),
    'pretraining.engine.distributed': ('pretraining.distributed',),
    'pretraining.cli': ('cli.pretrain', 'pretraining.run'),
    'pretraining.drr_cli': ('cli.drr',),
    'pretraining.benchmark': ('benchmarks.pretraining', 'benchmarks.cads', 'benchmarks.timing',
                              'cli.pretrain_benchmark'),
    'pretraining.refs_benchmark': ('benchmarks.refs',),
    'trainers.pretrained_weights': ('common.pretrained_weights',),
    'trainers.plan_like_pretrained': ('planning.plan_like_pretrained', 'cli.plan_like_pretrained'),
    'trainers.plan_pvt': ('planning.plan_pvt', 'cli.plan_pvt'),
    'trainers.commands': ('cli.stock',),
}.items()}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        is_package = any(other.startswith(fullname + '.') for other in MOVED)
        return importlib.util.spec_from_loader(fullname, self, is_package=is_package)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        targets = [importlib.import_module(name) for name in MOVED[module.__name__]]
        warnings.warn(f'{module.__name__} moved to {" and ".join(MOVED[module.__name__]) or "several modules"}; '
                      f'the old path goes in the next release', DeprecationWarning, stacklevel=2)
        for target in reversed(targets):  # the first target wins a name two of them have
            module.__dict__.update({k: v for k, v in vars(target).items() if not k.startswith('__')})


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
