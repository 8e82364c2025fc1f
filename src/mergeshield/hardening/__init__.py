"""Training-time hardening: a short fine-tune of the release that merges cannot use.

:mod:`~mergeshield.hardening.config` (hyper-parameters, no torch),
:mod:`~mergeshield.hardening.data` (the owner's examples),
:mod:`~mergeshield.hardening.components` (one registered object per loss term),
:mod:`~mergeshield.hardening.harden` (the training loop, and harden-then-protect).
"""
