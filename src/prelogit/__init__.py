"""prelogit: test-time alignment by adaptive importance sampling on pre-logits (AISP).

Reference implementation of arXiv 2510.26219. The numeric core lives in :mod:`prelogit.control`
and :mod:`prelogit.theory`; generation with pre-logit control in :mod:`prelogit.sampling`; the
AISP and best-of-N drivers in :mod:`prelogit.aisp`; rewards and held-out judges in
:mod:`prelogit.rewards`, and the embedded reward's training in :mod:`prelogit.reward_training`.
"""

__version__ = "0.1.0"
