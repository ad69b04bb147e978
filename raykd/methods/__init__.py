"""Distillation methods, one module each, registered by name with @register_method."""
from raykd.methods import attention as _attention  # noqa: F401  (registers at)
from raykd.methods import channel as _channel  # noqa: F401  (registers cd)
from raykd.methods import crd as _crd  # noqa: F401  (registers crd)
from raykd.methods import dih as _dih  # noqa: F401  (registers dih)
from raykd.methods import dist as _dist  # noqa: F401  (registers dist)
from raykd.methods import dkd as _dkd  # noqa: F401  (registers dkd)
from raykd.methods import feed as _feed  # noqa: F401  (registers feed)
from raykd.methods import fitnets as _fitnets  # noqa: F401  (registers fitnets)
from raykd.methods import kd as _kd  # noqa: F401  (registers ce and kd)
from raykd.methods import neighbourhood as _neighbourhood  # noqa: F401  (registers neighbourhood)
from raykd.methods import rkd as _rkd  # noqa: F401  (registers rkd)
from raykd.methods.base import (
                                DistillMethod,
                                MethodContext,
                                Step,
                                build_method,
                                method_class,
                                method_names,
                                method_params,
                                register_method,
)

__all__ = ["DistillMethod", "MethodContext", "Step", "build_method", "method_class",
           "method_names", "method_params", "register_method"]
