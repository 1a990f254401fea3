"""The ``extract_memory`` params section: :class:`ExtractConfig` (parsed by :func:`vspa.config.parse_section`)."""

from __future__ import annotations

from dataclasses import dataclass

from vspa.config import check_choice, check_device, check_number
from vspa.memory.extract import KEEP_CHOICES


@dataclass
class ExtractConfig:
    """The ``extract_memory`` params section; the values are in conf/config.yaml."""

    device: str  # auto | cpu | cuda | cuda:<index>
    keep: str  # all | correct (only objects the source detector classifies correctly, as MILA)
    batch_size: int  # images per inference batch, >= 1
    chunk_rows: int  # rows buffered before each HDF5 write, >= 1

    def validate(self, name: str = "extract_memory", path: str = "params.yaml") -> None:
        check_device(self.device, f"{name}.device", path)
        check_choice(self.keep, KEEP_CHOICES, f"{name}.keep", path)
        check_number(self.batch_size >= 1, self.batch_size, f"{name}.batch_size", "at least 1", path)
        check_number(self.chunk_rows >= 1, self.chunk_rows, f"{name}.chunk_rows", "at least 1", path)
