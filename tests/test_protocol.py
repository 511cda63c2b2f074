"""Bundles (payload/result) and the runtime's frame stream."""
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


@pytest.mark.parametrize("data", [b"", b"XXXX" + bytes(8), b"CNB\x01\x00\x00\x00\x10\x00\x00\x00\x00{"])
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
