"""Policy losses: pure torch, no Megatron, no config tree. ``build_loss(name, **hp)(LossInput(...))``."""

from megarl.losses.base import AGG_MODES, LossInput, agg
from megarl.losses.kl import KL_ESTIMATORS, kl_estimate
from megarl.losses.registry import LOSSES, PolicyLoss, build_loss

__all__ = ["AGG_MODES", "KL_ESTIMATORS", "LOSSES", "LossInput", "PolicyLoss", "agg", "build_loss", "kl_estimate"]
