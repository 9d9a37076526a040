"""mlsgd-width: width hierarchies for mlsgd-dsl (a third-party plugin).

Provides the transfer rule ``width.net2wider`` (function-preserving widening, its left inverse
and closed-form adjoint; see :mod:`mlsgd_width.transfer`) and the architecture family
``width-cnn`` (see :mod:`mlsgd_width.model`). mlsgd-dsl finds them through the entry point
``width = "mlsgd_width.plugin"`` in the group ``mlsgd_dsl``.
"""

__version__ = "0.1.0"
