"""The pre-training methods by ``-m`` name: adding a method is one module plus one entry here."""
from nnunetv2_desd.pretraining.methods.cads import CADS
from nnunetv2_desd.pretraining.methods.desd import DeSD
from nnunetv2_desd.pretraining.methods.refs import ReFs

METHODS = {method.name: method for method in (DeSD, CADS, ReFs)}
