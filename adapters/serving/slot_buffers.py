"""A slot's weights in one flat buffer laid out like its adapter file, so a same-shaped adapter loads in one read.

After peft builds a slot's layers, its parameters are moved into one uint8 buffer laid out
like the data section of the adapter's safetensors file: every parameter becomes a view of
the buffer at its file offset. The next adapter whose file has a byte-equal header (same
tensors, shapes, dtypes and offsets) then needs no per-tensor work: a published store version
(its files never change in place) is mapped over the buffer (adapters.serving.file_mapping, no
copy), any other file is read straight into it. Slots whose tensors do not fit that layout
(another dtype in memory than on disk, weights on an accelerator) keep a per-tensor copy.
Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from adapters.errors import StoreError
from adapters.serving import file_mapping
from adapters.serving.peft_layers import PeftLayers

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_MAX_HEADER_BYTES = 100_000_000  # a larger length prefix means the file is not safetensors


class SlotBuffers:
    """The flat weight buffers of the slots of ``layers``' PeftModel."""

    def __init__(self, layers: PeftLayers):
        self.layers = layers
        self._params: dict[str, dict[str, torch.Tensor]] = {}  # slot -> its tensors by adapter-file key
        # slot -> (file header, flat weight buffer [bytes] uint8, the file mapping behind the buffer or None)
        self.layouts: dict[str, tuple[bytes, torch.Tensor, Any]] = {}

    def tensors(self, slot: str) -> dict[str, torch.Tensor]:
        """The slot's parameters under the key names of an adapter file (sharing their storage)."""
        tensors = self._params.get(slot)
        if tensors is None:
            tensors = self.layers.state_dict(slot)
            self._params[slot] = tensors
        return tensors

    def drop(self, slot: str) -> None:
        """Forget a deleted slot's tensors and buffer."""
        self._params.pop(slot, None)
        self.layouts.pop(slot, None)

    def refill(self, slot: str, weights: Path, immutable: bool) -> bool:
        """Put the weights file ``weights`` into a pooled slot; False if its tensors do not fit after all
        (the caller then deletes the slot). ``immutable``: the file never changes in place (may be mapped).

        Raises StoreError if the file is shorter than its header says.
        """
        layout = self.layouts.get(slot)
        if layout is not None:
            raw_header, flat, mapping = layout
            with open(weights, "rb", buffering=0) as fh:
                # Byte-equal headers: same tensors, shapes, dtypes and offsets (no JSON parse needed).
                if _read_header_bytes(fh) == raw_header:
                    if mapping is not None and immutable:
                        try:
                            mapping.remap(fh.fileno(), weights)
                        except OSError as err:
                            log.warning("slot %s: %s; rebuilding it", slot, err)
                            return False
                    elif fh.readinto(memoryview(flat.numpy())) != flat.numel():
                        raise StoreError(f"{weights}: file ended early")
                    return True
        targets = self.tensors(slot)
        with safe_open(str(weights), framework="pt") as fh:
            if set(fh.keys()) != set(targets):
                return False
            loaded = {key: fh.get_tensor(key) for key in targets}
        if any(loaded[k].shape != targets[k].shape for k in targets):
            return False  # e.g. a classification head of another size
        with torch.no_grad():
            for key, tensor in loaded.items():
                targets[key].copy_(tensor)
        return True

    def flatten(self, slot: str, weights: Path, immutable: bool) -> None:
        """Move a new slot's parameters into one buffer laid out like ``weights``' data section:
        a private mapping of the file itself when ``immutable`` (a store version), else an allocated copy.
        Leaves the slot as it is when its tensors do not match the file's layout or are not on the CPU."""
        with open(weights, "rb") as fh:
            raw_header = _read_header_bytes(fh)
        header = _parse_header(raw_header, weights)
        targets = self.tensors(slot)
        if set(header) != set(targets) or any(t.device.type != "cpu" for t in targets.values()):
            return
        data_start = 8 + len(raw_header)  # after the 8-byte length prefix and the JSON header
        size = max(v["data_offsets"][1] for v in header.values())
        for key, meta in header.items():
            target = targets[key]
            if (
                _SAFETENSORS_DTYPES.get(meta["dtype"]) != target.dtype
                or list(meta["shape"]) != list(target.shape)
                or (data_start + meta["data_offsets"][0]) % target.element_size()
            ):
                return  # another dtype in memory than on disk: keep the per-tensor copy
        mapping = None
        if immutable and file_mapping.supported():
            try:
                mapping = file_mapping.FileMapping(weights, data_start + size)
            except OSError as err:
                log.info("slot %s: not mapped (%s); using a copy", slot, err)
        if mapping is not None:
            flat = mapping.tensor[data_start : data_start + size]  # [size] uint8
        else:
            flat = torch.zeros(size, dtype=torch.uint8)
        views = {}  # key -> a view of the buffer with the target's dtype and shape
        for key, m in header.items():
            start, end = m["data_offsets"]
            views[key] = flat[start:end].view(targets[key].dtype).view(targets[key].shape)
        by_ptr = {p.data_ptr(): p for p in self.layers.peft.parameters()}
        with torch.no_grad():
            for key, view in views.items():
                if mapping is None or not torch.equal(view, targets[key]):  # equal: peft loaded this file
                    view.copy_(targets[key])
                param = by_ptr.get(targets[key].data_ptr())
                if param is None:
                    return
                param.data = view
                targets[key] = view
        self.layouts[slot] = (raw_header, flat, mapping)


def _read_header_bytes(fh) -> bytes:
    """The raw JSON header of a safetensors file (file position left at the data section)."""
    size = int.from_bytes(fh.read(8), "little")
    if not 0 < size < _MAX_HEADER_BYTES:
        raise StoreError(f"{getattr(fh, 'name', 'adapter file')}: not a safetensors file")
    return fh.read(size)


def _parse_header(raw: bytes, where: Path) -> dict:
    """The tensor entries of a safetensors header."""
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise StoreError(f"{where}: not a safetensors file ({err})") from None
    header.pop("__metadata__", None)
    return header
