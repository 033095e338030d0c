"""TensorBoard's event checksums in C while `fit` runs (speed only: the event files are the same bytes).

Without TensorFlow installed, TensorBoard's record writer checksums every event with a pure-Python CRC32C, in its
writer thread, holding the GIL: ~8 us for a loss point, ~0.6 ms for the 5 kB event of a diagnostics sample, and
the training thread waits for the GIL meanwhile. Where google-crc32c's C extension is installed (a dependency of
this project), FastPath points TensorBoard's record writer at it from fit start to fit end: the same masked CRC32C
(checked against TensorBoard's own on sample data before it is used), ~0.5 us a 5 kB event. Without it, or where
TensorBoard's checksum is not where it was found (`RECORD_WRITER`), or was already replaced by someone else,
TensorBoard's own runs.

The one private TensorBoard name used: the module global `masked_crc32c` of tensorboard.summary.writer.record_writer,
which RecordWriter.write calls for each event (bound when that module is imported). tests/test_tb_checksum.py checks
it is still there and still used, and that the files written with the swap verify with TensorBoard's own checksum.
"""

from __future__ import annotations

import importlib
import random

RECORD_WRITER = "tensorboard.summary.writer.record_writer"  # the module whose global `masked_crc32c` is swapped


def _mask(crc: int) -> int:
    """TensorBoard's (and TFRecord's) masking of a CRC32C: rotated right by 15 bits, plus a constant, mod 2^32."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def c_masked_crc32c():
    """google-crc32c's C CRC32C, masked as TensorBoard masks it; None where it is not installed or only its
    pure-Python fallback is (no faster than TensorBoard's)."""
    try:
        import google_crc32c
    except ImportError:
        return None
    if getattr(google_crc32c, "implementation", None) != "c":
        return None
    value = google_crc32c.value

    def masked_crc32c(data) -> int:
        return _mask(value(data))

    return masked_crc32c


def _agrees(fast, reference) -> bool:
    """Whether two checksum functions agree on sample data of many lengths (TensorBoard's takes ~0.2 ms)."""
    rng = random.Random(0)
    samples = [b"", b"\x00", b"123456789", bytes(range(256))]
    samples += [bytes(rng.getrandbits(8) for _ in range(n)) for n in (1, 7, 8, 9, 63, 64, 65, 1000)]
    return all(fast(s) == reference(s) for s in samples)


class CRCSwap:
    """TensorBoard's record writer checksum replaced by the C one, and put back."""

    def __init__(self):
        self._module = None
        self._original = None
        self._fast = None

    def install(self) -> str | None:
        """Swap in the C checksum; returns why not (None when it is in place)."""
        fast = c_masked_crc32c()
        if fast is None:
            return "google-crc32c's C extension is not installed"
        try:
            module = importlib.import_module(RECORD_WRITER)
            from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
        except ImportError as e:
            return f"TensorBoard has no {e.name}"
        current = getattr(module, "masked_crc32c", None)
        if current is None or current is not getattr(pywrap_tensorflow, "masked_crc32c", None):
            return "TensorBoard's record writer checksum is not TensorBoard's own (replaced, or moved)"
        if not _agrees(fast, current):
            return "google-crc32c's checksum differs from TensorBoard's"
        self._module, self._original, self._fast = module, current, fast
        module.masked_crc32c = fast
        return None

    def restore(self) -> None:
        if self._module is not None and getattr(self._module, "masked_crc32c", None) is self._fast:
            self._module.masked_crc32c = self._original
        self._module = self._original = self._fast = None
