from .base import LinearOperator, Operator, OperatorCapabilityError, SVDOperator

__all__ = ["Operator", "LinearOperator", "SVDOperator", "OperatorCapabilityError"]
