"""Registrations that let torchao's and transformers' own save/load paths handle Any4Tensor."""

from any4ao.integrations.torchao_registry import register_with_torchao
from any4ao.integrations.transformers_loading import register_with_transformers, register_with_transformers_if_loaded

__all__ = ["register_with_torchao", "register_with_transformers", "register_with_transformers_if_loaded"]
