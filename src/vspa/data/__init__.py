"""Datasets: the embedded synthetic benchmark (``synth``), COCO-style loading, validation and writing
(``coco``) and the detector's augmentations (``transforms``). See docs/architecture.md for the on-disk format.

The submodules are imported explicitly (``from vspa.data.coco import load_coco``) so that the image
generator's worker processes never import torch.
"""

SPLITS = ("source_train", "source_test", "target_train", "target_test")
"""The four splits of every benchmark, in the order that defines their ``split code`` (0..3)."""
OPTIONAL_SPLITS = ("target_val",)
"""Splits a benchmark may add (split codes 4..): ``target_val``, the labelled target validation split on which
every default is chosen (the embedded benchmark generates it; target test is read only for final tables)."""


def split_info(scenario: str, split: str, **details) -> dict:
    """The ``info`` record of a split's annotations.json: scenario, domain and split (from ``source_train`` etc.),
    then ``details`` (generator, seed, source files ...) in their order."""
    domain, part = split.split("_")
    return {"scenario": scenario, "domain": domain, "split": part, **details}
