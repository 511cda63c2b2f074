"""Bundles (payload/result) and the runtime's frame stream."""
import pickle

import numpy as np
import pytest

from celery_nb import payload
from celery_nb.errors import InputError
from celery_nb_runtime import protocol


def test_bundle_round_trip_keeps_numpy_buffers_out_of_band() -> None:
    import cloudpickle

    arr = np.arange(1_000_000, dtype=np.float64)
    writer = protocol.ValueWriter(cloudpickle.dumps)
    index = {"arr": writer.add(arr), "meta": writer.add({"k": [1, 2]})}
    assert len(index["arr"]) == 2  # pickle stream + the array's buffer as its own section
    assert memoryview(writer.sections[index["arr"][1]]).nbytes == arr.nbytes
    data = b"".join(protocol.pack_bundle({"outputs": index}, writer.sections))
    header, sections = protocol.unpack_bundle(data)
    loaded = protocol.load_value(sections, header["outputs"]["arr"])
    assert np.array_equal(loaded, arr)
    assert protocol.load_value(sections, header["outputs"]["meta"]) == {"k": [1, 2]}


def test_sections_start_aligned_and_big_bytes_travel_out_of_band() -> None:
    """Arrays loaded in place from a bundle that starts aligned are aligned; bytes and bytearrays
    of 64 KiB and more are a section of their own (not copied into the pickle stream), and load
    as what they were."""
    writer = protocol.ValueWriter(pickle.dumps)
    values = {"odd": b"x" * 13, "big": bytes(range(256)) * 256, "array": bytearray(b"y" * 70000),
              "floats": np.arange(1000, dtype=np.float64)}
    index = {name: writer.add(value) for name, value in values.items()}
    assert [len(index[name]) for name in values] == [1, 2, 2, 2]
    data = b"".join(protocol.pack_bundle({"outputs": index}, writer.sections))
    buffer = np.zeros(len(data) + 64, dtype=np.uint8)  # a 64-byte aligned copy of the bundle
    start = -buffer.ctypes.data % 64
    buffer[start:start + len(data)] = np.frombuffer(data, dtype=np.uint8)
    header, sections = protocol.unpack_bundle(memoryview(buffer)[start:start + len(data)])
    assert all((np.frombuffer(s, dtype=np.uint8).ctypes.data % 64 == 0) for s in sections if s.nbytes)
    loaded = {name: protocol.load_value(sections, header["outputs"][name]) for name in values}
    assert loaded["floats"].flags.aligned and np.array_equal(loaded["floats"], values["floats"])
    for name in ("odd", "big", "array"):
        assert type(loaded[name]) is type(values[name]) and loaded[name] == values[name]


@pytest.mark.parametrize("data", [b"", b"XXXX" + bytes(8), b"CNB\x02\x00\x00\x00\x10\x00\x00\x00\x00{"])
def test_bad_bundles_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.unpack_bundle(data)


def test_frames_survive_arbitrary_chunking() -> None:
    stream = b"".join([protocol.frame_header(protocol.FRAME_STDOUT, 5), b"hello",
                       protocol.frame_header(protocol.FRAME_EVENT, 2), b"{}",
                       protocol.frame_header(protocol.FRAME_RESULT, 0)])
    for size in (1, 3, 7, len(stream)):
        decoder = protocol.FrameDecoder()
        frames = []
        for i in range(0, len(stream), size):
            frames.extend(decoder.feed(stream[i:i + size]))
        assert frames == [(protocol.FRAME_STDOUT, b"hello"), (protocol.FRAME_EVENT, b"{}"),
                          (protocol.FRAME_RESULT, b"")]
        assert decoder.pending == 0


def test_garbage_on_the_frame_channel_is_an_error() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.FrameDecoder().feed(b"Traceback (most recent call last):\n")


def test_unpicklable_input_names_the_variable() -> None:
    import threading

    with pytest.raises(InputError, match="input variable 'lock'"):
        payload.cell_payload("print(lock)", 1, {"lock": threading.Lock()}, [], False)
