"""Writing to TensorBoard event files cheaply: many scalars in one event, raw histograms, PNG images.

TensorBoard's record writer checksums every event with a pure-Python CRC32C in its writer thread, holding the GIL:
a sample's 5 kB scalar event costs the training thread ~0.5-0.7 ms. The writer is the logger's, not this package's,
so this package leaves its checksum as it finds it; mm_lightning's fit swaps in a C one while it trains (its speed
add-on, mm_lightning/speed/tbcrc.py).
"""

from __future__ import annotations

from .snapshot import Histogram


def add_scalars(writer, scalars: dict[str, float], step: int) -> None:
    """All of a step's scalars in one event: one encoding by hand (scalar_event: half the time protobuf objects
    take, 0.17 ms a sample for the lecture's network), one queue put, one checksum."""
    import time

    event_writer = getattr(writer._get_file_writer(), "event_writer", None)
    queue = getattr(event_writer, "_async_writer", None)
    if queue is not None:
        queue.write(scalar_event(time.time(), step, scalars))
        return
    from tensorboard.compat.proto.summary_pb2 import Summary  # a writer without the queue: the public way

    values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]
    writer._get_file_writer().add_summary(Summary(value=values), step)


def add_histogram(writer, tag: str, hist: Histogram, step: int) -> None:
    """A histogram already binned (on the device), as TensorBoard's histogram plugin reads it."""
    num = sum(hist.counts)
    if num <= 0:
        return
    centers = hist.centers
    writer.add_histogram_raw(
        tag,
        min=hist.edges[0],
        max=hist.edges[-1],
        num=num,
        sum=sum(c * x for c, x in zip(hist.counts, centers)),
        sum_squares=sum(c * x * x for c, x in zip(hist.counts, centers)),
        bucket_limits=hist.edges[1:],
        bucket_counts=hist.counts,
        global_step=step,
    )


def png_event(images: dict[str, tuple[bytes, int, int]], step: int):
    """PNG images (already encoded) as one TensorBoard event."""
    import time

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = [
        Summary.Value(tag=tag, image=Summary.Image(height=h, width=w, colorspace=4, encoded_image_string=data))
        for tag, (data, h, w) in images.items()
    ]
    return Event(wall_time=time.time(), step=step, summary=Summary(value=values))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


_TAGS: dict[str, bytes] = {}  # tag -> its encoded Summary.Value.tag field


def scalar_event(wall_time: float, step: int, scalars: dict[str, float]) -> bytes:
    """The bytes of Event(wall_time, step, summary=Summary(value=[Value(tag, simple_value)...])): field 1 double,
    field 2 varint, field 5 message of repeated field 1 messages (tag: field 1 string, simple_value: field 2
    float), as protobuf encodes them, zeros included (tests/test_diagnostics.py checks that protobuf parses them into
    the message it would have built)."""
    import struct

    values = []
    for tag, value in scalars.items():
        if tag not in _TAGS:
            raw = tag.encode()
            _TAGS[tag] = b"\x0a" + _varint(len(raw)) + raw
        body = _TAGS[tag] + b"\x15" + struct.pack("<f", value)
        values.append(b"\x0a" + _varint(len(body)) + body)
    summary = b"".join(values)
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + b"\x2a" + _varint(len(summary)) + summary
