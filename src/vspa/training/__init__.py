"""Plumbing shared by the training loops (pretrain / oracle, adaptation; the translator has its own for now).

The loops keep explicit, hook-free bodies and call these small modules:

* :mod:`~vspa.training.seeds`: seed streams (``derive_seed``) and the per-epoch batch order (``global_batch``);
* :mod:`~vspa.training.state`: the resumable state (``load_state`` / ``save_state``) and its one rule for a
  missing, foreign or unreadable state;
* :mod:`~vspa.training.schedule`: SGD and the warm-up + step learning-rate factor;
* :mod:`~vspa.training.log`: the CSV loss log;
* :mod:`~vspa.training.guard`: the non-finite loss check;
* :mod:`~vspa.training.precision`: mixed precision.
* :mod:`~vspa.training.prefetch`: batches made ahead in data threads (on by default on CUDA).
"""
