"""Input-level adaptation: attention-guided target -> source translation with local-global contrastive
learning (spec: local-global-i2i.md). The source detector, frozen, runs on the translated target images.

- ``generator``: ``Translator`` (encoder, content and attention decoders, or the plain CUT-like decoder);
- ``discriminator``: ``PatchDiscriminator``;
- ``losses``: ``GANLoss`` (lsgan | bce), ``PatchNCELoss``;
- ``local_global``: ``LocalGlobalLoss`` (L_GA: heads, momentum copy, queues);
- ``trainer``: ``TranslateConfig``, ``train_translator``; ``apply``: ``load_translator``, ``translate_split``;
- ``grid``: ``save_translation_grid`` (input | translated | content maps, and the masks);
- ``diagnostics``: mask entropy, background mask on / off the objects, L_GA's view separation, gradient norms
  (``reports/translate/<variant>_diagnostics.json``).
"""
